// Model page, "Prediction log": the recording mode, and what was recorded: p50/p95 latency,
// a latency histogram, how often each label came first, and the most recent predictions.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("model-root");
  const id = root.dataset.model;
  const $ = (s) => document.querySelector(s);
  const RECENT = 20;
  const EVERY_MS = 4000;
  const radios = [...document.querySelectorAll('#log-mode input[name="prediction_log"]')];
  let mode = root.dataset.log || "off";
  let saving = false;
  let latencyChart = null;
  let labelChart = null;
  let latestFetch = 0;
  let shownSignature = "";

  function showMode(value) {
    mode = value;
    for (const r of radios) r.checked = r.value === value;
  }

  // Nearest-rank percentile of sorted values.
  function percentile(sorted, p) {
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))];
  }

  function ms(x) { return x < 10 ? `${x.toFixed(1)} ms` : `${Math.round(x)} ms`; }

  // Equal-width bins with a round width (1, 2 or 5 x 10^n ms), at most 12 of them.
  function latencyBins(values) {
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const span = Math.max(hi - lo, hi / 10, 1); // one value, or all alike: a bin around them, not a sliver
    let width = 10 ** Math.floor(Math.log10(span / 12));
    for (const step of [1, 2, 5, 10]) {
      if (span / (width * step) <= 12) { width *= step; break; }
    }
    const start = Math.floor(lo / width) * width;
    const n = Math.max(1, Math.floor((hi - start) / width) + 1);
    const counts = new Array(n).fill(0);
    for (const v of values) counts[Math.min(n - 1, Math.floor((v - start) / width))]++;
    const digits = width < 1 ? 1 : 0;
    const labels = counts.map((_, i) => `${(start + i * width).toFixed(digits)}–${(start + (i + 1) * width).toFixed(digits)}`);
    return { labels, counts };
  }

  function chart(existing, canvas, config) {
    if (existing) {
      existing.data = config.data;
      existing.options = config.options;
      existing.update("none");
      return existing;
    }
    return new Chart(canvas, config);
  }

  function drawCharts(records) {
    const latencies = records.map((r) => r.latency_ms);
    const bins = latencyBins(latencies);
    const canvas = $("#latency-chart");
    canvas.setAttribute("aria-label", `Latency histogram of ${records.length} predictions: ` +
      bins.labels.map((l, i) => `${l} ms: ${bins.counts[i]}`).filter((_, i) => bins.counts[i]).join(", "));
    latencyChart = chart(latencyChart, canvas, {
      type: "bar",
      data: { labels: bins.labels, datasets: [{ label: "predictions", data: bins.counts, backgroundColor: "#3d6fd9" }] },
      options: {
        maintainAspectRatio: false, animation: false,
        plugins: { legend: { display: false } },
        scales: {
          x: { title: { display: true, text: "latency (ms)" } },
          y: { beginAtZero: true, ticks: { precision: 0 }, title: { display: true, text: "predictions" } },
        },
      },
    });
    const tally = new Map();
    for (const r of records) tally.set(r.label, (tally.get(r.label) || 0) + 1);
    const top = [...tally.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    const shown = top.slice(0, 15);
    const rest = top.slice(15).reduce((n, [, c]) => n + c, 0);
    if (rest) shown.push([`${top.length - 15} other labels`, rest]);
    const labels = shown.map(([l]) => l);
    $("#label-chart").setAttribute("aria-label", `How often each label came first: ${shown.map(([l, c]) => `${l} ${c}`).join(", ")}`);
    $("#label-chart").parentElement.style.height = `${Math.max(160, 26 * shown.length + 60)}px`;
    labelChart = chart(labelChart, $("#label-chart"), {
      type: "bar",
      data: { labels, datasets: [{ label: "predictions", data: shown.map(([, c]) => c), backgroundColor: "#2f9e6e" }] },
      options: {
        indexAxis: "y", maintainAspectRatio: false, animation: false,
        plugins: { legend: { display: false } },
        scales: {
          x: { beginAtZero: true, ticks: { precision: 0 }, title: { display: true, text: "predictions" } },
          y: { ticks: { callback: (_, i) => (labels[i].length > 22 ? `${labels[i].slice(0, 21)}…` : labels[i]) } },
        },
      },
    });
  }

  function drawTable(records) {
    $("#log-table tbody").replaceChildren(...records.slice(0, RECENT).map((r) => {
      const at = new Date(r.created_at);
      const image = r.image ? Graft.el("img", {
        src: r.image, alt: `Input of the ${at.toLocaleTimeString()} prediction (${r.label})`,
        width: 40, height: 40, loading: "lazy", class: "log-thumb",
      }) : Graft.el("span", { class: "meta", text: "—" });
      return Graft.el("tr", {},
        Graft.el("td", {}, Graft.el("time", { datetime: r.created_at, title: at.toLocaleString(), text: at.toLocaleTimeString() })),
        Graft.el("th", { scope: "row", class: "log-label", text: r.label }),
        Graft.el("td", { text: Graft.pct(r.score) }),
        Graft.el("td", { text: ms(r.latency_ms) }),
        Graft.el("td", {}, image));
    }));
  }

  function render(log) {
    if (!saving) showMode(log.prediction_log);
    const records = log.records;
    const off = log.prediction_log === "off";
    $("#log-body").hidden = !records.length;
    $("#log-empty").hidden = records.length && !off;
    $("#log-empty").textContent = off ?
      (records.length ? "The log is off: nothing new is recorded. What it recorded before is shown below." :
        "The log is off. Turn it on to see each prediction's label, score and latency here.") :
      "Nothing recorded yet. Predictions made from now on (in Try it above, or through the API) appear here within a few seconds.";
    const signature = records.length ? `${records.length}:${records[0].id}:${records[0].image}` : "";
    if (!records.length || signature === shownSignature) return;
    shownSignature = signature;
    const sorted = records.map((r) => r.latency_ms).sort((a, b) => a - b);
    $("#log-latency").textContent = `Latency p50 ${ms(percentile(sorted, 0.5))} · p95 ${ms(percentile(sorted, 0.95))} ` +
      `over the last ${records.length} prediction${records.length === 1 ? "" : "s"}` +
      (records.length >= log.keep ? ` (the log keeps the last ${log.keep})` : "");
    drawCharts(records);
    drawTable(records);
  }

  // A newer fetch wins: an older, slower answer never overwrites it.
  async function refresh() {
    const ticket = ++latestFetch;
    const log = await Graft.api(`/models/${id}/predictions/`);
    if (ticket === latestFetch) render(log);
  }

  Graft.poll(async () => {
    if (!document.hidden) await refresh(); // a background tab does not poll
    return false;
  }, EVERY_MS, "#log-error");

  // After "Try it", look again soon: the record is written within about a second.
  document.addEventListener("graft:predicted", () => {
    for (const delay of [700, 1800]) setTimeout(() => refresh().catch(() => {}), delay);
  });

  for (const radio of radios) {
    radio.addEventListener("change", async () => {
      const before = mode;
      saving = true;
      Graft.showError("#log-error", "");
      $("#log-saved").textContent = "Saving…";
      try {
        const model = await Graft.api(`/models/${id}/`, {
          method: "PATCH",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ prediction_log: radio.value }),
        });
        showMode(model.prediction_log);
        $("#log-saved").textContent = { off: "The log is off.", on: "Recording predictions.", with_images: "Recording predictions and keeping their images." }[model.prediction_log] || "";
        shownSignature = ""; // images may have gone (on from with_images): redraw
        await refresh();
      } catch (err) {
        showMode(before);
        $("#log-saved").textContent = "";
        Graft.showError("#log-error", err.message);
      } finally {
        saving = false;
      }
    });
  }
});
