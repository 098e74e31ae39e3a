// Review gallery: one version's images a page at a time (the images API pages on the server),
// filtered by class, split and finder. Relabels and removals are held in the page (and in
// sessionStorage, per version) until "Save as a new version"; dismissals go to the server at once.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const $ = (s) => document.querySelector(s);
  const root = $("#review-root");
  const DATASET = Number(root.dataset.dataset);
  const VERSION = Number(root.dataset.version);
  const CLASSES = JSON.parse($("#review-classes").textContent); // [{name, count, train, val}]
  const NAMES = CLASSES.map((c) => c.name);
  const KEY = `graft:review:${DATASET}:${VERSION}`;
  const FLASH = `graft:review-flash:${DATASET}`;
  const el = Graft.el;
  const plural = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;
  const thumbUrl = (sha) => `/datasets/${DATASET}/images/${sha}.jpg`;
  const base = `/datasets/${DATASET}/versions/${VERSION}`;

  // --- state ---------------------------------------------------------------------------------------
  const params = new URLSearchParams(location.search);
  const filters = {
    finder: params.get("finder") || "",
    label: NAMES.includes(params.get("label")) ? params.get("label") : "",
    split: ["train", "val"].includes(params.get("split")) ? params.get("split") : "",
    page: Math.max(1, Number(params.get("page")) || 1),
    pageSize: [30, 60, 120, 200].includes(Number(params.get("page_size"))) ? Number(params.get("page_size")) : 60,
    dismissed: params.get("dismissed") === "1",
  };
  let findingsStatus = root.dataset.findings;
  let rows = []; // the page's images, as the API gave them
  let pages = 1;
  let focusIndex = 0;
  let anchor = null; // the last image picked: shift selects from it
  const selected = new Set(); // sha256s on this page
  // Pending changes, by sha256: {op: "relabel", from, to, member} | {op: "remove", from, member}.
  let changes = {};
  let undo = []; // [{kind: "change", before: [[sha, entry|null]], words}] | {kind: "dismiss", shas, words}
  try {
    const saved = JSON.parse(sessionStorage.getItem(KEY) || "null");
    if (saved) ({ changes, undo } = saved);
  } catch (_) { /* nothing kept, or unreadable: start clean */ }

  function persist() {
    try {
      if (Object.keys(changes).length || undo.length) sessionStorage.setItem(KEY, JSON.stringify({ changes, undo: undo.slice(-200) }));
      else sessionStorage.removeItem(KEY);
    } catch (_) { /* storage full or off: the page still holds them */ }
  }

  // --- the flash a save leaves for the next page -----------------------------------------------
  const flash = sessionStorage.getItem(FLASH);
  if (flash) {
    sessionStorage.removeItem(FLASH);
    $("#flash").textContent = flash;
    $("#flash").hidden = false;
  }

  // --- filters -------------------------------------------------------------------------------------
  // Short words on the finder chips; the server's full sentence stays as their description.
  const SHORT = {
    flagged: "Flagged", label_issues: "Likely label errors", near_duplicates: "Near-duplicates",
    "cross-class": "Duplicates across classes", "cross-split": "Duplicates across train/val", outliers: "Outliers",
  };
  for (const chip of document.querySelectorAll(".chip.finder")) {
    const words = SHORT[chip.dataset.value];
    if (!words) continue;
    chip.title = chip.firstChild.textContent.trim();
    chip.firstChild.textContent = `${words} `;
  }
  const classChips = $("#class-chips");
  CLASSES.forEach((c, i) => {
    classChips.append(el("button", { type: "button", class: "chip", "data-filter": "label", "data-value": c.name, "aria-pressed": "false", title: i < 9 ? `Relabel shortcut: ${i + 1}` : null },
      c.name, " ", el("span", { class: "count" })));
  });
  const bulk = $("#bulk-relabel");
  NAMES.forEach((name, i) => bulk.append(el("option", { value: name, text: i < 9 ? `${i + 1} · ${name}` : name })));
  $("#help-classes").textContent = NAMES.slice(0, 9).map((n, i) => `${i + 1} ${n}`).join(", ");
  $("#page-size").value = String(filters.pageSize);
  $("#show-dismissed").checked = filters.dismissed;

  function paintChips() {
    for (const chip of document.querySelectorAll(".chip")) {
      chip.setAttribute("aria-pressed", String(filters[chip.dataset.filter] === chip.dataset.value));
    }
    const ready = findingsStatus === "ready";
    for (const chip of document.querySelectorAll(".chip.finder")) chip.disabled = !ready;
  }

  function setCount(filter, value, n) {
    const chip = document.querySelector(`.chip[data-filter="${filter}"][data-value="${CSS.escape(value)}"] .count`);
    if (!chip) return;
    chip.textContent = n == null ? "" : `(${n})`;
    chip.parentElement.classList.toggle("zero", n === 0);
  }

  // Class and split counts are the version's; finder counts follow the class and split chosen.
  async function loadCounts() {
    const inSplit = (c) => (filters.split === "train" ? c.train : filters.split === "val" ? c.val : c.count);
    setCount("label", "", CLASSES.reduce((t, c) => t + inSplit(c), 0));
    for (const c of CLASSES) setCount("label", c.name, inSplit(c));
    const chosen = CLASSES.filter((c) => !filters.label || c.name === filters.label);
    setCount("split", "", chosen.reduce((t, c) => t + c.count, 0));
    setCount("split", "train", chosen.reduce((t, c) => t + (c.train || 0), 0));
    setCount("split", "val", chosen.reduce((t, c) => t + (c.val || 0), 0));
    setCount("finder", "", chosen.reduce((t, c) => t + inSplit(c), 0));
    const finders = [...document.querySelectorAll(".chip.finder")].map((c) => c.dataset.value);
    if (findingsStatus !== "ready") { finders.forEach((f) => setCount("finder", f, null)); return; }
    try {  // one request: the images list counts what each finder filter would show (its facets)
      const page = await Graft.api(`${base}/images/?${query({ finder: "", page: 1, pageSize: 1 })}`);
      finders.forEach((f) => setCount("finder", f, page.facets ? page.facets[f] : null));
    } catch (_) { finders.forEach((f) => setCount("finder", f, null)); }
  }

  function query(overrides = {}) {
    const f = { ...filters, ...overrides };
    const q = new URLSearchParams();
    if (f.label) q.set("label", f.label);
    if (f.split) q.set("split", f.split);
    if (f.finder) q.set("finder", f.finder);
    if (f.dismissed) q.set("dismissed", "1");
    q.set("page", f.page);
    q.set("page_size", f.pageSize);
    return q.toString();
  }

  function remember() {
    const q = new URLSearchParams(query());
    q.set("v", VERSION);
    if (q.get("page") === "1") q.delete("page");
    if (q.get("page_size") === "60") q.delete("page_size");
    history.replaceState(null, "", `?${q}`);
  }

  document.querySelector(".filters").addEventListener("click", (e) => {
    const chip = e.target.closest(".chip");
    if (!chip || chip.disabled) return;
    filters[chip.dataset.filter] = chip.dataset.value;
    filters.page = 1;
    paintChips();
    if (chip.dataset.filter !== "finder") loadCounts();
    loadPage();
  });
  $("#show-dismissed").addEventListener("change", (e) => {
    filters.dismissed = e.target.checked;
    filters.page = 1;
    loadCounts();
    loadPage();
  });
  $("#page-size").addEventListener("change", (e) => {
    filters.pageSize = Number(e.target.value);
    filters.page = 1;
    loadPage();
  });
  $("#version-select").addEventListener("change", (e) => e.target.form.submit());

  // --- the page of images --------------------------------------------------------------------------
  const gallery = $("#gallery");
  let loading = 0;

  async function loadPage({ keepFocus = false } = {}) {
    const mine = ++loading;
    remember();
    gallery.setAttribute("aria-busy", "true");
    $("#gallery-status").textContent = "Loading…";
    let page;
    try {
      page = await Graft.api(`${base}/images/?${query()}`);
    } catch (err) {
      if (mine !== loading) return;
      Graft.showError("#gallery-error", err.message);
      $("#gallery-status").textContent = "";
      gallery.setAttribute("aria-busy", "false");
      return;
    }
    if (mine !== loading) return; // a newer filter won
    Graft.showError("#gallery-error", "");
    if (page.page > page.pages && page.pages >= 1 && filters.page > 1) {
      filters.page = page.pages;
      loadPage({ keepFocus });
      return;
    }
    rows = page.results;
    pages = page.pages;
    selected.clear();
    anchor = null;
    if (!keepFocus) focusIndex = 0;
    focusIndex = Math.min(focusIndex, Math.max(0, rows.length - 1));
    renderPage(page.count);
    gallery.setAttribute("aria-busy", "false");
  }

  function describeFilter() {
    const parts = [];
    const chip = document.querySelector(`.chip[data-filter="finder"][data-value="${CSS.escape(filters.finder)}"]`);
    if (filters.finder && chip) parts.push(chip.firstChild.textContent.trim().toLowerCase());
    if (filters.label) parts.push(`in ${filters.label}`);
    if (filters.split) parts.push(filters.split === "train" ? "training split" : "validation split");
    return parts.length ? ` (${parts.join(", ")})` : "";
  }

  function renderPage(count) {
    const from = count ? (filters.page - 1) * filters.pageSize + 1 : 0;
    const to = Math.min(count, filters.page * filters.pageSize);
    $("#gallery-status").textContent = count
      ? `${from}–${to} of ${plural(count, "image")}${describeFilter()}${filters.finder ? ", most likely first" : ""}.`
      : emptyWords();
    $("#page-info").textContent = `Page ${filters.page} of ${pages}`;
    $("#page-prev").disabled = filters.page <= 1;
    $("#page-next").disabled = filters.page >= pages;
    gallery.replaceChildren(...rows.map((row, i) => tile(row, i)));
    rows.forEach((row, i) => paintTile(i));
    paintSelection();
  }

  function emptyWords() {
    if (filters.finder && findingsStatus === "ready") return `Nothing flagged here${describeFilter()}. Good news.`;
    return `No images${describeFilter()}.`;
  }

  const KIND_WORDS = { "cross-class": "across classes", "cross-split": "across training and validation", "same-class": "in the same class" };

  function findingItems(row) {
    const items = [];
    if (row.label_issue) {
      items.push(el("li", { class: "finding issue" }, "Likely label error: ",
        el("strong", { text: row.label_issue.suggested }), "?",
        el("span", { class: "score", title: "How likely the label is wrong (0–1)", text: ` score ${row.label_issue.score.toFixed(2)}` })));
    }
    for (const d of row.near_duplicates || []) {
      items.push(el("li", { class: `finding dup ${d.kind}` }, `Near-duplicate ${KIND_WORDS[d.kind] || d.kind} `,
        el("span", { class: "score", title: "Cosine similarity of the embeddings", text: `similarity ${d.similarity.toFixed(2)}` })));
    }
    if (row.outlier) {
      items.push(el("li", { class: "finding outlier" }, "Outlier: far from every class ",
        el("span", { class: "score", title: "Distance to the nearest class over that class's typical distance", text: `${row.outlier.score.toFixed(2)}×` })));
    }
    return items;
  }

  function tile(row, i) {
    const findings = findingItems(row);
    const dup = (row.near_duplicates || [])[0];
    const li = el("li", { class: `tile${findings.length ? " flagged" : ""}${dup ? " wide" : ""}`, "data-index": i, "data-sha": row.sha256, "data-member": row.member, tabindex: "-1" });
    const pick = el("label", { class: "tile-pick" },
      el("input", { type: "checkbox", tabindex: "-1", "aria-label": `Select ${row.member}` }),
      el("img", { src: thumbUrl(row.sha256), alt: `${row.member}, labelled ${row.label}`, loading: "lazy", decoding: "async", width: "160", height: "160" }));
    const pics = el("div", { class: "tile-pics" }, pick);
    if (dup) {
      pics.append(el("figure", { class: "partner" },
        el("img", { src: thumbUrl(dup.partner), alt: `Its near-duplicate ${dup.partner_member}`, loading: "lazy", decoding: "async", width: "160", height: "160" }),
        el("figcaption", { title: dup.partner_member }, "Near-duplicate: ", el("span", { class: "member", text: dup.partner_member }))));
    }
    li.append(pics);
    const info = el("div", { class: "tile-info" },
      el("p", { class: "tile-label" }, el("span", { class: "label-now", text: row.label }), " ",
        el("span", { class: "pending-tag" }), " ", el("span", { class: "tag split", text: row.split === "val" ? "validation" : row.split })),
      el("p", { class: "tile-member", title: row.member, text: row.member }));
    if (findings.length) info.append(el("ul", { class: "findings" }, ...findings));
    const actions = el("div", { class: "tile-actions" });
    if (row.label_issue) actions.append(el("button", { type: "button", class: "small", "data-act": "accept", tabindex: "-1", text: `Accept “${row.label_issue.suggested}”` }));
    const relabel = el("select", { class: "small", "data-act": "relabel", tabindex: "-1", "aria-label": `Label of ${row.member}` },
      ...NAMES.map((n) => el("option", { value: n, text: n })));
    actions.append(relabel);
    actions.append(el("button", { type: "button", class: "secondary small", "data-act": "remove", tabindex: "-1", text: "Remove" }));
    if (findings.length) actions.append(el("button", { type: "button", class: "secondary small", "data-act": "dismiss", tabindex: "-1", text: "Dismiss" }));
    info.append(actions);
    li.append(info);
    return li;
  }

  // The parts of a tile that change: pending change, selection, focus, dismissal.
  function paintTile(i) {
    const row = rows[i];
    const node = gallery.children[i];
    if (!row || !node) return;
    const change = changes[row.sha256];
    const removed = change && change.op === "remove";
    const to = change && change.op === "relabel" ? change.to : null;
    node.classList.toggle("pending-remove", !!removed);
    node.classList.toggle("pending-relabel", !!to);
    node.classList.toggle("selected", selected.has(row.sha256));
    node.classList.toggle("dismissed", !!row.dismissed);
    node.querySelector(".tile-pick input").checked = selected.has(row.sha256);
    node.querySelector(".pending-tag").textContent = removed ? "will be removed" : to ? `→ ${to}` : "";
    node.querySelector(".label-now").classList.toggle("struck", !!(removed || to));
    node.querySelector("select[data-act=relabel]").value = to || row.label;
    node.querySelector("[data-act=remove]").textContent = removed ? "Keep" : "Remove";
    const acceptButton = node.querySelector("[data-act=accept]");
    if (acceptButton) {
      const done = to === row.label_issue.suggested;
      acceptButton.textContent = done ? `Accepted “${to}” ✓` : `Accept “${row.label_issue.suggested}”`;
      acceptButton.setAttribute("aria-pressed", String(done));
      acceptButton.classList.toggle("secondary", done);
    }
    const dismiss = node.querySelector("[data-act=dismiss]");
    if (dismiss) dismiss.textContent = row.dismissed ? "Undismiss" : "Dismiss";
    const flags = [];
    if (row.label_issue) flags.push(`likely label error, suggests ${row.label_issue.suggested}`);
    if ((row.near_duplicates || []).length) flags.push("near-duplicate");
    if (row.outlier) flags.push("outlier");
    if (row.dismissed) flags.push("dismissed");
    const pending = removed ? "; pending: remove" : to ? `; pending: relabel to ${to}` : "";
    node.setAttribute("aria-label", `${row.member}, ${row.label}, ${row.split}${flags.length ? `; ${flags.join(", ")}` : ""}${pending}${selected.has(row.sha256) ? "; selected" : ""}`);
    const focused = i === focusIndex;
    node.tabIndex = focused ? 0 : -1;
    for (const control of node.querySelectorAll("input, select, button")) control.tabIndex = focused ? 0 : -1;
  }

  function paintSelection() {
    const n = selected.size;
    $("#selection-count").textContent = n ? `${plural(n, "image")} selected` : "None selected";
    for (const button of document.querySelectorAll("[data-bulk]")) button.disabled = !n;
    $("#select-none").disabled = !n;
  }

  function paintPending() {
    const list = Object.values(changes);
    const relabels = list.filter((c) => c.op === "relabel").length;
    const removals = list.length - relabels;
    $("#pending-count").textContent = list.length
      ? `${plural(list.length, "change")} not saved: ${relabels} relabelled, ${removals} removed.`
      : "No changes yet.";
    $("#pending-bar").classList.toggle("has-changes", list.length > 0);
    $("#save-open").disabled = !list.length;
    $("#discard").disabled = !list.length;
    $("#undo").disabled = !undo.length;
    persist();
  }

  function say(words) {
    $("#action-status").textContent = words;
  }

  // --- focus and selection ---------------------------------------------------------------------------
  function moveFocus(i, { scroll = true } = {}) {
    if (!rows.length) return;
    const old = focusIndex;
    focusIndex = Math.max(0, Math.min(rows.length - 1, i));
    paintTile(old);
    paintTile(focusIndex);
    const node = gallery.children[focusIndex];
    node.focus({ preventScroll: !scroll });
    if (scroll) node.scrollIntoView({ block: "nearest" });
  }

  // The tile above or below: the nearest by horizontal centre in the next row of tiles.
  function verticalNeighbour(dir) {
    const here = gallery.children[focusIndex].getBoundingClientRect();
    const centre = here.left + here.width / 2;
    let best = null;
    let bestScore = Infinity;
    [...gallery.children].forEach((node, i) => {
      const r = node.getBoundingClientRect();
      const ahead = dir > 0 ? r.top >= here.bottom - 2 : r.bottom <= here.top + 2;
      if (!ahead) return;
      const score = Math.abs(dir > 0 ? r.top - here.bottom : here.top - r.bottom) * 10 + Math.abs(r.left + r.width / 2 - centre);
      if (score < bestScore) { bestScore = score; best = i; }
    });
    return best;
  }

  function toggleSelect(i, { range = false } = {}) {
    const sha = rows[i].sha256;
    if (range && anchor != null) {
      const [a, b] = [Math.min(anchor, i), Math.max(anchor, i)];
      for (let k = a; k <= b; k++) selected.add(rows[k].sha256);
      for (let k = a; k <= b; k++) paintTile(k);
    } else {
      if (selected.has(sha)) selected.delete(sha); else selected.add(sha);
      anchor = i;
      paintTile(i);
    }
    paintSelection();
  }

  function selectPage() {
    rows.forEach((r) => selected.add(r.sha256));
    rows.forEach((_, i) => paintTile(i));
    paintSelection();
    say(`Selected the ${plural(rows.length, "image")} on this page.`);
  }

  function clearSelection() {
    selected.clear();
    rows.forEach((_, i) => paintTile(i));
    paintSelection();
  }

  // The images an action applies to: the selection, else the focused one.
  function targets() {
    if (selected.size) return rows.map((r, i) => i).filter((i) => selected.has(rows[i].sha256));
    return rows.length ? [focusIndex] : [];
  }

  // --- changes ---------------------------------------------------------------------------------------
  function applyChange(indices, make, words) {
    const before = [];
    for (const i of indices) {
      const row = rows[i];
      const next = make(row, changes[row.sha256] || null);
      if (next === undefined) continue; // not for this image
      const prev = changes[row.sha256] || null;
      if (JSON.stringify(prev) === JSON.stringify(next)) continue;
      before.push([row.sha256, prev]);
      if (next) changes[row.sha256] = next; else delete changes[row.sha256];
      paintTile(i);
    }
    if (!before.length) {
      say("Nothing to change there.");
      return 0;
    }
    const text = words(before.length);
    undo.push({ kind: "change", before, words: text });
    paintPending();
    say(`${text}. Press U to undo.`);
    return before.length;
  }

  function relabel(indices, to) {
    return applyChange(indices, (row) => (to === row.label ? null : { op: "relabel", from: row.label, to, member: row.member }),
      (n) => `Relabelled ${plural(n, "image")} to ${to}`);
  }

  function accept(indices) {
    const withSuggestion = indices.filter((i) => rows[i].label_issue);
    if (!withSuggestion.length) {
      say(indices.length > 1 ? "None of these images has a suggested label." : "This image has no suggested label.");
      return;
    }
    const accepted = (i) => (changes[rows[i].sha256] || {}).to === rows[i].label_issue.suggested;
    if (withSuggestion.every(accepted)) { // again: take it back
      applyChange(withSuggestion, () => null, (n) => `Took back the suggestion for ${plural(n, "image")}`);
      return;
    }
    applyChange(withSuggestion, (row) => ({ op: "relabel", from: row.label, to: row.label_issue.suggested, member: row.member }),
      (n) => `Accepted the suggestion for ${plural(n, "image")}`);
  }

  function remove(indices) {
    const allRemoved = indices.every((i) => (changes[rows[i].sha256] || {}).op === "remove");
    if (allRemoved) {
      applyChange(indices, () => null, (n) => `Kept ${plural(n, "image")}`);
    } else {
      applyChange(indices, (row) => ({ op: "remove", from: row.label, member: row.member }), (n) => `Marked ${plural(n, "image")} for removal`);
    }
  }

  async function dismiss(indices) {
    const flagged = indices.filter((i) => findingItems(rows[i]).length);
    if (!flagged.length) {
      say("Only flagged images can be dismissed; these have no findings.");
      return;
    }
    const value = !flagged.every((i) => rows[i].dismissed);
    const shas = flagged.map((i) => rows[i].sha256);
    if (await setDismissed(shas, value)) {
      const text = `${value ? "Dismissed" : "Brought back"} the findings of ${plural(shas.length, "image")}`;
      undo.push({ kind: "dismiss", shas, dismissed: value, words: text });
      paintPending();
      say(`${text}.${value ? " They leave the finder's list when you reload; U undoes." : ""}`);
      loadCounts();
    }
  }

  async function setDismissed(shas, value) {
    try {
      await Graft.api(`/datasets/${DATASET}/dismissals/`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sha256s: shas, dismissed: value }),
      });
    } catch (err) {
      say(err.status === 404 || err.status === 405 ? "This server cannot dismiss findings yet." : `Not dismissed: ${err.message}`);
      return false;
    }
    rows.forEach((row, i) => { if (shas.includes(row.sha256)) { row.dismissed = value; paintTile(i); } });
    return true;
  }

  async function undoLast() {
    const last = undo.pop();
    if (!last) { say("Nothing to undo."); return; }
    if (last.kind === "dismiss") {
      if (!(await setDismissed(last.shas, !last.dismissed))) { undo.push(last); return; }
      loadCounts();
    } else {
      for (const [sha, prev] of last.before) {
        if (prev) changes[sha] = prev; else delete changes[sha];
      }
      rows.forEach((_, i) => paintTile(i));
    }
    paintPending();
    say(`Undone: ${last.words.charAt(0).toLowerCase()}${last.words.slice(1)}.`);
  }

  function discardAll() {
    if (!confirm(`Discard ${plural(Object.keys(changes).length, "change")} not saved?`)) return;
    changes = {};
    undo = undo.filter((u) => u.kind === "dismiss");
    rows.forEach((_, i) => paintTile(i));
    paintPending();
    say("Discarded every change not saved.");
  }

  // --- events on the gallery -----------------------------------------------------------------------
  gallery.addEventListener("click", (e) => {
    const node = e.target.closest(".tile");
    if (!node) return;
    const i = Number(node.dataset.index);
    const act = e.target.closest("button[data-act]");
    if (act) {
      moveFocus(i, { scroll: false });
      act.focus();
      if (act.dataset.act === "accept") accept([i]);
      else if (act.dataset.act === "remove") remove([i]);
      else if (act.dataset.act === "dismiss") dismiss([i]);
      return;
    }
    if (e.target.closest(".tile-pick")) {
      e.preventDefault(); // the checkbox follows the state, shift included
      toggleSelect(i, { range: e.shiftKey });
      moveFocus(i, { scroll: false });
      return;
    }
    if (!e.target.closest("select")) moveFocus(i, { scroll: false });
  });
  gallery.addEventListener("change", (e) => {
    const select = e.target.closest("select[data-act=relabel]");
    if (!select) return;
    relabel([Number(select.closest(".tile").dataset.index)], select.value);
  });
  gallery.addEventListener("focusin", (e) => {
    const node = e.target.closest(".tile");
    if (node && Number(node.dataset.index) !== focusIndex) {
      const old = focusIndex;
      focusIndex = Number(node.dataset.index);
      paintTile(old);
      paintTile(focusIndex);
    }
  });

  // --- the toolbar, pager and pending bar ----------------------------------------------------------
  $("#select-page").addEventListener("click", selectPage);
  $("#select-none").addEventListener("click", clearSelection);
  $("#toolbar").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-bulk]");
    if (!button) return;
    const t = targets();
    if (button.dataset.bulk === "accept") accept(t);
    else if (button.dataset.bulk === "remove") remove(t);
    else if (button.dataset.bulk === "dismiss") dismiss(t);
  });
  bulk.addEventListener("change", () => {
    if (bulk.value) relabel(targets(), bulk.value);
    bulk.value = "";
  });
  $("#page-prev").addEventListener("click", () => goPage(filters.page - 1));
  $("#page-next").addEventListener("click", () => goPage(filters.page + 1));
  function goPage(n) {
    if (n < 1 || n > pages || n === filters.page) return;
    filters.page = n;
    loadPage().then(() => { if (rows.length) moveFocus(0, { scroll: false }); window.scrollTo({ top: gallery.offsetTop - 120 }); });
  }
  $("#undo").addEventListener("click", undoLast);
  $("#discard").addEventListener("click", discardAll);

  // --- keyboard ----------------------------------------------------------------------------------------
  const helpDialog = $("#help-dialog");
  const saveDialog = $("#save-dialog");
  $("#help-open").addEventListener("click", () => helpDialog.showModal());

  document.addEventListener("keydown", (e) => {
    if (helpDialog.open || saveDialog.open) return; // the dialog has the keyboard
    const typing = e.target.closest("input:not([type=checkbox]), select, textarea, [contenteditable]");
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "s") {
      e.preventDefault();
      if (Object.keys(changes).length) openSave();
      return;
    }
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z" && !typing) {
      e.preventDefault();
      undoLast();
      return;
    }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    const inGallery = gallery.contains(e.target) || e.target === document.body;
    const key = e.key;
    const handled = () => e.preventDefault();
    if (key === "?") { handled(); helpDialog.showModal(); return; }
    if (key === "[") { handled(); goPage(filters.page - 1); return; }
    if (key === "]") { handled(); goPage(filters.page + 1); return; }
    if (key === "u") { handled(); undoLast(); return; }
    if (!rows.length) return;
    if (key === "j" || (inGallery && key === "ArrowRight")) { handled(); moveFocus(focusIndex + 1); }
    else if (key === "k" || (inGallery && key === "ArrowLeft")) { handled(); moveFocus(focusIndex - 1); }
    else if (inGallery && (key === "ArrowDown" || key === "ArrowUp")) {
      handled();
      const next = verticalNeighbour(key === "ArrowDown" ? 1 : -1);
      if (next != null) moveFocus(next);
    } else if (inGallery && key === "Home") { handled(); moveFocus(0); }
    else if (inGallery && key === "End") { handled(); moveFocus(rows.length - 1); }
    else if (key === "x" || key === "X" || (key === " " && e.target.classList.contains("tile"))) { handled(); toggleSelect(focusIndex, { range: e.shiftKey }); }
    else if (key === "s") { handled(); selectPage(); }
    else if (key === "Escape") { if (selected.size) { handled(); clearSelection(); say("Selection cleared."); } }
    else if (key === "a") { handled(); accept(targets()); }
    else if (key === "r") { handled(); remove(targets()); }
    else if (key === "d") { handled(); dismiss(targets()); }
    else if (/^[1-9]$/.test(key) && Number(key) <= NAMES.length) { handled(); relabel(targets(), NAMES[Number(key) - 1]); }
  });

  // --- saving --------------------------------------------------------------------------------------
  function group(list, keyOf) {
    const groups = new Map();
    for (const c of list) {
      const k = keyOf(c);
      if (!groups.has(k)) groups.set(k, []);
      groups.get(k).push(c);
    }
    return [...groups.entries()].sort((a, b) => b[1].length - a[1].length);
  }

  function memberList(items) {
    const shown = items.slice(0, 12).map((c) => el("li", {}, el("code", { text: c.member })));
    if (items.length > 12) shown.push(el("li", { class: "meta", text: `and ${items.length - 12} more` }));
    return el("ul", { class: "members" }, ...shown);
  }

  function summary() {
    const list = Object.values(changes);
    const relabels = list.filter((c) => c.op === "relabel");
    const removals = list.filter((c) => c.op === "remove");
    const box = el("div", { class: "summary" });
    if (relabels.length) {
      box.append(el("h3", { text: `Relabel ${plural(relabels.length, "image")}` }));
      const ul = el("ul", { class: "change-groups", id: "summary-relabels" });
      for (const [key, items] of group(relabels, (c) => `${c.from}\u0000${c.to}`)) {
        const [from, to] = key.split("\u0000");
        ul.append(el("li", { "data-from": from, "data-to": to, "data-count": items.length },
          el("details", {}, el("summary", {}, el("span", { class: "from", text: from }), " → ", el("strong", { class: "to", text: to }), ` · ${plural(items.length, "image")}`), memberList(items))));
      }
      box.append(ul);
    }
    if (removals.length) {
      box.append(el("h3", { text: `Remove ${plural(removals.length, "image")}` }));
      const ul = el("ul", { class: "change-groups", id: "summary-removals" });
      for (const [from, items] of group(removals, (c) => c.from)) {
        ul.append(el("li", { "data-from": from, "data-count": items.length },
          el("details", {}, el("summary", {}, `from ${from} · ${plural(items.length, "image")}`), memberList(items))));
      }
      box.append(ul);
    }
    // What each class will hold, as far as the page knows (the version's counts and these changes).
    const delta = Object.fromEntries(NAMES.map((n) => [n, 0]));
    for (const c of list) {
      delta[c.from] -= 1;
      if (c.op === "relabel") delta[c.to] += 1;
    }
    const table = el("table", { class: "class-delta", id: "summary-classes" },
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Class" }), el("th", { scope: "col", text: "Now" }), el("th", { scope: "col", text: "After" }))),
      el("tbody", {}, ...CLASSES.map((c) => el("tr", { class: delta[c.name] ? "changed" : "" },
        el("th", { scope: "row", text: c.name }), el("td", { text: c.count }), el("td", { text: `${c.count + delta[c.name]}${delta[c.name] ? ` (${delta[c.name] > 0 ? "+" : ""}${delta[c.name]})` : ""}` })))));
    box.append(el("h3", { text: "Images per class" }), table);
    return box;
  }

  let opener = null;
  function openSave() {
    opener = document.activeElement;
    $("#save-summary").replaceChildren(summary());
    Graft.showError("#save-error", "");
    $("#save-confirm").disabled = false;
    $("#save-confirm").textContent = "Save version";
    saveDialog.showModal();
    $("#save-note").focus();
  }
  $("#save-open").addEventListener("click", openSave);
  $("#save-cancel").addEventListener("click", () => saveDialog.close());
  saveDialog.addEventListener("close", () => { if (opener && opener.isConnected) opener.focus(); });
  helpDialog.addEventListener("close", () => { const node = gallery.children[focusIndex]; if (node) node.focus({ preventScroll: true }); });
  $("#save-form").addEventListener("submit", (e) => { e.preventDefault(); save(); });
  $("#save-confirm").addEventListener("click", save);

  async function save() {
    const button = $("#save-confirm");
    if (button.disabled) return;
    const list = Object.entries(changes);
    const body = {
      parent: VERSION,
      relabel: Object.fromEntries(list.filter(([, c]) => c.op === "relabel").map(([sha, c]) => [sha, c.to])),
      remove: list.filter(([, c]) => c.op === "remove").map(([sha]) => sha),
      note: $("#save-note").value.trim(),
    };
    button.disabled = true;
    button.textContent = "Saving…";
    Graft.showError("#save-error", "");
    try {
      const v = await Graft.api(`/datasets/${DATASET}/versions/`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      sessionStorage.removeItem(KEY);
      const s = v.summary || {};
      sessionStorage.setItem(FLASH, `Saved version ${v.number}: ${s.relabelled || 0} relabelled, ${s.removed || 0} removed, ${plural(v.num_images, "image")} in all. The finders are looking at it now.`);
      changes = {};
      undo = [];
      location.assign(`/datasets/${DATASET}/review/?v=${v.number}`);
    } catch (err) {
      button.disabled = false;
      button.textContent = "Save version";
      await explain(err);
    }
  }

  // A refusal is explained and nothing is lost: the changes stay in this tab.
  async function explain(err) {
    const box = $("#save-error");
    box.replaceChildren();
    box.hidden = false;
    if (err.status !== 409) {
      box.append(el("p", { text: `Not saved: ${err.message}` }), el("p", { text: "Your changes are still here; adjust them and save again." }));
      return;
    }
    box.append(el("p", { text: `Not saved: ${err.message}` }));
    let newest = null;
    try {
      const list = await Graft.api(`/datasets/${DATASET}/versions/`);
      newest = list.find((v) => v.status === "ready");
      const busy = list.find((v) => v.status === "processing");
      if (busy) {
        box.append(el("p", { text: `Your ${plural(Object.keys(changes).length, "change")} stay in this tab; save again when version ${busy.number} is ready.` }));
        return;
      }
    } catch (_) { /* the sentence above still says what happened */ }
    if (newest && newest.number !== VERSION) {
      const move = el("button", { type: "button", class: "secondary", id: "save-move", text: `Take my changes to version ${newest.number}` });
      move.addEventListener("click", () => {
        const target = `graft:review:${DATASET}:${newest.number}`;
        let theirs = {};
        try { theirs = (JSON.parse(sessionStorage.getItem(target) || "null") || {}).changes || {}; } catch (_) { /* none */ }
        sessionStorage.setItem(target, JSON.stringify({ changes: { ...theirs, ...changes }, undo: [] }));
        sessionStorage.removeItem(KEY);
        sessionStorage.setItem(FLASH, `Your changes from version ${VERSION} are pending on version ${newest.number}: check them, then save.`);
        location.assign(`/datasets/${DATASET}/review/?v=${newest.number}`);
      });
      box.append(el("p", { text: `Version ${newest.number} is newer than the one you reviewed (${VERSION}). Your changes are kept: take them to version ${newest.number}, check them there, and save.` }), move);
    } else {
      box.append(el("p", { text: "Your changes are kept in this tab; try again in a moment." }));
    }
  }

  // --- the finders' state ---------------------------------------------------------------------------
  function paintFindings(v) {
    const box = $("#findings-state");
    findingsStatus = v.findings_status;
    box.replaceChildren();
    box.className = "notice";
    if (findingsStatus === "queued" || findingsStatus === "running") {
      box.append(el("span", { class: "spinner", "aria-hidden": "true" }),
        findingsStatus === "queued"
          ? "The finders are queued for this version. The finder filters open when they are done; this page updates by itself."
          : "Looking for likely label errors, near-duplicates and outliers… The finder filters open when they are done; this page updates by itself.");
    } else if (findingsStatus === "failed") {
      box.className = "error";
      const why = v.findings_error || "The finders failed on this version.";
      box.append(`${/^the finders/i.test(why) ? why : `The finders failed on this version: ${why}`} `,
        el("button", { type: "button", class: "link", id: "findings-rerun", text: "Run them again" }));
    } else if (findingsStatus === "none") {
      box.append("The finders have not looked at this version. ",
        el("button", { type: "button", class: "link", id: "findings-rerun", text: "Run them" }));
    }
    box.hidden = !box.childNodes.length;
    paintChips();
  }

  $("#findings-state").addEventListener("click", async (e) => {
    if (!e.target.closest("#findings-rerun")) return;
    try {
      paintFindings(await Graft.api(`${base}/findings/`, { method: "POST" }));
      followFindings();
    } catch (err) {
      Graft.showError("#gallery-error", err.message);
    }
  });

  function followFindings() {
    Graft.poll(async () => {
      const v = await Graft.api(`${base}/`);
      const was = findingsStatus;
      paintFindings(v);
      const done = !(v.findings_status === "queued" || v.findings_status === "running");
      if (done && was !== v.findings_status) {
        loadCounts();
        loadPage({ keepFocus: true });
        if (v.findings_status === "ready") say("The finders are done: the finder filters are open.");
      }
      return done;
    }, 2500, "#gallery-error");
  }

  // --- start -------------------------------------------------------------------------------------
  paintChips();
  paintSelection();
  paintPending();
  if (Object.keys(changes).length) say(`${plural(Object.keys(changes).length, "change")} kept from before the reload.`);
  paintFindings({ findings_status: findingsStatus, findings_error: "" });
  if (findingsStatus === "failed") Graft.api(`${base}/`).then(paintFindings).catch(() => {});
  if (findingsStatus === "queued" || findingsStatus === "running") followFindings();
  if (filters.finder && findingsStatus !== "ready") filters.finder = "";
  paintChips();
  loadCounts();
  loadPage();
});
