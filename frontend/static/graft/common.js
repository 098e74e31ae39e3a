// Shared helpers for Graft's pages: API calls with the session's CSRF token, readable errors, formatting.
"use strict";

window.Graft = (() => {
  function csrfToken() {
    const m = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return m ? decodeURIComponent(m[1]) : "";
  }

  // Turn any failed response into one sentence for the page (never raw JSON).
  async function errorSentence(response) {
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") return body.error;
      if (body && typeof body.detail === "string") return body.detail;
    } catch (_) { /* not JSON */ }
    if (response.status === 413) return "The file is over the upload size limit.";
    if (response.status === 403) return "You are signed out or not allowed to do that. Sign in again and retry.";
    if (response.status === 404) return "That no longer exists (it may have been deleted).";
    if (response.status >= 500) return "The server had a problem. Try again in a moment.";
    return `The request failed (HTTP ${response.status}).`;
  }

  async function api(path, options = {}) {
    const headers = { "X-CSRFToken": csrfToken(), Accept: "application/json", ...(options.headers || {}) };
    let response;
    try {
      response = await fetch(`/api/v1${path}`, { credentials: "same-origin", ...options, headers });
    } catch (_) {
      throw new Error("Graft cannot be reached. Check your connection; the page will retry.");
    }
    if (!response.ok) {
      const error = new Error(await errorSentence(response));
      error.status = response.status;
      throw error;
    }
    return response.status === 204 ? null : response.json();
  }

  // POST a FormData with upload progress (fetch cannot report it): resolves to the JSON body,
  // rejects with one sentence (and .status) as `api` does. onProgress(sent, total) as bytes go up.
  function upload(path, form, onProgress = () => {}) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `/api/v1${path}`);
      xhr.setRequestHeader("X-CSRFToken", csrfToken());
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); });
      xhr.addEventListener("load", async () => {
        if (xhr.status >= 200 && xhr.status < 300) {
          try { resolve(xhr.status === 204 ? null : JSON.parse(xhr.responseText)); } catch (_) { resolve(null); }
          return;
        }
        const error = new Error(await errorSentence(new Response(xhr.responseText, { status: xhr.status })));
        error.status = xhr.status;
        reject(error);
      });
      xhr.addEventListener("error", () => reject(new Error("The upload stopped: Graft cannot be reached. Check your connection and try again.")));
      xhr.addEventListener("abort", () => reject(new Error("The upload was stopped.")));
      xhr.send(form);
    });
  }

  function bytes(n) {
    if (n < 1024) return `${n} B`;
    const units = ["KB", "MB", "GB", "TB"];
    let i = -1;
    do { n /= 1000; i++; } while (n >= 1000 && i < units.length - 1);
    return `${n.toFixed(1)} ${units[i]}`;
  }

  function duration(seconds) {
    if (!isFinite(seconds) || seconds < 0) return "";
    if (seconds < 60) return `${Math.round(seconds)} s`;
    const m = Math.floor(seconds / 60);
    return m < 60 ? `${m} min ${Math.round(seconds % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  function pct(x, digits = 1) { return x == null ? "—" : `${(100 * x).toFixed(digits)}%`; }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (v !== undefined && v !== null) node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function showError(target, message) {
    const node = typeof target === "string" ? document.querySelector(target) : target;
    if (!node) return;
    node.textContent = message || "";
    node.hidden = !message;
  }

  // Copy buttons: <button data-copy="#selector">
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.dataset.copy);
    try {
      await navigator.clipboard.writeText(source.textContent.trim());
      button.textContent = "Copied";
    } catch (_) {
      const range = document.createRange();
      range.selectNodeContents(source);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 2500);
  });

  // A drop zone: highlights while dragged over, hands the drop event to `onDrop`, and opens the
  // file picker `input` from the keyboard (Enter or Space).
  function dropzone(zone, input, onDrop) {
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      onDrop(e);
    });
    zone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
    });
  }

  // Poll `fn` every `ms` until it returns true. Network trouble backs off and says so;
  // a 403/404 (signed out, deleted) stops polling with the sentence in `errorTarget`.
  function poll(fn, ms = 1500, errorTarget = null) {
    let delay = ms;
    const tick = async () => {
      try {
        if (await fn()) return;
        delay = ms;
        if (errorTarget) showError(errorTarget, "");
      } catch (err) {
        if (errorTarget) showError(errorTarget, err.message);
        if (err.status === 403 || err.status === 404) return;
        delay = Math.min(delay * 2, 15000);
      }
      setTimeout(tick, delay);
    };
    tick();
  }

  return { api, upload, errorSentence, bytes, duration, pct, el, showError, csrfToken, poll, dropzone };
})();

// A form that destroys something (Delete dataset, model, job) asks first: its data-confirm sentence.
document.addEventListener("submit", (e) => {
  const form = e.target;
  if (form instanceof HTMLFormElement && form.dataset.confirm && !confirm(form.dataset.confirm)) e.preventDefault();
});
