// Dataset report: live status while processing; bar chart of images per class; the versions, live
// while images are added or the finders run; adding images (resumable, over tus) as a new version.
import { tusSend, wirePickers, zipFiles } from "./upload.js";

const $ = (s) => document.querySelector(s);
const root = $("#dataset-root");
const id = root.dataset.dataset;

function followProcessing() {
  const badge = $("#dataset-status");
  Graft.poll(async () => {
    const d = await Graft.api(`/datasets/${id}/`);
    badge.textContent = d.status;
    badge.className = `badge ${d.status}`;
    if (d.status !== "processing") {
      window.location.reload();
      return true;
    }
    return false;
  }, 1500, "#poll-error");
}

// One click, one job: a double click must not queue two trainings.
function guardTrainForm() {
  const train = $("#train-form");
  if (!train) return;
  train.addEventListener("submit", () => {
    const button = train.querySelector("button[type=submit]");
    setTimeout(() => { button.disabled = true; button.textContent = "Starting…"; }, 0);
  });
}

function drawChart() {
  const data = $("#classes-json");
  const canvas = $("#class-chart");
  if (!(data && canvas && window.Chart)) return;
  const classes = JSON.parse(data.textContent);
  const split = classes.some((c) => c.val > 0);
  new Chart(canvas, {
    type: "bar",
    data: {
      labels: classes.map((c) => c.name),
      datasets: split
        ? [
            { label: "train", data: classes.map((c) => c.train || c.count - c.val), backgroundColor: "#3d6fd9" },
            { label: "val", data: classes.map((c) => c.val), backgroundColor: "#9bb5ef" },
          ]
        : [{ label: "images", data: classes.map((c) => c.count), backgroundColor: "#3d6fd9" }],
    },
    options: {
      maintainAspectRatio: false,
      indexAxis: classes.length > 8 ? "y" : "x",
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } },
      plugins: { legend: { display: split } },
    },
  });
}

// --- versions ------------------------------------------------------------------------------------

const plural = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

function ago(iso) {
  const seconds = (Date.now() - new Date(iso).getTime()) / 1000;
  const rtf = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
  if (seconds < 45) return "just now";
  if (seconds < 3600) return rtf.format(-Math.round(seconds / 60), "minute");
  if (seconds < 86400) return rtf.format(-Math.round(seconds / 3600), "hour");
  if (seconds < 7 * 86400) return rtf.format(-Math.round(seconds / 86400), "day");
  return new Date(iso).toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
}

// What the finders found, each kind a link to the review filtered to it.
const FINDINGS = [
  ["label_issues", (n) => plural(n, "likely label error")],
  ["cross-class", (n) => `${plural(n, "near-duplicate pair")} across classes`],
  ["cross-split", (n) => `${plural(n, "near-duplicate pair")} across training and validation`],
  ["same-class", (n) => `${plural(n, "near-duplicate pair")} within a class`],
  ["outliers", (n) => plural(n, "outlier")],
];

function findingsLine(v) {
  const p = Graft.el("p", { class: `version-findings ${v.findings_status}` });
  const status = v.findings_status;
  if (status === "queued" || status === "running") {
    p.append(Graft.el("span", { class: "spinner", "aria-hidden": "true" }),
      status === "queued" ? "Finders queued: label errors, near-duplicates and outliers next." : "Looking for label errors, near-duplicates and outliers…");
    return p;
  }
  if (status === "failed") {
    const why = v.findings_error || "The finders failed on this version.";
    p.append(Graft.el("span", { class: "error-text", text: /^the finders/i.test(why) ? why : `The finders failed: ${why}` }), " ",
      Graft.el("button", { type: "button", class: "link", "data-rerun": v.number, text: "Run them again" }));
    return p;
  }
  if (status !== "ready") {
    if (v.status !== "ready") return null;
    p.append("The finders have not run on this version. ",
      Graft.el("button", { type: "button", class: "link", "data-rerun": v.number, text: "Run them" }));
    return p;
  }
  const s = v.findings_summary || {};
  const parts = FINDINGS.filter(([key]) => s[key] > 0);
  if (!parts.length) {
    p.append(Graft.el("span", { class: "ok-text", text: "The finders flagged nothing." }));
    return p;
  }
  p.append("Finders: ");
  parts.forEach(([key, words], i) => {
    if (i) p.append(", ");
    p.append(Graft.el("a", { href: `${reviewUrl(v.number)}&finder=${encodeURIComponent(key)}`, text: words(s[key]) }));
  });
  return p;
}

function reviewUrl(number) { return `/datasets/${id}/review/?v=${number}`; }

function changesLine(v) {
  const s = v.summary || {};
  if (v.parent == null) return `The upload: ${plural(v.num_images, "image")}.`;
  const parts = [];
  if (s.added) parts.push(`${s.added} added`);
  if (s.relabelled) parts.push(`${s.relabelled} relabelled`);
  if (s.removed) parts.push(`${s.removed} removed`);
  if (v.status === "processing") return `From version ${v.parent}: images being added…`;
  if (v.status === "failed") return `From version ${v.parent}: no images were added.`;
  return `From version ${v.parent}: ${parts.join(", ") || "no changes"} · ${plural(v.num_images, "image")}.`;
}

function versionItem(v, newest) {
  const li = Graft.el("li", { class: `version ${v.status}`, id: `version-${v.number}`, "data-number": v.number });
  const head = Graft.el("div", { class: "version-head" },
    Graft.el("strong", { text: `Version ${v.number}` }), " ",
    Graft.el("span", { class: `badge ${v.status}`, text: v.status }));
  if (v.number === newest) head.append(" ", Graft.el("span", { class: "tag", text: "newest" }));
  head.append(" ", Graft.el("time", { class: "meta", datetime: v.created_at, title: new Date(v.created_at).toLocaleString(), text: ago(v.created_at) }));
  li.append(head);
  if (v.note) li.append(Graft.el("p", { class: "version-note", text: `“${v.note}”` }));
  li.append(Graft.el("p", { class: "version-changes", text: changesLine(v) }));
  if (v.status === "processing") li.append(Graft.el("progress", { "aria-label": `Adding images to version ${v.number}` }));
  if (v.error) li.append(Graft.el("p", { class: "error", text: v.error }));
  if (v.warnings && v.warnings.length) {
    const ul = Graft.el("ul", { class: "warnings" });
    for (const w of v.warnings) {
      const item = Graft.el("li", { class: w.code || "" }, Graft.el("strong", { text: w.message }));
      if (w.files && w.files.length) {
        const files = Graft.el("ul", { class: "files" }, ...w.files.map((f) => Graft.el("li", {}, Graft.el("code", { text: f }))));
        item.append(Graft.el("details", {}, Graft.el("summary", { text: plural(w.files.length, "file") }), files));
      }
      ul.append(item);
    }
    li.append(ul);
  }
  const findings = findingsLine(v);
  if (findings) li.append(findings);
  if (v.status === "ready") {
    li.append(Graft.el("div", { class: "row version-actions" },
      Graft.el("a", { class: "button secondary", href: reviewUrl(v.number), "aria-label": `Review version ${v.number}`, text: "Review" }),
      Graft.el("a", { class: "button secondary", href: `/api/v1/datasets/${id}/versions/${v.number}/export/`, download: "", "aria-label": `Export version ${v.number} as a .zip`, text: "Export .zip" })));
  }
  return li;
}

let versions = [];

function renderVersions() {
  const list = $("#versions");
  list.setAttribute("aria-busy", "false");
  const newest = versions.length ? Math.max(...versions.filter((v) => v.status === "ready").map((v) => v.number)) : 0;
  // Redraw only what changed: a screen reader (aria-live) hears the version that moved, not the list.
  const seen = new Set();
  let previous = null;
  for (const v of versions) {
    const key = JSON.stringify([v, newest === v.number]);
    let node = document.getElementById(`version-${v.number}`);
    if (!node || node.dataset.key !== key) {
      const fresh = versionItem(v, newest);
      fresh.dataset.key = key;
      if (node) node.replaceWith(fresh); else if (previous) previous.after(fresh); else list.prepend(fresh);
      node = fresh;
    }
    previous = node;
    seen.add(node);
  }
  for (const node of [...list.children]) if (!seen.has(node)) node.remove();
  if (!versions.length) list.append(Graft.el("li", { class: "empty", text: "No versions yet: this dataset was made before versions existed." }));
  updateTrainVersions(newest);
}

function updateTrainVersions(newest) {
  const select = $("#train-version");
  if (!select) return;
  const ready = versions.filter((v) => v.status === "ready");
  const current = [...select.options].map((o) => o.value).join();
  if (current === ready.map((v) => String(v.number)).join()) return;
  select.replaceChildren(...ready.map((v) => Graft.el("option", {
    value: v.number, text: `Version ${v.number}${v.number === newest ? " (newest)" : ""}${v.note ? ` · ${v.note.slice(0, 60)}` : ""}`,
  })));
  select.value = String(newest);
  $("#train-version-field").hidden = ready.length < 2;
  const latest = ready.find((v) => v.number === newest);
  if (latest && $("#num-images")) $("#num-images").textContent = latest.num_images;
}

const busy = (v) => v.status === "processing" || v.findings_status === "queued" || v.findings_status === "running";
let polling = false;
let onVersions = null; // the add-images panel's watcher

async function loadVersions() {
  versions = await Graft.api(`/datasets/${id}/versions/`);
  renderVersions();
  if (onVersions) onVersions(versions);
  return versions;
}

function followVersions() {
  if (polling) return;
  polling = true;
  Graft.poll(async () => {
    const list = await loadVersions();
    const done = !list.some(busy) && !onVersions;
    if (done) polling = false;
    return done;
  }, 2000, "#versions-error");
}

$("#versions") && $("#versions").addEventListener("click", async (e) => {
  const button = e.target.closest("[data-rerun]");
  if (!button) return;
  button.disabled = true;
  try {
    await Graft.api(`/datasets/${id}/versions/${button.dataset.rerun}/findings/`, { method: "POST" });
    followVersions();
    await loadVersions();
  } catch (err) {
    Graft.showError("#versions-error", err.message);
    button.disabled = false;
  }
});

// --- adding images -----------------------------------------------------------------------------

const ADDED = `graft:added:${id}`;

function addImages() {
  const panel = $("#add-panel");
  const status = $("#add-status");
  const bar = $("#add-progress");
  let current = null;

  const added = JSON.parse(sessionStorage.getItem(ADDED) || "null");
  if (added) {
    sessionStorage.removeItem(ADDED);
    panel.hidden = false;
    bar.hidden = true;
    controls(false);
    status.replaceChildren(`${added.text} `, Graft.el("a", { href: reviewUrl(added.number), text: `Review version ${added.number}` }));
  }

  function fail(message) {
    Graft.showError("#add-error", message);
    panel.hidden = true;
  }

  function controls(uploading) {
    $("#add-pause").hidden = !uploading;
    $("#add-resume").hidden = true;
  }

  // After the last byte: the version is checked by a worker; say how it ended.
  function watch(number) {
    status.textContent = `Uploaded. Checking the images for version ${number}: unreadable files, duplicates, images already in the dataset…`;
    bar.removeAttribute("value"); // indeterminate while the worker checks
    controls(false);
    onVersions = (list) => {
      const v = list.find((x) => x.number === number);
      if (!v || v.status === "processing") return;
      onVersions = null;
      panel.hidden = v.status === "failed";
      if (v.status === "failed") {
        fail(`Version ${number} was not made: ${v.error || "the images could not be added."}`);
        return;
      }
      // The page's counts, chart and thumbnails are the dataset's newest version: reload them, and
      // say how the addition went once the page is back.
      const warned = v.warnings && v.warnings.length ? ` ${plural(v.warnings.length, "warning")}: see version ${number} below.` : "";
      sessionStorage.setItem(ADDED, JSON.stringify({
        number, text: `Version ${number} is ready: ${plural(v.summary.added || 0, "image")} added, ${plural(v.num_images, "image")} in all.${warned}`,
      }));
      window.location.reload();
    };
    followVersions();
  }

  function start(blob, filename, { resumable = true } = {}) {
    if (current) current.abort(); // one upload at a time
    current = null;
    Graft.showError("#add-error", "");
    if (!/\.zip$/i.test(filename)) {
      fail(`'${filename}' is not a .zip file. Choose a .zip, or drop the folder itself.`);
      return;
    }
    panel.hidden = false;
    bar.hidden = false;
    bar.value = 0;
    controls(true);
    let number = null;
    let announced = -1;
    current = tusSend(blob, {
      metadata: { filename, dataset: String(id), note: $("#add-note").value.trim() },
      resumable,
      onProgress(text, percent, tenth) {
        bar.value = percent;
        if (tenth !== announced) { announced = tenth; $("#add-announce").textContent = `${tenth * 10}% uploaded`; }
        status.textContent = text;
      },
      onResponse(res) {
        const made = res.getHeader("Graft-Version");
        if (made) number = Number(made);
      },
      async onSuccess() {
        current = null;
        if (number) { watch(number); return; }
        // No version number in the answer: find the newest processing version instead.
        const list = await loadVersions().catch(() => []);
        const v = list.find((x) => x.status === "processing") || list[0];
        if (v) watch(v.number); else fail("The images arrived, but no new version showed up. Reload the page.");
      },
      onError(message, canResume) {
        fail(message);
        if (canResume) {
          panel.hidden = false;
          $("#add-pause").hidden = true;
          $("#add-resume").hidden = false;
        }
      },
    });
  }

  $("#add-pause").addEventListener("click", () => {
    if (!current) return;
    current.abort();
    $("#add-pause").hidden = true;
    $("#add-resume").hidden = false;
    status.textContent += " · paused";
  });
  $("#add-resume").addEventListener("click", () => {
    if (!current) return;
    Graft.showError("#add-error", "");
    controls(true);
    current.start();
  });

  wirePickers({
    zone: $("#add-drop"),
    fileInput: $("#add-file"),
    folderInput: $("#add-folder"),
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

if (root.dataset.status === "processing") followProcessing();
guardTrainForm();
drawChart();
if ($("#versions-card")) {
  addImages();
  loadVersions().then((list) => { if (list.some(busy)) followVersions(); })
    .catch((err) => Graft.showError("#versions-error", err.message));
}
