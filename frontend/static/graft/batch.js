// Batch page: live progress (images done of total, an ETA once it has a rate), failures, downloads, delete;
// once it has succeeded, its predictions (GET /batches/{id}/items/): least confident first, with
// thumbnails, filtered by top label (chips with counts), a page at a time.
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
    if (b.status === "succeeded" && !items.shown) { items.shown = true; loadItems(); }
    return FINAL.includes(b.status);
  }

  // --- the predictions ---------------------------------------------------------------------------
  const items = { shown: false, label: "", page: 1, pages: 1 };
  const PAGE_SIZE = 48;

  async function loadItems() {
    const query = new URLSearchParams({ page: items.page, page_size: PAGE_SIZE });
    if (items.label) query.set("label", items.label);
    try {
      const body = await Graft.api(`/batches/${id}/items/?${query}`);
      items.pages = body.pages || 1;
      $("#batch-items").hidden = false;
      drawChips(body.labels);
      $("#item-grid").replaceChildren(...body.results.map(item));
      const what = items.label ? `whose top label is ${items.label}` : "in this batch";
      $("#items-status").textContent = body.count ?
        `${body.count} image${body.count === 1 ? "" : "s"} ${what}, least confident first.` : "No images here.";
      $("#items-pager").hidden = items.pages <= 1;
      $("#items-page").textContent = `Page ${items.page} of ${items.pages}`;
      $("#items-prev").disabled = items.page <= 1;
      $("#items-next").disabled = items.page >= items.pages;
      Graft.showError("#items-error", "");
    } catch (err) {
      Graft.showError("#items-error", err.message);
    }
  }

  function drawChips(labels) {
    const total = Object.values(labels).reduce((a, b) => a + b, 0);
    const chip = (label, count, text) => {
      const b = Graft.el("button", { type: "button", class: "chip", "aria-pressed": String(items.label === label), "data-label": label },
        Graft.el("span", { text }), " ", Graft.el("span", { class: "count", text: String(count) }));
      b.addEventListener("click", () => { items.label = label; items.page = 1; loadItems(); });
      return b;
    };
    $("#item-labels").replaceChildren(chip("", total, "All"), ...Object.entries(labels).map(([l, n]) => chip(l, n, l)));
  }

  function item(r) {
    const pct = r.score == null ? "" : Graft.pct(r.score, 1);
    const caption = r.error ? `${r.file}: ${r.error}` : `${r.file}: ${r.label} ${pct}`;
    const picture = r.thumbnail ?
      Graft.el("button", { type: "button", class: "enlarge", "data-enlarge": r.thumbnail, "data-caption": caption },
        Graft.el("img", { src: r.thumbnail, alt: caption, loading: "lazy", width: 160, height: 160 })) :
      Graft.el("div", { class: "no-thumb", text: r.error ? "unreadable" : "no thumbnail",
        title: r.error ? "" : "Thumbnails are kept for the batch's least confident images" });
    const others = (r.predictions || []).slice(1, 3).map((p) => `${p.label} ${Graft.pct(p.score, 0)}`).join(" · ");
    return Graft.el("li", { class: `batch-item${r.error ? " unreadable" : ""}` },
      Graft.el("figure", {}, picture,
        Graft.el("figcaption", {},
          Graft.el("span", { class: "file-name", text: r.file }),
          r.error ? Graft.el("span", { class: "error-text", text: r.error }) :
            Graft.el("span", { class: "verdict" }, Graft.el("strong", { text: r.label }), ` ${pct}`),
          others ? Graft.el("span", { class: "meta", text: others }) : "")));
  }

  $("#items-prev").addEventListener("click", () => { items.page -= 1; loadItems(); });
  $("#items-next").addEventListener("click", () => { items.page += 1; loadItems(); });

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
