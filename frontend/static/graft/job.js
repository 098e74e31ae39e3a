// Job page: the result first (accuracy, per class, confusion, misclassified images), then live progress
// (the engine's step in words, its ETA and why the plan grew), sanity checks in plain words, why this plan,
// curves named for what they plot, LR, and a log that follows its newest line.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("job-root");
  const id = root.dataset.job;
  const $ = (s) => document.querySelector(s);
  const FINAL = ["succeeded", "failed", "cancelled"];
  let curveChart = null;
  let lrChart = null;
  let shownResults = false;
  let shownDecisions = false;

  function chart(existing, canvas, config) {
    if (existing) {
      existing.data = config.data;
      existing.options = config.options;
      existing.update("none");
      return existing;
    }
    return new Chart(canvas, config);
  }

  function drawCurves(history) {
    const epochs = history.filter((r) => r.phase === "finetune");
    const probe = history.filter((r) => r.phase === "probe");
    const canvas = $("#curve-chart");
    if (epochs.length) {
      $("#curves-section").hidden = false;
      $("#h-curves").textContent = "Fine-tuning: loss and accuracy per epoch";
      const labels = epochs.map((r) => r.epoch);
      curveChart = chart(curveChart, canvas, {
        type: "line",
        data: {
          labels,
          datasets: [
            { label: "train loss", data: epochs.map((r) => r.train_loss), borderColor: "#3d6fd9", yAxisID: "loss" },
            { label: "held-out loss", data: epochs.map((r) => r.heldout_loss), borderColor: "#d9573d", yAxisID: "loss" },
            { label: "train accuracy", data: epochs.map((r) => r.train_accuracy), borderColor: "#3d6fd9", borderDash: [5, 4], yAxisID: "acc" },
            { label: "held-out accuracy", data: epochs.map((r) => r.heldout_accuracy), borderColor: "#d9573d", borderDash: [5, 4], yAxisID: "acc" },
          ],
        },
        options: {
          maintainAspectRatio: false, animation: false, spanGaps: true,
          scales: {
            x: { title: { display: true, text: "epoch (0 = the linear probe)" } },
            loss: { position: "left", title: { display: true, text: "loss" }, beginAtZero: true },
            acc: { position: "right", min: 0, max: 1, title: { display: true, text: "accuracy" }, grid: { drawOnChartArea: false } },
          },
        },
      });
      $("#curve-note").textContent = "Per epoch. Epoch 0 is the linear probe the fine-tune starts from. " +
        "Held-out: a slice of the training split set aside; it chooses the epoch to keep. " +
        "The reported validation accuracy is in the result.";
    } else if (probe.length) {
      // The chosen probe's sweep (its rows come last); the other candidates are compared in "Why this plan".
      const stage = probe[probe.length - 1].stage;
      const rows = probe.filter((r) => r.stage === stage);
      const seen = new Set();
      const sweep = rows.filter((r) => !seen.has(r.C) && seen.add(r.C));
      $("#curves-section").hidden = false;
      $("#h-curves").textContent = "Linear probe: accuracy for each regularisation strength";
      curveChart = chart(curveChart, canvas, {
        type: "line",
        data: {
          datasets: [
            { label: "cross-validated accuracy", data: sweep.map((r) => ({ x: r.C, y: r.cv_accuracy })), borderColor: "#2f9e6e", yAxisID: "acc" },
            { label: "cross-validated log loss", data: sweep.map((r) => ({ x: r.C, y: r.cv_loss })), borderColor: "#9a5fd0", borderDash: [5, 4], yAxisID: "loss" },
          ],
        },
        options: {
          maintainAspectRatio: false, animation: false,
          scales: {
            x: { type: "logarithmic", title: { display: true, text: "C (less regularisation →)" } },
            acc: { position: "left", title: { display: true, text: "accuracy" }, suggestedMax: 1 },
            loss: { position: "right", title: { display: true, text: "log loss" }, beginAtZero: true, grid: { drawOnChartArea: false } },
          },
        },
      });
      $("#curve-note").textContent = `The probe on ${stage}, fitted at several regularisation strengths C; ` +
        "the C with the lowest cross-validated log loss on the training split is kept. " +
        "This is not a learning curve: no epochs are involved.";
    }
  }

  function drawLr(job) {
    const epochs = job.history.filter((r) => r.phase === "finetune" && r.epoch > 0);
    const range = job.report && job.report.lr_range;
    if (!epochs.length && !range) return;
    $("#lr-section").hidden = false;
    const datasets = [];
    let type = "line";
    let x = { title: { display: true, text: "epoch" } };
    if (range) {
      datasets.push({ label: "LR range test: loss", data: range.curve.map((p) => ({ x: p.lr, y: p.smoothed })), borderColor: "#9a5fd0" });
      x = { type: "logarithmic", title: { display: true, text: "backbone learning rate" } };
    } else {
      datasets.push({ label: "backbone learning rate (end of epoch)", data: epochs.map((r) => ({ x: r.epoch, y: r.lr })), borderColor: "#2f9e6e" });
      x.type = "linear";
    }
    lrChart = chart(lrChart, $("#lr-chart"), { type, data: { datasets }, options: { maintainAspectRatio: false, animation: false, scales: { x } } });
    const last = job.history.filter((r) => r.phase === "finetune").slice(-1)[0];
    if (last) {
      const ft = (job.report && job.report.hyperparameters && job.report.hyperparameters.finetune) || {};
      $("#early-stopping").textContent = `Early stopping: best epoch ${last.best_epoch} (held-out accuracy), patience used ${last.patience_used} of ${ft.patience || 3}.` +
        (ft.stopped ? ` Stopped: ${ft.stopped}.` : "");
    }
  }

  // The engine's choices between candidates, each with the scores it measured on the training split.
  function drawDecisions(report) {
    const decisions = (report && report.decisions) || [];
    if (shownDecisions || !decisions.length) return;
    shownDecisions = true;
    $("#decisions-section").hidden = false;
    const blocks = decisions.map(decisionBlock);
    $("#decisions").replaceChildren(...blocks.map((b) => b.node));
    blocks.forEach((b) => b.canvas && drawScores(b.canvas, b.decision)); // once attached, so it sizes to its box
  }

  function decisionBlock(d) {
    const candidates = d.candidates || [];
    const seconds = (x) => (x == null ? "—" : `${x.toFixed(1)} s`);
    // Where log loss decided (the representation), each candidate's, and its z against the plain probe.
    const byLoss = decidedByLoss(candidates);
    const lossText = (c) => {
      const { cv_loss: loss, z } = c.detail || {};
      return loss == null ? "—" : `${loss.toFixed(3)}${zText(z)}`;
    };
    const rows = candidates.map((c) => {
      const kept = c.name === d.chosen;
      return Graft.el("tr", { class: kept ? "kept" : "" },
        Graft.el("th", { scope: "row" }, ...(kept ? [Graft.el("strong", { text: c.name }), " ✓ kept"] : [c.name])),
        Graft.el("td", { text: c.score == null ? detailText(c.detail) || "not measured" : Graft.pct(c.score) }),
        ...(byLoss ? [Graft.el("td", { text: lossText(c) })] : []),
        Graft.el("td", { text: seconds(c.seconds) }));
    });
    const heads = ["Candidate", "Score", ...(byLoss ? ["Log loss (z)"] : []), "Time"];
    const table = Graft.el("table", {},
      Graft.el("thead", {}, Graft.el("tr", {}, ...heads.map((h) => Graft.el("th", { scope: "col", text: h })))),
      Graft.el("tbody", {}, ...rows));
    const node = Graft.el("div", { class: "decision" },
      Graft.el("h3", { text: `${d.what}: ${d.chosen}` }),
      Graft.el("p", { text: d.reason || "" }),
      Graft.el("p", { class: "meta", text: `${d.metric ? `Scores: ${d.metric} · ` : ""}measuring took ${seconds(d.seconds)}` }));
    let canvas = null;
    if (d.what === "representation" && candidates.length > 1) {
      const what = byLoss ? "Cross-validated log loss" : "Scores";
      canvas = Graft.el("canvas", { role: "img", "aria-label": `${what} of the ${d.what} candidates (listed in the table below)` });
      const box = Graft.el("div", { class: "chart" }, canvas);
      box.style.height = `${Math.max(140, 30 * candidates.length + 50)}px`;
      node.append(box);
    }
    node.append(Graft.el("div", { class: "scroll" }, table));
    return { node, canvas, decision: d };
  }

  // What a candidate without a score measured instead (e.g. the range test: where the loss blew up).
  function detailText(detail) {
    const show = (v) => (typeof v === "number" ? Number(v.toPrecision(3)).toString() : v == null ? "never" : String(v));
    return Object.entries(detail || {}).map(([k, v]) => `${k.replaceAll("_", " ")} ${show(v)}`).join(", ");
  }

  function decidedByLoss(candidates) {
    return candidates.some((c) => c.detail && c.detail.cv_loss != null);
  }

  // A candidate's z against the plain probe, as " (z −2.4)"; nothing for the probe itself.
  function zText(z) {
    return z == null || z === 0 ? "" : ` (z ${z > 0 ? "+" : "−"}${Math.abs(z).toFixed(1)})`;
  }

  // The bars show what decided: each candidate's cross-validated log loss where the choice was made by
  // loss (lower is better; the representation), else its score.
  function drawScores(canvas, d) {
    const labels = d.candidates.map((c) => (c.name === d.chosen ? `${c.name} ✓ kept` : c.name));
    const byLoss = decidedByLoss(d.candidates);
    const value = (c) => (byLoss ? (c.detail || {}).cv_loss : c.score);
    const x = byLoss
      ? { min: 0, title: { display: true, text: "cross-validated log loss (lower is better)" } }
      : { min: 0, max: 1, ticks: { callback: (v) => Graft.pct(v, 0) } };
    const tip = (ctx) =>
      (byLoss ? `log loss ${ctx.raw.toFixed(3)}${zText((d.candidates[ctx.dataIndex].detail || {}).z)}` : Graft.pct(ctx.raw));
    new Chart(canvas, {
      type: "bar",
      data: {
        labels,
        datasets: [{
          label: byLoss ? "cross-validated log loss" : "score",
          data: d.candidates.map(value),
          backgroundColor: d.candidates.map((c) => (c.name === d.chosen ? "#2f9e6e" : "#9aa6bd")),
        }],
      },
      options: {
        indexAxis: "y", maintainAspectRatio: false, animation: false,
        plugins: { legend: { display: false }, tooltip: { callbacks: { label: tip } } },
        scales: {
          x,
          // Long names would squeeze the bars on a phone; the table and the tooltip give them whole.
          y: { ticks: { callback: (_, i) => (labels[i].length > 26 ? `${labels[i].slice(0, 25)}…` : labels[i]) } },
        },
      },
    });
  }

  // What a failed check means for the model this job made, in plain words.
  const MEANING = {
    loss_decreases: "the training loss went up in later epochs (often a learning rate too high for this data). " +
      "The epoch kept is the one that scored best on held-out images, so the accuracy above stands, but a retrain " +
      "with the linear strategy or a smaller budget may do as well.",
    overfits_one_batch: "a fresh copy of the network could not memorise a handful of images in a few steps. " +
      "It looks for broken set-ups (frozen layers, a dead learning rate); the accuracy above was measured on " +
      "validation images and stands, but treat a fine-tune that barely beat the probe with care.",
    initial_loss: "the first loss was far from chance level, which can mean mislabelled or very uneven classes. " +
      "Check the per-class table for a class the model rarely gets right.",
    finite_loss: "training hit an infinite or undefined loss; the epochs after it were thrown away, and the model " +
      "kept is the last good one.",
  };

  function drawSanity(job) {
    const report = job.report;
    // A job that ended without them (cancelled, failed) has none to report: no placeholder either.
    $("#sanity-section").hidden = FINAL.includes(job.status) && !(report && report.sanity);
    if (!report || !report.sanity) return;
    $("#sanity").replaceChildren(...report.sanity.map((c) =>
      Graft.el("li", { class: c.ok ? "ok" : "failed" }, Graft.el("strong", { text: `${c.ok ? "✓" : "✗"} ${c.check.replace(/_/g, " ")}` }), ` — ${c.detail}`)));
    const failed = report.sanity.filter((c) => !c.ok);
    const summary = $("#sanity-summary");
    summary.hidden = !failed.length;
    if (!failed.length) return;
    const meanings = failed.map((c) => {
      const key = c.check.replace(/^probe_/, "");
      const what = MEANING[key] || "a check of the training set-up did not pass.";
      return Graft.el("li", {}, Graft.el("strong", { text: `${c.check.replace(/_/g, " ")}: ` }), what);
    });
    const lead = job.status === "succeeded" ?
      `${failed.length === 1 ? "One check" : `${failed.length} checks`} did not pass. What it means for this model:` :
      "What the failed checks mean:";
    summary.replaceChildren(lead, Graft.el("ul", {}, ...meanings));
    summary.className = "notice job-sanity-summary";
  }

  function drawResults(job) {
    const m = job.metrics;
    $("#results").hidden = false;
    $("#accuracy").textContent = Graft.pct(m.val_accuracy);
    const topk = m.top_k_accuracy ? Object.entries(m.top_k_accuracy).filter(([k]) => k !== "top1").map(([k, v]) => `${k} ${Graft.pct(v)}`).join(", ") : "";
    $("#result-meta").textContent = `on ${m.num_val} validation images · macro-F1 ${Graft.pct(m.macro_f1)} · calibration error ${Graft.pct(m.ece)}${topk ? ` · ${topk}` : ""}`;
    if (job.model) $("#model-link").href = `/models/${job.model}/`;
    else $("#model-link").hidden = true;
    $("#per-class tbody").replaceChildren(...m.per_class.map((c) =>
      Graft.el("tr", {}, Graft.el("th", { scope: "row", text: c.label }), Graft.el("td", { text: Graft.pct(c.precision) }),
        Graft.el("td", { text: Graft.pct(c.recall) }), Graft.el("td", { text: Graft.pct(c.f1) }), Graft.el("td", { text: c.support }))));
    const labels = m.per_class.map((c) => c.label);
    const cm = m.confusion_matrix;
    const head = Graft.el("tr", {}, Graft.el("th", { scope: "col", text: "true \\ predicted" }), ...labels.map((l) => Graft.el("th", { scope: "col", text: l })));
    const rows = cm.map((row, i) => {
      const total = row.reduce((a, b) => a + b, 0) || 1;
      return Graft.el("tr", {}, Graft.el("th", { scope: "row", text: labels[i] }), ...row.map((n, j) => {
        const share = n / total;
        const cell = Graft.el("td", { text: n, title: `${n} of ${total} '${labels[i]}' images predicted '${labels[j]}'` });
        cell.style.background = i === j ? `rgba(47,158,110,${0.15 + 0.75 * share})` : `rgba(217,87,61,${share ? 0.15 + 0.75 * share : 0})`;
        if (share > 0.55) cell.style.color = "#fff";
        return cell;
      }));
    });
    $("#confusion").replaceChildren(Graft.el("thead", {}, head), Graft.el("tbody", {}, ...rows));
    const wrong = m.misclassified || [];
    const gallery = $("#misclassified");
    $("#wrong-hint").hidden = !wrong.length || !job.model;
    if (!wrong.length) {
      gallery.replaceChildren(Graft.el("p", { class: "ok", text: "No validation image was misclassified." }));
      return;
    }
    gallery.replaceChildren(...wrong.slice(0, 60).map((w) => {
      const name = w.file.split("/").pop();
      const caption = `${w.file}: true ${w.label}, predicted ${w.predicted} (${Graft.pct(w.score, 0)})`;
      // Stored with the model by the worker: they outlive the dataset (apps/training/gallery.py).
      const src = job.model ? `/models/${job.model}/thumb/?m=${encodeURIComponent(w.file)}` : "";
      const img = Graft.el("img", { alt: caption, loading: "lazy", width: 120, height: 120 });
      if (src) img.src = src;
      const open = Graft.el("button", { type: "button", class: "job-thumb", title: `Enlarge ${w.file}`, "aria-label": `Enlarge ${caption}` }, img);
      open.disabled = !src;
      open.addEventListener("click", () => enlarge(src, w, caption));
      return Graft.el("figure", {}, open,
        Graft.el("figcaption", {},
          Graft.el("span", { class: "job-file", text: name, title: w.file }),
          Graft.el("span", { text: `true ${w.label}` }),
          Graft.el("span", { text: `predicted ${w.predicted} (${Graft.pct(w.score, 0)})` })));
    }));
  }

  function enlarge(src, w, caption) {
    const dialog = $("#job-image-dialog");
    $("#job-image-big").src = src;
    $("#job-image-big").alt = caption;
    $("#job-image-caption").replaceChildren(
      Graft.el("strong", { class: "job-file", text: w.file }), Graft.el("br"),
      `true ${w.label} · predicted ${w.predicted} (${Graft.pct(w.score, 0)})`);
    dialog.showModal();
  }

  const STEPS = { decode: "Reading images", load: "Loading the pretrained network", probe: "Fitting linear probes",
    checks: "Preparing the fine-tune", lr_test: "Finding the learning rate", finetune: "Fine-tuning",
    evaluate: "Scoring the validation images", export: "Exporting the model", features: "Extracting features", fit: "Fitting" };

  function stepName(job) {
    const p = (job.report && job.report.progress) || {};
    if (p.label) return p.label;
    const key = (job.phase || "").split("@")[0];
    return STEPS[key] || "Starting";
  }

  // A GPU is known when the server says its workers train on one, or this job ran on one before.
  function gpuKnown(job) {
    const device = (root.dataset.device || "") + " " + ((job.report && job.report.device) || "");
    return /cuda|gpu/i.test(device);
  }

  function drawProgress(job) {
    const live = !FINAL.includes(job.status);
    $("#progress-section").hidden = !live;
    if (!live) return;
    $("#job-progress").value = job.progress;
    const p = (job.report && job.report.progress) || {};
    if (job.status === "queued") {
      $("#phase").textContent = gpuKnown(job) ? "Waiting for a GPU worker…" : "Waiting for a worker…";
      $("#eta").textContent = "";
    } else {
      $("#phase").textContent = `${stepName(job)} · ${Math.floor(job.progress * 100)}%`;
      // The engine's estimate: the planned work left at the speeds it measured on this machine.
      $("#eta").textContent = p.eta_s != null && job.progress > 0.02 ? `about ${Graft.duration(Math.max(1, p.eta_s)) || "1 s"} left` : "";
    }
    const notes = p.notes || [];
    const last = notes[notes.length - 1];
    $("#plan-note").hidden = !last;
    if (last) $("#plan-note").textContent = `Why the estimate changed: ${last.text}`;
  }

  // The log follows its newest line unless the reader scrolled up; a button brings it back.
  const logBox = $("#log");
  let follow = true;
  logBox.addEventListener("scroll", () => {
    follow = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 8;
    $("#log-follow").hidden = follow;
  });
  $("#log-follow").addEventListener("click", () => {
    follow = true;
    logBox.scrollTop = logBox.scrollHeight;
    $("#log-follow").hidden = true;
  });

  function drawLog(job) {
    const log = (job.report && job.report.log) || [];
    const text = log.length ? log.join("\n") : job.history.length ? `${job.history.length} progress rows so far…` : "Nothing yet.";
    if (logBox.textContent === text) return;
    logBox.textContent = text;
    if (follow) logBox.scrollTop = logBox.scrollHeight;
  }

  function drawOutcome(job) {
    const canRetrain = Boolean(root.dataset.dataset);
    $("#train-again").hidden = !canRetrain || !["failed", "cancelled"].includes(job.status);
    $("#retrain").hidden = !canRetrain || job.status !== "succeeded";
    Graft.showError("#job-error", job.status === "failed" ? `Training failed: ${job.error}` : "");
    const notice = $("#job-notice");
    notice.hidden = job.status !== "cancelled";
    if (job.status === "cancelled") {
      notice.textContent = "This job was cancelled before it finished; nothing was kept. " +
        (canRetrain ? "Train again starts a new job with the same options on the dataset's newest version." : "");
    }
  }

  function render(job) {
    const badge = $("#job-status");
    badge.textContent = job.status;
    badge.className = `badge ${job.status}`;
    $("#cancel").hidden = FINAL.includes(job.status);
    $("#job-delete").hidden = !FINAL.includes(job.status);
    drawOutcome(job);
    drawProgress(job);
    if (job.strategy && job.strategy.name) {
      const line = `${job.strategy.cell} → ${job.strategy.name}. ${job.strategy.reason || ""}`;
      $("#strategy-line").textContent = line;
      $("#progress-strategy").textContent = line;
    }
    if (job.status === "succeeded" && !shownResults) {
      shownResults = true;
      drawResults(job);
    }
    drawSanity(job);
    drawDecisions(job.report);
    drawCurves(job.history || []);
    drawLr(job);
    drawLog(job);
    return FINAL.includes(job.status);
  }

  async function retrain(button) {
    button.disabled = true;
    try {
      const fresh = await Graft.api(`/jobs/${id}/retrain/`, { method: "POST" });
      window.location.assign(`/jobs/${fresh.id}/`);
    } catch (err) {
      button.disabled = false;
      Graft.showError("#job-error", err.message);
    }
  }
  $("#train-again").addEventListener("click", (e) => retrain(e.currentTarget));
  $("#retrain").addEventListener("click", (e) => retrain(e.currentTarget));
  // A click on the backdrop lands on the dialog itself: it closes, as Escape does.
  $("#job-image-dialog").addEventListener("click", (e) => { if (e.target === e.currentTarget) e.currentTarget.close(); });

  Graft.poll(async () => render(await Graft.api(`/jobs/${id}/`)), 1500, "#poll-error");

  $("#cancel").addEventListener("click", async () => {
    if (!confirm("Stop this training job?")) return;
    try {
      render(await Graft.api(`/jobs/${id}/cancel/`, { method: "POST" }));
    } catch (err) {
      Graft.showError("#job-error", err.message);
    }
  });
});
