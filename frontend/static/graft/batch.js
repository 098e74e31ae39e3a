// Batch page: live progress (images done of total, an ETA once it has a rate), failures, downloads, delete.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("batch-root");
  const id = root.dataset.batch;
  const $ = (s) => document.querySelector(s);
  const FINAL = ["succeeded", "failed"];

  // From the worker's own clock (started_at) to this browser's: only a rough figure, so it waits
  // for a few images and some seconds of work before it says anything.
  function eta(b) {
    if (b.status !== "running" || !b.started_at || !b.total || b.done < 2) return b.status === "running" ? "estimating…" : "—";
    const elapsed = (Date.now() - Date.parse(b.started_at)) / 1000;
    if (elapsed < 3) return "estimating…";
    return `about ${Graft.duration(((b.total - b.done) * elapsed) / b.done) || "0 s"} left`;
  }

  function render(b) {
    const badge = $("#batch-status");
    badge.textContent = b.status;
    badge.className = `badge ${b.status}`;
    const bar = $("#batch-progress");
    if (b.status === "queued") bar.removeAttribute("value");
    else bar.value = b.progress;
    $("#batch-done").textContent = b.total ? `${b.done} of ${b.total} (${Graft.pct(b.progress, 0)})` : "—";
    $("#batch-failed").textContent = String(b.failed);
    $("#batch-eta").textContent = FINAL.includes(b.status) ? (b.finished_at && b.started_at ?
      `took ${Graft.duration((Date.parse(b.finished_at) - Date.parse(b.started_at)) / 1000) || "0 s"}` : "—") : eta(b);
    $("#batch-note").textContent = b.status === "queued" ? "Waiting for a worker…" :
      b.failed ? "Images that could not be read have their error in the CSV's error column; the others were predicted." : "";
    Graft.showError("#batch-error", b.status === "failed" ? b.error || "The batch failed." : "");
    $("#batch-downloads").hidden = !b.results;
    if (b.results) {
      $("#download-csv").href = b.results.csv;
      $("#download-json").href = b.results.json;
    }
    return FINAL.includes(b.status);
  }

  Graft.poll(async () => render(await Graft.api(`/batches/${id}/`)), 1500, "#poll-error");

  $("#batch-delete").addEventListener("click", async () => {
    const running = !FINAL.includes($("#batch-delete").dataset.status || "");
    if (!confirm(running ? "Stop this batch and delete it?" : "Delete this batch and its predictions?")) return;
    try {
      await Graft.api(`/batches/${id}/`, { method: "DELETE" });
      window.location.assign(`/models/${root.dataset.model}/`);
    } catch (err) {
      Graft.showError("#delete-error", err.message);
    }
  });
});
