// Upload page: a .zip (or a folder, zipped here in the browser) goes up over tus, resumably.
import { downloadZip } from "../vendor/client-zip-2.5.1.js";

const $ = (s) => document.querySelector(s);
const panel = $("#upload-panel");
const bar = $("#upload-progress");
const status = $("#upload-status");
let current = null;

function fail(message) {
  Graft.showError("#upload-error", message);
  panel.hidden = true;
}

async function tusError(err) {
  const res = err && err.originalResponse;
  if (res) {
    try {
      const body = JSON.parse(res.getBody());
      if (body.error) return body.error;
    } catch (_) { /* not JSON */ }
    if (res.getStatus() === 413) return "The file is over the upload size limit.";
    return `The upload failed (HTTP ${res.getStatus()}).`;
  }
  return "The connection dropped. Press Resume to continue where it stopped.";
}

function start(blob, filename, { resumable = true } = {}) {
  if (current) current.abort(); // one upload at a time
  current = null;
  Graft.showError("#upload-error", "");
  if (!/\.zip$/i.test(filename)) {
    fail(`'${filename}' is not a .zip file. Choose a .zip, or drop the folder itself.`);
    return;
  }
  const name = $("#dataset-name").value.trim() || filename.replace(/\.zip$/i, "");
  panel.hidden = false;
  $("#upload-pause").hidden = false;
  $("#upload-resume").hidden = true;
  let datasetUrl = null;
  let announced = -1; // screen readers hear every 10%, not every progress event
  const began = Date.now();
  const upload = new tus.Upload(blob, {
    endpoint: "/api/v1/uploads/",
    chunkSize: 32 * 1024 * 1024,
    retryDelays: [0, 1000, 3000, 5000, 10000, 20000],
    metadata: { filename, name },
    headers: { "X-CSRFToken": Graft.csrfToken() },
    removeFingerprintOnSuccess: true,
    // A zip made here has no stable identity (name, date) to resume by across reloads.
    storeFingerprintForResuming: resumable,
    onProgress(sent, total) {
      const p = total ? sent / total : 0;
      bar.value = Math.floor(p * 100);
      const rate = sent / Math.max(1, (Date.now() - began) / 1000);
      const eta = rate > 0 ? Graft.duration((total - sent) / rate) : "";
      const tenth = Math.floor(p * 10);
      if (tenth !== announced) { announced = tenth; $("#upload-announce").textContent = `${tenth * 10}% uploaded`; }
      status.textContent = `${Graft.bytes(sent)} of ${Graft.bytes(total)} (${Math.floor(p * 100)}%)${eta && sent < total ? ` · about ${eta} left` : ""}`;
    },
    onAfterResponse(_req, res) {
      const url = res.getHeader("Graft-Dataset-Url");
      if (url) datasetUrl = url;
    },
    onSuccess() {
      status.textContent = "Uploaded. Opening the dataset report…";
      window.location.assign(datasetUrl || "/");
    },
    async onError(err) {
      fail(await tusError(err));
      if (!(err && err.originalResponse)) {
        panel.hidden = false;
        $("#upload-pause").hidden = true;
        $("#upload-resume").hidden = false;
      }
    },
  });
  current = upload;
  upload.findPreviousUploads()
    .then((previous) => { if (previous.length) upload.resumeFromPreviousUpload(previous[0]); })
    .catch(() => {}) // no resume information: start from the beginning
    .finally(() => { if (current === upload) upload.start(); });
}

$("#upload-pause").addEventListener("click", () => {
  if (!current) return;
  current.abort();
  $("#upload-pause").hidden = true;
  $("#upload-resume").hidden = false;
  status.textContent += " · paused";
});
$("#upload-resume").addEventListener("click", () => {
  if (!current) return;
  Graft.showError("#upload-error", "");
  $("#upload-pause").hidden = false;
  $("#upload-resume").hidden = true;
  current.start();
});

// A folder: zip it here (streamed, stored uncompressed: images are compressed already).
async function zipFolder(entries, folderName) {
  const images = entries.filter(({ path }) => !/(^|\/)(\.|__MACOSX)/.test(path));
  if (!images.length) {
    fail("That folder holds no files. Drop a folder with one sub-folder of images per class.");
    return;
  }
  panel.hidden = false;
  status.textContent = `Zipping ${images.length} files…`;
  try {
    const blob = await downloadZip(images.map(({ path, file }) => ({ name: path, input: file, lastModified: file.lastModified }))).blob();
    start(blob, `${folderName}.zip`, { resumable: false });
  } catch (err) {
    fail(`The folder could not be zipped in the browser (${err.message}). Zip it yourself and upload the .zip.`);
  }
}

$("#file-input").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) start(file, file.name);
  e.target.value = ""; // choosing the same file again (after an error) must fire again
});
if ($("#file-input").files[0]) start($("#file-input").files[0], $("#file-input").files[0].name); // chosen early

$("#folder-input").addEventListener("change", (e) => {
  const files = [...e.target.files];
  if (!files.length) return;
  const root = files[0].webkitRelativePath.split("/")[0];
  zipFolder(files.map((file) => ({ path: file.webkitRelativePath.slice(root.length + 1), file })), root);
  e.target.value = "";
});

async function walk(entry, prefix = "") {
  if (entry.isFile) {
    const file = await new Promise((ok, ko) => entry.file(ok, ko));
    return [{ path: prefix + entry.name, file }];
  }
  const reader = entry.createReader();
  const out = [];
  for (;;) {
    const batch = await new Promise((ok, ko) => reader.readEntries(ok, ko));
    if (!batch.length) break;
    for (const child of batch) out.push(...(await walk(child, `${prefix}${entry.name}/`)));
  }
  return out;
}

Graft.dropzone($("#dropzone"), $("#file-input"), async (e) => {
  const item = [...e.dataTransfer.items].find((i) => i.kind === "file");
  const entry = item && item.webkitGetAsEntry && item.webkitGetAsEntry();
  if (entry && entry.isDirectory) {
    try {
      const files = await walk(entry);
      zipFolder(files.map(({ path, file }) => ({ path: path.slice(entry.name.length + 1), file })), entry.name);
    } catch (err) {
      fail(`The folder could not be read (${err.message}). Zip it yourself and upload the .zip.`);
    }
  } else if (e.dataTransfer.files[0]) {
    start(e.dataTransfer.files[0], e.dataTransfer.files[0].name);
  }
});
