// Resumable uploads over tus, from a .zip or a folder (zipped here in the browser). The upload page
// uses it to make a dataset; the dataset page (dataset.js) imports it to add images as a new version.
import { downloadZip } from "../vendor/client-zip-2.5.1.js";

const $ = (s) => document.querySelector(s);

// One sentence for a failed tus request (never raw JSON).
export async function tusError(err) {
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

// Start (or resume) one upload. Hooks: onProgress(text, percent, tenth), onResponse(res) for each
// response (its headers), onSuccess(), onError(sentence, canResume). Returns the tus.Upload.
export function tusSend(blob, { metadata, resumable = true, onProgress, onResponse, onSuccess, onError }) {
  const began = Date.now();
  const upload = new tus.Upload(blob, {
    endpoint: "/api/v1/uploads/",
    chunkSize: 32 * 1024 * 1024,
    retryDelays: [0, 1000, 3000, 5000, 10000, 20000],
    metadata,
    headers: { "X-CSRFToken": Graft.csrfToken() },
    removeFingerprintOnSuccess: true,
    // A zip made here has no stable identity (name, date) to resume by across reloads.
    storeFingerprintForResuming: resumable,
    onProgress(sent, total) {
      const p = total ? sent / total : 0;
      const rate = sent / Math.max(1, (Date.now() - began) / 1000);
      const eta = rate > 0 ? Graft.duration((total - sent) / rate) : "";
      const text = `${Graft.bytes(sent)} of ${Graft.bytes(total)} (${Math.floor(p * 100)}%)${eta && sent < total ? ` · about ${eta} left` : ""}`;
      onProgress(text, Math.floor(p * 100), Math.floor(p * 10));
    },
    onAfterResponse(_req, res) { if (onResponse) onResponse(res); },
    onSuccess,
    async onError(err) { onError(await tusError(err), !(err && err.originalResponse)); },
  });
  // Aborted (replaced, or paused) before the lookup below ends: it must not start by itself.
  let stopped = false;
  const [abort, start] = [upload.abort.bind(upload), upload.start.bind(upload)];
  upload.abort = (...args) => { stopped = true; return abort(...args); };
  upload.start = () => { stopped = false; start(); };
  upload.findPreviousUploads()
    .then((previous) => { if (previous.length) upload.resumeFromPreviousUpload(previous[0]); })
    .catch(() => {}) // no resume information: start from the beginning
    .finally(() => { if (!stopped) start(); });
  return upload;
}

// A folder's files, zipped here (streamed, stored uncompressed: images are compressed already).
// Junk (hidden files, __MACOSX) stays out; throws a sentence when nothing is left.
export async function zipFiles(entries) {
  const images = entries.filter(({ path }) => !/(^|\/)(\.|__MACOSX)/.test(path));
  if (!images.length) throw new Error("That folder holds no files. Drop a folder with one sub-folder of images per class.");
  try {
    return { blob: await downloadZip(images.map(({ path, file }) => ({ name: path, input: file, lastModified: file.lastModified }))).blob(), count: images.length };
  } catch (err) {
    throw new Error(`The folder could not be zipped in the browser (${err.message}). Zip it yourself and upload the .zip.`);
  }
}

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

// Wire a drop zone, a .zip picker and a folder picker: onFile(file, filename) for a zip, or
// onFolder(entries, folderName) for a folder ([{path, file}], paths inside the folder); onError(sentence).
export function wirePickers({ zone, fileInput, folderInput, onFile, onFolder, onError }) {
  fileInput.addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) onFile(file, file.name);
    e.target.value = ""; // choosing the same file again (after an error) must fire again
  });
  if (fileInput.files[0]) onFile(fileInput.files[0], fileInput.files[0].name); // chosen before the script ran
  folderInput.addEventListener("change", (e) => {
    const files = [...e.target.files];
    if (!files.length) return;
    const root = files[0].webkitRelativePath.split("/")[0];
    onFolder(files.map((file) => ({ path: file.webkitRelativePath.slice(root.length + 1), file })), root);
    e.target.value = "";
  });
  Graft.dropzone(zone, fileInput, async (e) => {
    const item = [...e.dataTransfer.items].find((i) => i.kind === "file");
    const entry = item && item.webkitGetAsEntry && item.webkitGetAsEntry();
    if (entry && entry.isDirectory) {
      try {
        const files = await walk(entry);
        onFolder(files.map(({ path, file }) => ({ path: path.slice(entry.name.length + 1), file })), entry.name);
      } catch (err) {
        onError(`The folder could not be read (${err.message}). Zip it yourself and upload the .zip.`);
      }
    } else if (e.dataTransfer.files[0]) {
      onFile(e.dataTransfer.files[0], e.dataTransfer.files[0].name);
    }
  });
}

// --- the upload page -------------------------------------------------------------------------------

function uploadPage() {
  const panel = $("#upload-panel");
  const bar = $("#upload-progress");
  const status = $("#upload-status");
  let current = null;

  function fail(message) {
    Graft.showError("#upload-error", message);
    panel.hidden = true;
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
    current = tusSend(blob, {
      metadata: { filename, name },
      resumable,
      onProgress(text, percent, tenth) {
        bar.value = percent;
        if (tenth !== announced) { announced = tenth; $("#upload-announce").textContent = `${tenth * 10}% uploaded`; }
        status.textContent = text;
      },
      onResponse(res) {
        const url = res.getHeader("Graft-Dataset-Url");
        if (url) datasetUrl = url;
      },
      onSuccess() {
        status.textContent = "Uploaded. Opening the dataset report…";
        window.location.assign(datasetUrl || "/");
      },
      onError(message, canResume) {
        fail(message);
        if (canResume) {
          panel.hidden = false;
          $("#upload-pause").hidden = true;
          $("#upload-resume").hidden = false;
        }
      },
    });
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

  wirePickers({
    zone: $("#dropzone"),
    fileInput: $("#file-input"),
    folderInput: $("#folder-input"),
    onFile: (file, name) => start(file, name),
    async onFolder(entries, folderName) {
      panel.hidden = false;
      status.textContent = `Zipping ${entries.length} files…`;
      try {
        const { blob } = await zipFiles(entries);
        start(blob, `${folderName}.zip`, { resumable: false });
      } catch (err) {
        fail(err.message);
      }
    },
    onError: fail,
  });
}

if ($("#upload-form")) uploadPage();
