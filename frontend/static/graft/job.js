// Job page: live status, progress with ETA, why this plan, learning curves, LR, early stopping, sanity, log, results.
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
      const labels = epochs.map((r) => r.epoch);
      curveChart = chart(curveChart, canvas, {
        type: "line",
        data: {
          labels,
          datasets: [
            { label: "train loss", data: epochs.map((r) => r.train_loss), borderColor: "#3d6fd9", yAxisID: "loss" },
            { label: "held-out loss", data: epochs.map((r) => r.val_loss), borderColor: "#d9573d", yAxisID: "loss" },
            { label: "train accuracy", data: epochs.map((r) => r.train_accuracy), borderColor: "#3d6fd9", borderDash: [5, 4], yAxisID: "acc" },
            { label: "held-out accuracy", data: epochs.map((r) => r.val_accuracy), borderColor: "#d9573d", borderDash: [5, 4], yAxisID: "acc" },
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
        "The reported validation accuracy is in the results.";
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
      $("#curve-note").textContent = "For each candidate (stage @ input size) a linear probe is fitted for several regularisation strengths; " +
        "the one with the lowest cross-validated log loss on the training split is kept.";
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
    const rows = candidates.map((c) => {
      const kept = c.name === d.chosen;
      return Graft.el("tr", { class: kept ? "kept" : "" },
        Graft.el("th", { scope: "row" }, ...(kept ? [Graft.el("strong", { text: c.name }), " ✓ kept"] : [c.name])),
        Graft.el("td", { text: c.score == null ? detailText(c.detail) || "not measured" : Graft.pct(c.score) }),
        Graft.el("td", { text: seconds(c.seconds) }));
    });
    const table = Graft.el("table", {},
      Graft.el("thead", {}, Graft.el("tr", {}, ...["Candidate", "Score", "Time"].map((h) => Graft.el("th", { scope: "col", text: h })))),
      Graft.el("tbody", {}, ...rows));
    const node = Graft.el("div", { class: "decision" },
      Graft.el("h3", { text: `${d.what}: ${d.chosen}` }),
      Graft.el("p", { text: d.reason || "" }),
      Graft.el("p", { class: "meta", text: `${d.metric ? `Scores: ${d.metric} · ` : ""}measuring took ${seconds(d.seconds)}` }));
    let canvas = null;
    if (d.what === "representation" && candidates.length > 1) {
      canvas = Graft.el("canvas", { role: "img", "aria-label": `Scores of the ${d.what} candidates (listed in the table below)` });
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

  function drawScores(canvas, d) {
    const labels = d.candidates.map((c) => (c.name === d.chosen ? `${c.name} ✓ kept` : c.name));
    new Chart(canvas, {
      type: "bar",
      data: {
        labels,
        datasets: [{
          label: "score",
          data: d.candidates.map((c) => c.score),
          backgroundColor: d.candidates.map((c) => (c.name === d.chosen ? "#2f9e6e" : "#9aa6bd")),
        }],
      },
      options: {
        indexAxis: "y", maintainAspectRatio: false, animation: false,
        plugins: { legend: { display: false }, tooltip: { callbacks: { label: (ctx) => Graft.pct(ctx.raw) } } },
        scales: {
          x: { min: 0, max: 1, ticks: { callback: (v) => Graft.pct(v, 0) } },
          // Long names would squeeze the bars on a phone; the table and the tooltip give them whole.
          y: { ticks: { callback: (_, i) => (labels[i].length > 26 ? `${labels[i].slice(0, 25)}…` : labels[i]) } },
        },
      },
    });
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
        // Stored with the model by the worker: they outlive the dataset (apps/training/gallery.py).
        if (job.model) img.src = `/models/${job.model}/thumb/?m=${encodeURIComponent(w.file)}`;
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
    $("#job-delete").hidden = !FINAL.includes(job.status);
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
    drawDecisions(job.report);
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
