// Model page: the "try it" box posts an image to the prediction endpoint and draws top-k bars;
// "use it" shows one example program at a time (all of them without JavaScript).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const id = document.getElementById("model-root").dataset.model;
  const $ = (s) => document.querySelector(s);
  const list = $("#predictions");
  let latest = 0;

  async function predict(file) {
    const ticket = ++latest; // a slower, older answer must not overwrite a newer one
    Graft.showError("#try-error", "");
    list.replaceChildren(Graft.el("li", { class: "pending", text: "Predicting…" }));
    const preview = $("#try-preview");
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.alt = `The image you chose: ${file.name}`;
    preview.hidden = false;
    const form = new FormData();
    form.append("image", file);
    form.append("k", "5");
    try {
      const body = await Graft.api(`/models/${id}/predict/`, { method: "POST", body: form });
      document.dispatchEvent(new CustomEvent("graft:predicted")); // the prediction log refreshes soon
      if (ticket !== latest) return;
      const top = body.predictions[0];
      list.replaceChildren(...top.map((p) => {
        const bar = Graft.el("span", { class: "bar" });
        bar.style.width = `${Math.max(1, p.score * 100)}%`;
        return Graft.el("li", { class: "prediction" },
          Graft.el("span", { class: "label", text: p.label }),
          Graft.el("span", { class: "track" }, bar),
          Graft.el("span", { class: "score", text: Graft.pct(p.score) }));
      }));
    } catch (err) {
      if (ticket !== latest) return;
      list.replaceChildren();
      Graft.showError("#try-error", err.message);
    }
  }

  $("#try-input").addEventListener("change", (e) => {
    if (e.target.files[0]) predict(e.target.files[0]);
    e.target.value = ""; // choosing the same image again must predict again
  });
  if ($("#try-input").files[0]) predict($("#try-input").files[0]); // chosen before this script ran
  Graft.dropzone($("#try-drop"), $("#try-input"), (e) => { if (e.dataTransfer.files[0]) predict(e.dataTransfer.files[0]); });

  const picker = $("#snippet-picker");
  const choices = [...picker.querySelectorAll("[aria-controls]")];
  function show(chosen) {
    for (const b of choices) {
      b.setAttribute("aria-pressed", String(b === chosen));
      document.getElementById(b.getAttribute("aria-controls")).hidden = b !== chosen;
    }
  }
  picker.addEventListener("click", (e) => {
    const chosen = e.target.closest("[aria-controls]");
    if (!chosen) return;
    show(chosen);
    try { localStorage.setItem("graft.snippet", chosen.textContent); } catch (_) { /* private mode */ }
  });
  let remembered = null;
  try { remembered = localStorage.getItem("graft.snippet"); } catch (_) { /* private mode */ }
  show(choices.find((b) => b.textContent === remembered) || choices[0]);
  picker.hidden = false;

  // While the int8 model waits for a worker or is being made, look every few seconds; when that
  // changes, the section is replaced by the page's own (being made; kept or refused, with its
  // figures), and the bundle's size with it.
  async function watchInt8() {
    const shown = $("#int8")?.dataset.status;
    if (shown !== "pending" && shown !== "running") return;
    try {
      const body = await Graft.api(`/models/${id}/`);
      if (body.int8_status !== shown) {
        const page = new DOMParser().parseFromString(await (await fetch(location.href)).text(), "text/html");
        for (const sel of ["#int8", "#bundle-size"]) {
          const fresh = page.querySelector(sel);
          if (fresh) $(sel).replaceWith(fresh);
        }
      }
    } catch (_) { /* offline for a moment: look again */ }
    setTimeout(watchInt8, 3000);
  }
  setTimeout(watchInt8, 3000);
});
