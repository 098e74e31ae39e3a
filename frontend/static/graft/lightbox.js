// Enlarge on click: any <button data-enlarge="URL" data-caption="..."> opens the page's
// <dialog id="lightbox"> (templates/web/_lightbox.html) with that image; Escape or a click outside closes it.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const dialog = document.getElementById("lightbox");
  if (!dialog) return;
  const img = document.getElementById("lightbox-img");
  const caption = document.getElementById("lightbox-caption");
  let opener = null;

  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-enlarge]");
    if (!button) return;
    event.preventDefault();
    opener = button;
    img.src = button.dataset.enlarge;
    img.alt = button.dataset.caption || "";
    caption.textContent = button.dataset.caption || "";
    dialog.showModal();
  });
  // A click on the backdrop lands on the dialog itself (its content covers the rest).
  dialog.addEventListener("click", (event) => { if (event.target === dialog) dialog.close(); });
  dialog.addEventListener("close", () => { img.removeAttribute("src"); if (opener) opener.focus(); });
});
