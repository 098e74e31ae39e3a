// Model page, "Batch prediction": upload a zip of images (or pick a ready dataset) to start a batch,
// then this model's batches, updated live while any of them is queued or running.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const id = document.getElementById("model-root").dataset.model;
  const $ = (s) => document.querySelector(s);
  const ACTIVE = ["queued", "running"];
  const list = $("#batches");
  const shown = new Map(); // batch id -> { node, signature, status }
  const startedHere = new Map(); // batch id -> batch started on this page, until a list shows it
  let watching = false;

  function k() {
    const value = Number($("#batch-k").value);
    return Number.isInteger(value) && value >= 1 && value <= 20 ? value : null;
  }

  function counts(b) {
    if (b.status === "queued") return "Waiting for a worker…";
    if (!b.total) return b.status === "running" ? "Reading the images…" : "";
    const failed = b.failed ? ` · ${b.failed} could not be read` : "";
    return `${b.done} of ${b.total} images${failed}`;
  }

  function row(b) {
    const progress = Graft.el("progress", { max: b.total || 1, value: b.done, "aria-label": `Progress of batch ${b.name}` });
    if (b.status === "queued") progress.removeAttribute("value"); // indeterminate until it starts
    const parts = [
      Graft.el("div", { class: "row spread" },
        Graft.el("a", { href: `/batches/${b.id}/`, text: b.name }),
        Graft.el("span", { class: `badge ${b.status}`, text: b.status })),
    ];
    if (b.status !== "failed") parts.push(progress);
    parts.push(Graft.el("span", { class: "meta", text: `${counts(b)} · top ${b.k} · ${new Date(b.created_at).toLocaleString()}` }));
    if (b.results) {
      parts.push(Graft.el("span", { class: "row downloads" },
        Graft.el("a", { class: "button secondary", href: b.results.csv, download: "", text: "CSV" }),
        Graft.el("a", { class: "button secondary", href: b.results.json, download: "", text: "JSON" })));
    }
    if (b.status === "failed") parts.push(Graft.el("span", { class: "error", text: b.error || "The batch failed." }));
    return Graft.el("li", { "data-batch": b.id }, ...parts);
  }

  // Only rows that changed are rebuilt, so a focused download link keeps its focus.
  function render(batches) {
    if (!batches.length) {
      shown.clear();
      list.replaceChildren(Graft.el("li", { class: "empty", text: "No batches yet for this model." }));
      return;
    }
    const nodes = batches.map((b) => {
      const signature = JSON.stringify(b);
      const before = shown.get(b.id);
      if (before && before.signature === signature) return before.node;
      if (before && before.status !== b.status && !ACTIVE.includes(b.status)) {
        $("#batch-announce").textContent = `Batch ${b.name} ${b.status}. ${counts(b)}.`;
      }
      const node = row(b);
      shown.set(b.id, { node, signature, status: b.status });
      return node;
    });
    const same = nodes.length === list.children.length && nodes.every((n, i) => list.children[i] === n);
    if (!same) list.replaceChildren(...nodes);
  }

  // Polls while a batch is queued or running; stops when none is, until the next one starts.
  // A batch started here stays listed (and watched) even if a list fetched just before misses it.
  function watch() {
    if (watching) return;
    watching = true;
    Graft.poll(async () => {
      const body = await Graft.api(`/models/${id}/batch/`);
      body.results.forEach((b) => startedHere.delete(b.id));
      const batches = [...startedHere.values(), ...body.results];
      render(batches);
      watching = batches.some((b) => ACTIVE.includes(b.status));
      return !watching;
    }, 1500, "#batch-poll-error");
  }

  function started(batch) {
    startedHere.set(batch.id, batch);
    render([batch, ...[...shown.values()].map((s) => JSON.parse(s.signature)).filter((b) => b.id !== batch.id)]);
    watch();
  }

  async function uploadZip(file) {
    Graft.showError("#batch-error", "");
    if (!/\.zip$/i.test(file.name)) {
      Graft.showError("#batch-error", `'${file.name}' is not a .zip file. Choose a .zip of images.`);
      return;
    }
    if (k() === null) {
      Graft.showError("#batch-error", "Labels per image must be a whole number from 1 to 20.");
      return;
    }
    const panel = $("#batch-upload");
    const bar = $("#batch-upload-progress");
    const status = $("#batch-upload-status");
    panel.hidden = false;
    bar.value = 0;
    status.textContent = `Uploading ${file.name}…`;
    let announced = -1;
    const form = new FormData();
    form.append("file", file);
    form.append("k", String(k()));
    try {
      const batch = await Graft.upload(`/models/${id}/batch/`, form, (sent, total) => {
        const p = total ? sent / total : 0;
        bar.value = Math.floor(p * 100);
        status.textContent = `${Graft.bytes(sent)} of ${Graft.bytes(total)} (${Math.floor(p * 100)}%)`;
        const tenth = Math.floor(p * 10);
        if (tenth !== announced) { announced = tenth; $("#batch-upload-announce").textContent = `${tenth * 10}% uploaded`; }
      });
      bar.value = 100;
      status.textContent = `Uploaded ${file.name}; its batch is listed below.`;
      started(batch);
    } catch (err) {
      panel.hidden = true;
      Graft.showError("#batch-error", err.message);
    }
  }

  const input = $("#batch-input");
  input.addEventListener("change", (e) => {
    if (e.target.files[0]) uploadZip(e.target.files[0]);
    e.target.value = ""; // the same file chosen again (after an error) must fire again
  });
  Graft.dropzone($("#batch-drop"), input, (e) => { if (e.dataTransfer.files[0]) uploadZip(e.dataTransfer.files[0]); });

  $("#batch-dataset-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const select = $("#batch-dataset");
    if (!select) return;
    Graft.showError("#batch-error", "");
    if (k() === null) {
      Graft.showError("#batch-error", "Labels per image must be a whole number from 1 to 20.");
      return;
    }
    const button = e.submitter || e.target.querySelector("button");
    button.disabled = true;
    try {
      const batch = await Graft.api(`/models/${id}/batch/`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ dataset: Number(select.value), k: k() }),
      });
      started(batch);
    } catch (err) {
      Graft.showError("#batch-error", err.message);
    } finally {
      button.disabled = false;
    }
  });

  watch();
});
