// Label queue: the project's kept prediction images, least certain first (GET /projects/{id}/label-queue/).
// A label per image by a click or a key (1–9 = class N), skip, a label for a whole selection; the
// labels wait here (across pages) until "Add N labelled images as a new version" (POST), whose
// ingestion the page follows (GET /datasets/{id}/versions/{n}/) before it offers Retrain.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const $ = (s, root = document) => root.querySelector(s);
  const root = $("#label-root");
  const project = root.dataset.project;
  const classes = JSON.parse($("#label-classes").textContent);
  const grid = $("#label-grid");
  const PAGE_SIZE = 24;
  const pending = new Map(); // prediction id -> class
  const skipped = new Set();
  const selected = new Set();
  let page = 1;
  let pages = 1;
  let rows = [];

  function pct(x) { return x == null ? "—" : `${Math.round(100 * x)}%`; }

  function ago(iso) {
    const s = (Date.now() - Date.parse(iso)) / 1000;
    if (!isFinite(s)) return "";
    if (s < 90) return "just now";
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 129600) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} days ago`;
  }

  function tile(r) {
    const box = Graft.el("input", { type: "checkbox", "aria-label": `Select the image the model called ${r.label}` });
    box.checked = selected.has(r.id);
    box.addEventListener("change", () => { toggleSelect(r.id, box.checked); });
    const caption = `Prediction ${r.id}: ${r.model_name} said ${r.label} (${pct(r.score)})`;
    const pic = Graft.el("div", { class: "tile-pics" },
      Graft.el("label", { class: "tile-pick" }, box, Graft.el("img", { src: r.image, alt: caption, loading: "lazy", width: 180, height: 180 })),
      Graft.el("button", { type: "button", class: "enlarge-corner small secondary", "data-enlarge": r.image, "data-caption": caption,
        "aria-label": "Enlarge", title: "Enlarge" }, "⤢"));
    const guess = Graft.el("p", { class: "guess" }, "Model says ", Graft.el("strong", { class: "guess-label", text: r.label }),
      ` ${pct(r.score)}`);
    const margin = Graft.el("p", { class: "meta" },
      Graft.el("span", { class: "margin", title: "Top score minus the next: small means unsure", text: `margin ${r.margin == null ? "—" : r.margin.toFixed(2)}` }),
      ` · ${ago(r.created_at)}`);
    const from = Graft.el("p", { class: "meta model-of", text: r.model_name });
    const tag = Graft.el("p", { class: "pending-tag", "aria-live": "polite" });
    const buttons = Graft.el("div", { class: "class-buttons", role: "group", "aria-label": "True class" },
      ...classes.map((c, i) => {
        const b = Graft.el("button", { type: "button", class: "chip class-chip", "data-class": c, "aria-pressed": "false",
          title: i < 9 ? `${c} (key ${i + 1})` : c });
        if (i < 9) b.append(Graft.el("kbd", { text: String(i + 1) }), " ");
        b.append(Graft.el("span", { class: "class-name", text: c }));
        b.addEventListener("click", () => setLabel(r.id, pending.get(r.id) === c ? null : c));
        return b;
      }),
      Graft.el("button", { type: "button", class: "chip skip-chip", text: "Skip", title: "Skip (key S)" }));
    buttons.lastChild.addEventListener("click", () => skip(r.id));
    const li = Graft.el("li", { class: "label-tile", tabindex: "0", "data-id": r.id },
      pic, Graft.el("div", { class: "tile-info" }, guess, margin, from, tag), buttons);
    paint(li);
    return li;
  }

  function tileOf(id) { return grid.querySelector(`[data-id="${id}"]`); }

  function paint(li) {
    const id = Number(li.dataset.id);
    const label = pending.get(id);
    li.classList.toggle("labelled", !!label);
    li.classList.toggle("skipped", skipped.has(id) && !label);
    li.classList.toggle("selected", selected.has(id));
    $("input[type=checkbox]", li).checked = selected.has(id);
    for (const b of li.querySelectorAll(".class-chip")) b.setAttribute("aria-pressed", String(b.dataset.class === label));
    $(".pending-tag", li).textContent = label ? `→ ${label}` : skipped.has(id) ? "skipped" : "";
  }

  function setLabel(id, label) {
    if (label) { pending.set(id, label); skipped.delete(id); } else pending.delete(id);
    const li = tileOf(id);
    if (li) paint(li);
    summary();
  }

  function skip(id) {
    pending.delete(id);
    skipped.add(id);
    const li = tileOf(id);
    if (li) { paint(li); focusNext(li); }
    summary();
  }

  function toggleSelect(id, on) {
    if (on) selected.add(id); else selected.delete(id);
    const li = tileOf(id);
    if (li) paint(li);
    summary();
  }

  function focusNext(li) {
    const next = li.nextElementSibling;
    if (next) next.focus();
  }

  function summary() {
    const n = pending.size;
    $("#labelled-count").textContent = `${n} labelled`;
    const per = {};
    for (const c of pending.values()) per[c] = (per[c] || 0) + 1;
    $("#labelled-detail").textContent = Object.entries(per).map(([c, k]) => `${c} ${k}`).join(" · ");
    const add = $("#add-version");
    add.disabled = n === 0;
    add.textContent = `Add ${n} labelled image${n === 1 ? "" : "s"} as a new version`;
    $("#label-bar").classList.toggle("has-changes", n > 0);
    $("#selection-count").textContent = `${selected.size} selected`;
    $("#bulk-class").disabled = selected.size === 0;
  }

  async function load() {
    try {
      const body = await Graft.api(`/projects/${project}/label-queue/?page=${page}&page_size=${PAGE_SIZE}`);
      rows = body.results;
      pages = body.pages || 1;
      if (page > pages) { page = pages; return load(); }
      grid.replaceChildren(...rows.map(tile));
      Graft.showError("#queue-error", "");
      const status = $("#queue-status");
      if (!body.count) {
        status.replaceChildren(Graft.el("span", { class: "empty", text:
          "Nothing waits for a label. Turn on “keep the images” in a model's prediction log; the images it answers come here." }));
      } else {
        status.textContent = `${body.count} image${body.count === 1 ? "" : "s"} wait${body.count === 1 ? "s" : ""} for a label, least certain first.`;
      }
      $("#queue-pager").hidden = pages <= 1;
      $("#page-of").textContent = `Page ${page} of ${pages}`;
      $("#prev-page").disabled = page <= 1;
      $("#next-page").disabled = page >= pages;
      summary();
    } catch (err) {
      Graft.showError("#queue-error", err.message);
    }
  }

  // Keys act on the focused image.
  grid.addEventListener("keydown", (e) => {
    const li = e.target.closest(".label-tile");
    if (!li || e.target !== li || e.ctrlKey || e.metaKey || e.altKey) return;
    const id = Number(li.dataset.id);
    const n = Number(e.key);
    if (e.key >= "1" && e.key <= "9" && n <= classes.length) {
      e.preventDefault();
      setLabel(id, classes[n - 1]);
      focusNext(li);
    } else if (e.key === "0" || e.key === "Backspace") {
      e.preventDefault();
      setLabel(id, null);
    } else if (e.key === "s" || e.key === "S") {
      e.preventDefault();
      skip(id);
    } else if (e.key === "x" || e.key === "X" || e.key === " ") {
      e.preventDefault();
      toggleSelect(id, !selected.has(id));
    } else if (e.key === "ArrowRight" || e.key === "ArrowDown") {
      e.preventDefault();
      focusNext(li);
    } else if (e.key === "ArrowLeft" || e.key === "ArrowUp") {
      e.preventDefault();
      if (li.previousElementSibling) li.previousElementSibling.focus();
    }
  });

  $("#bulk-class").addEventListener("change", (e) => {
    const c = e.target.value;
    if (!c) return;
    for (const id of selected) pending.set(id, c), skipped.delete(id);
    selected.clear();
    e.target.value = "";
    for (const li of grid.children) paint(li);
    summary();
  });
  $("#select-page").addEventListener("click", () => { rows.forEach((r) => selected.add(r.id)); for (const li of grid.children) paint(li); summary(); });
  $("#select-none").addEventListener("click", () => { selected.clear(); for (const li of grid.children) paint(li); summary(); });
  $("#prev-page").addEventListener("click", () => { page -= 1; load(); });
  $("#next-page").addEventListener("click", () => { page += 1; load(); });

  $("#add-version").addEventListener("click", async () => {
    const add = $("#add-version");
    add.disabled = true;
    const labels = Object.fromEntries(pending);
    try {
      const made = await Graft.api(`/projects/${project}/label-queue/`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ labels, note: $("#version-note").value.trim() }),
      });
      const count = pending.size;
      pending.clear();
      selected.clear();
      $("#version-note").value = "";
      follow(made.version, count);
      load();
    } catch (err) {
      Graft.showError("#queue-error", err.message);
      add.disabled = false;
    }
  });

  // The new version is ingested in the background: follow it until it is ready, then offer Retrain.
  function follow(number, count) {
    const section = $("#version-progress");
    section.hidden = false;
    $("#version-done").hidden = true;
    $("#version-bar").hidden = false;
    $("#version-bar").removeAttribute("value");
    $("#h-version").textContent = `Version ${number}`;
    const started = Date.now();
    section.scrollIntoView({ block: "nearest" });
    Graft.poll(async () => {
      const v = await Graft.api(`/datasets/${project}/versions/${number}/`);
      const took = Graft.duration((Date.now() - started) / 1000) || "0 s";
      if (v.status === "ready") {
        const added = (v.summary && v.summary.added) || 0;
        $("#version-status").replaceChildren(Graft.el("span", { class: "badge ready", text: "ready" }),
          ` Version ${number} holds ${v.num_images} images: ${added} of your ${count} labelled image${count === 1 ? "" : "s"} added` +
          `${added < count ? " (the others were already in the dataset)" : ""}.`);
        $("#version-bar").hidden = true;
        $("#version-done").hidden = false;
        const retrain = $("#retrain");
        if (retrain) retrain.textContent = `Retrain on version ${number}`;
        return true;
      }
      if (v.status === "failed") {
        $("#version-bar").hidden = true;
        $("#version-status").textContent = "";
        Graft.showError("#version-error", v.error || "The new version could not be made.");
        return true;
      }
      $("#version-status").replaceChildren(Graft.el("span", { class: "spinner", "aria-hidden": "true" }),
        `Adding ${count} image${count === 1 ? "" : "s"} to version ${number}: checking, de-duplicating and indexing them… (${took})`);
      return false;
    }, 1000, "#version-error");
  }

  load();
});
