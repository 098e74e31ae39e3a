// Dataset report: live status while processing; bar chart of images per class.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("dataset-root");
  const id = root.dataset.dataset;
  const badge = document.getElementById("dataset-status");

  if (root.dataset.status === "processing") {
    Graft.poll(async () => {
      const d = await Graft.api(`/datasets/${id}/`);
      badge.textContent = d.status;
      badge.className = `badge ${d.status}`;
      if (d.status !== "processing") {
        window.location.reload();
        return true;
      }
      return false;
    }, 1500, "#poll-error");
  }

  // One click, one job: a double click must not queue two trainings.
  const train = document.getElementById("train-form");
  if (train) {
    train.addEventListener("submit", () => {
      const button = train.querySelector("button[type=submit]");
      setTimeout(() => { button.disabled = true; button.textContent = "Starting…"; }, 0);
    });
  }

  const data = document.getElementById("classes-json");
  const canvas = document.getElementById("class-chart");
  if (data && canvas && window.Chart) {
    const classes = JSON.parse(data.textContent);
    const split = classes.some((c) => c.val > 0);
    new Chart(canvas, {
      type: "bar",
      data: {
        labels: classes.map((c) => c.name),
        datasets: split
          ? [
              { label: "train", data: classes.map((c) => c.train || c.count - c.val), backgroundColor: "#3d6fd9" },
              { label: "val", data: classes.map((c) => c.val), backgroundColor: "#9bb5ef" },
            ]
          : [{ label: "images", data: classes.map((c) => c.count), backgroundColor: "#3d6fd9" }],
      },
      options: {
        maintainAspectRatio: false,
        indexAxis: classes.length > 8 ? "y" : "x",
        scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } },
        plugins: { legend: { display: split } },
      },
    });
  }
});
