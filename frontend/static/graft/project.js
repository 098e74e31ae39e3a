// Project page: rename a model in place (PATCH /models/{id}/), pick two models to compare (the older
// one is A, the newer B, so the deltas read "what the newer model changed"), and follow jobs training now.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const $ = (s, root = document) => root.querySelector(s);

  // --- rename --------------------------------------------------------------------------------------
  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-rename]");
    if (button) startRename(button.closest(".tl-model"), button);
  });

  function startRename(row, button) {
    const link = $(".model-name", row);
    if (!link || $("form.rename", row)) return;
    const input = Graft.el("input", { type: "text", value: link.textContent.trim(), maxlength: "200",
      "aria-label": "New name", class: "rename-input", required: "" });
    const save = Graft.el("button", { type: "submit", class: "small", text: "Save" });
    const cancel = Graft.el("button", { type: "button", class: "small secondary", text: "Cancel" });
    const form = Graft.el("form", { class: "rename" }, input, save, cancel);
    link.hidden = true;
    button.hidden = true;
    link.after(form);
    input.focus();
    input.select();
    const close = () => { form.remove(); link.hidden = false; button.hidden = false; button.focus(); };
    cancel.addEventListener("click", close);
    input.addEventListener("keydown", (e) => { if (e.key === "Escape") { e.preventDefault(); close(); } });
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      save.disabled = true;
      try {
        const model = await Graft.api(`/models/${row.dataset.model}/`, {
          method: "PATCH",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ name: input.value }),
        });
        link.textContent = model.name;
        button.setAttribute("aria-label", `Rename ${model.name}`);
        Graft.showError("#rename-error", "");
        close();
      } catch (err) {
        Graft.showError("#rename-error", err.message);
        save.disabled = false;
        input.focus();
      }
    });
  }

  // --- compare two -------------------------------------------------------------------------------
  const bar = $("#compare-bar");
  const go = $("#compare-go");
  const boxes = () => [...document.querySelectorAll('input[name="compare"]')];

  function update(changed) {
    let picked = boxes().filter((b) => b.checked);
    if (picked.length > 2 && changed) { // keep the newest tick and the one before it
      const keep = picked.filter((b) => b !== changed).slice(-1).concat([changed]);
      picked.forEach((b) => { b.checked = keep.includes(b); });
      picked = keep;
    }
    for (const b of boxes()) b.closest(".tl-model").classList.toggle("picked", b.checked);
    const status = $("#compare-status");
    if (picked.length === 2) {
      const [a, b] = [...picked].sort((x, y) => Number(x.dataset.created) - Number(y.dataset.created) || Number(x.value) - Number(y.value));
      go.href = `/models/compare/?a=${a.value}&b=${b.value}`;
      go.removeAttribute("aria-disabled");
      status.textContent = `Compare ${nameOf(a)} (older) with ${nameOf(b)}.`;
      bar.classList.add("ready");
    } else {
      go.href = "#";
      go.setAttribute("aria-disabled", "true");
      status.textContent = picked.length === 1 ? `${nameOf(picked[0])} picked: tick one more.` : "Tick two models to compare them.";
      bar.classList.remove("ready");
    }
  }

  function nameOf(box) { return `“${$(".model-name", box.closest(".tl-model")).textContent.trim()}”`; }

  // --- jobs training now: their state live; the page reloads with the model once one ends ------------
  for (const li of document.querySelectorAll(".tl-job[data-job]")) {
    Graft.poll(async () => {
      const job = await Graft.api(`/jobs/${li.dataset.job}/`);
      const badge = $(".badge", li);
      badge.textContent = job.status;
      badge.className = `badge ${job.status}`;
      $(".job-state", li).textContent = job.status === "running" ?
        `${(job.phase || "training").replace(/_/g, " ")}, ${Math.round(100 * (job.progress || 0))}%` :
        job.status === "queued" ? "waiting for a worker" : "";
      if (["queued", "running"].includes(job.status)) return false;
      window.location.reload();
      return true;
    }, 3000);
  }

  for (const b of boxes()) b.addEventListener("change", () => update(b));
  go.addEventListener("click", (e) => { if (go.getAttribute("aria-disabled")) e.preventDefault(); });
  update(null);
});
