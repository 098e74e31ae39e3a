// Job page: live status, progress with ETA, learning curves, LR, early stopping, sanity, log, results.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("job-root");
  const id = root.dataset.job;
  const datasetId = root.dataset.dataset;
  const $ = (s) => document.querySelector(s);
  const FINAL = ["succeeded", "failed", "cancelled"];
  let curveChart = null;
  let lrChart = null;
  let shownResults = false;

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
      const labels = epochs.map((r) => r.epoch);
      curveChart = chart(curveChart, canvas, {
        type: "line",
        data: {
          labels,
          datasets: [
            { label: "train loss", data: epochs.map((r) => r.train_loss), borderColor: "#3d6fd9", yAxisID: "loss" },
            { label: "val loss", data: epochs.map((r) => r.val_loss), borderColor: "#d9573d", yAxisID: "loss" },
            { label: "train accuracy", data: epochs.map((r) => r.train_accuracy), borderColor: "#3d6fd9", borderDash: [5, 4], yAxisID: "acc" },
            { label: "val accuracy", data: epochs.map((r) => r.val_accuracy), borderColor: "#d9573d", borderDash: [5, 4], yAxisID: "acc" },
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
      $("#curve-note").textContent = "Per epoch. Epoch 0 is the linear probe the fine-tune starts from.";
    } else if (probe.length) {
      const stages = [...new Set(probe.map((r) => r.stage))];
      const palette = ["#3d6fd9", "#d9573d", "#2f9e6e", "#9a5fd0", "#c9a227", "#555"];
      curveChart = chart(curveChart, canvas, {
        type: "line",
        data: {
          datasets: stages.flatMap((stage, i) => [
            {
              label: `${stage}: CV accuracy`,
              data: probe.filter((r) => r.stage === stage).map((r) => ({ x: r.C, y: r.cv_accuracy })),
              borderColor: palette[i % palette.length],
              yAxisID: "acc",
            },
            {
              label: `${stage}: CV log loss`,
              data: probe.filter((r) => r.stage === stage).map((r) => ({ x: r.C, y: r.cv_loss })),
              borderColor: palette[i % palette.length],
              borderDash: [5, 4],
              yAxisID: "loss",
            },
          ]),
        },
        options: {
          maintainAspectRatio: false, animation: false,
          scales: {
            x: { type: "logarithmic", title: { display: true, text: "C (inverse regularisation strength)" } },
            acc: { position: "left", title: { display: true, text: "cross-validated accuracy" }, suggestedMax: 1 },
            loss: { position: "right", title: { display: true, text: "log loss" }, beginAtZero: true, grid: { drawOnChartArea: false } },
          },
        },
      });
      $("#curve-note").textContent = "A linear probe is fitted for several regularisation strengths; the one with the lowest 5-fold cross-validated log loss on the training split is kept.";
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
      $("#early-stopping").textContent = `Early stopping: best epoch ${last.best_epoch} (val accuracy), patience used ${last.patience_used} of ${ft.patience || 3}.` +
        (ft.stopped ? ` Stopped: ${ft.stopped}.` : "");
    }
  }

  function drawSanity(report) {
    if (!report || !report.sanity) return;
    const list = $("#sanity");
    list.replaceChildren(...report.sanity.map((c) =>
      Graft.el("li", { class: c.ok ? "ok" : "failed" }, Graft.el("strong", { text: `${c.ok ? "✓" : "✗"} ${c.check.replace(/_/g, " ")}` }), ` — ${c.detail}`)));
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
    if (!wrong.length) {
      gallery.replaceChildren(Graft.el("p", { class: "ok", text: "No validation image was misclassified." }));
    } else {
      gallery.replaceChildren(...wrong.slice(0, 60).map((w) => {
        const img = Graft.el("img", { alt: `${w.file}: true ${w.label}, predicted ${w.predicted}`, loading: "lazy", width: 120, height: 120 });
        if (datasetId) img.src = `/datasets/${datasetId}/thumb/?m=${encodeURIComponent(w.file)}`;
        return Graft.el("figure", {}, img, Graft.el("figcaption", { text: `${w.label} → ${w.predicted} (${w.score.toFixed(2)})` }));
      }));
    }
  }

  function render(job) {
    const badge = $("#job-status");
    badge.textContent = job.status;
    badge.className = `badge ${job.status}`;
    $("#job-progress").value = job.progress;
    $("#cancel").hidden = FINAL.includes(job.status);
    const phases = { decode: "Reading images", features: "Extracting features", fit: "Fitting", export: "Exporting the bundle" };
    $("#phase").textContent = job.status === "running" ? `${phases[job.phase] || job.phase || "Starting"} · ${Math.floor(job.progress * 100)}%` :
      job.status === "queued" ? "Waiting for a GPU worker…" : "";
    if (job.status === "running" && job.started_at && job.progress > 0.02) {
      const elapsed = (Date.now() - Date.parse(job.started_at)) / 1000;
      $("#eta").textContent = `about ${Graft.duration((elapsed * (1 - job.progress)) / job.progress)} left`;
    } else {
      $("#eta").textContent = "";
    }
    if (job.strategy && job.strategy.name) {
      $("#strategy-line").textContent = `${job.strategy.cell} → ${job.strategy.name}. ${job.strategy.reason || ""}`;
    }
    drawCurves(job.history || []);
    drawLr(job);
    drawSanity(job.report);
    const log = (job.report && job.report.log) || [];
    if (log.length) $("#log").textContent = log.join("\n");
    else $("#log").textContent = job.history.length ? `${job.history.length} progress rows so far…` : "Nothing yet.";
    Graft.showError("#job-error", job.status === "failed" ? `Training failed: ${job.error}` : job.status === "cancelled" ? "This job was cancelled." : "");
    if (job.status === "succeeded" && !shownResults) {
      shownResults = true;
      drawResults(job);
    }
    return FINAL.includes(job.status);
  }

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
