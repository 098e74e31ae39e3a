"""The job page leads with the answer (issue 21, item 4), in headless Chromium.

A finished job shows its accuracy above the fold at 1280 x 800 and its misclassified images with
file names, enlarged on click; a running job names its step and says why its estimate grew; a
cancelled job has no red error box and trains again in one click (a new job, same options, on the
dataset's newest version). The fit runs here once, cheaply (a linear probe on tiny images); the
dataset is uploaded and ingested by the real Celery worker.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, sign_in
from tests.conftest import class_folders, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

INGEST_MS = 180_000
FOLD = {"width": 1280, "height": 800}


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """A linear probe on two classes of near-identical tiny images: it gets some validation images wrong."""
    from ml.fit import FitConfig, fit

    folder = tmp_path_factory.mktemp("job-page")
    archive = make_zip(folder / "small.zip", class_folders({"ants": 10, "bees": 10}))
    result = fit(archive, folder / "fit", FitConfig(strategy="linear", resolution="native"))
    if not result.metrics.misclassified:  # all right by luck: one wrong answer, so the gallery shows
        from dataclasses import replace

        from ml.report import Mistake

        val = result.metrics.per_class[0].label
        wrong = [Mistake(f"{val}/img_0.png", val, "bees", 0.61)]
        result = replace(result, metrics=replace(result.metrics, misclassified=wrong))
    return result


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory):
    """A partial fine-tune of two epochs on tiny images: its history has epoch rows, its report a range test."""
    from ml.fit import FitConfig, fit

    folder = tmp_path_factory.mktemp("job-page-ft")
    archive = make_zip(folder / "small.zip", class_folders({"ants": 12, "bees": 12}))
    return fit(archive, folder / "fit", FitConfig(strategy="partial", max_epochs=2, resolution="native"))


def _upload(page, tmp_path, name: str = "insects") -> int:
    page.goto("/upload/")
    page.locator("#dataset-name").fill(name)
    page.locator("#file-input").set_input_files(
        make_zip(tmp_path / "insects.zip", class_folders({"ants": 6, "bees": 6}))
    )
    expect(page).to_have_url(re.compile(r"/datasets/\d+/$"), timeout=120_000)
    expect(page.locator("#dataset-status")).to_have_text(re.compile(r"\bready\b"), timeout=INGEST_MS)
    return int(re.search(r"/datasets/(\d+)/$", page.url).group(1))


def _finished_job(owner, dataset_id: int, fitted):
    from apps.serving.services import bundle_store, model_create
    from apps.training.models import Job
    from apps.training.services import REPORT_FIELDS

    data = fitted.to_json()
    job = Job.objects.create(
        owner=owner, dataset_id=dataset_id, status=Job.Status.SUCCEEDED, progress=1.0, phase="done",
        config={"strategy": data["strategy"]["name"]}, strategy=data["strategy"], metrics=data["metrics"],
        report={key: data[key] for key in REPORT_FIELDS},
    )  # fmt: skip
    model_create(job=job, bundle=bundle_store(fitted.artifacts["bundle"]), result=fitted)
    for step, row in enumerate(data["history"]):
        job.history.create(step=step, phase=row["phase"], data=row)
    return job


def test_a_finished_job_leads_with_its_accuracy_and_enlarges_a_mistake(
    page, shot, live_server, celery_worker_process, make_user, fitted, tmp_path
):
    user = make_user("ida", PASSWORD)
    sign_in(page, "ida")
    dataset = _upload(page, tmp_path)
    job = _finished_job(user, dataset, fitted)

    page.set_viewport_size(FOLD)
    page.goto(f"/jobs/{job.pk}/")
    accuracy = page.locator("#accuracy")
    expect(accuracy).to_have_text(re.compile(r"^\d+\.\d%$"))
    box = accuracy.bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= FOLD["height"], box
    assert box["x"] + box["width"] <= FOLD["width"]
    expect(page.locator("#h-curves")).to_have_text("Linear probe: accuracy for each regularisation strength")
    expect(page.locator("#job-error")).to_be_hidden()
    expect(page.locator("#retrain")).to_be_visible()
    expect(page.locator("#train-again")).to_be_hidden()

    wrong = fitted.metrics.misclassified[0]
    figure = page.locator("#misclassified figure").first
    expect(figure.locator(".job-file")).to_have_text(wrong.file.split("/")[-1])
    expect(figure).to_contain_text(f"true {wrong.label}")
    expect(figure).to_contain_text(f"predicted {wrong.predicted}")
    figure.locator("button.job-thumb").click()
    dialog = page.locator("#job-image-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#job-image-caption")).to_contain_text(wrong.file)
    big = dialog.locator("#job-image-big").bounding_box()
    assert big is not None and big["width"] >= 300, big
    shot(page, "job-succeeded-enlarged")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    shot(page, "job-succeeded")
    assert not page.js_errors, page.js_errors


def test_a_fine_tuned_job_plots_its_held_out_epochs_and_the_loops_decisions(
    page, shot, live_server, celery_worker_process, make_user, finetuned, tmp_path
):
    user = make_user("ft", PASSWORD)
    sign_in(page, "ft")
    job = _finished_job(user, _upload(page, tmp_path), finetuned)
    page.goto(f"/jobs/{job.pk}/")
    expect(page.locator("#h-curves")).to_have_text("Fine-tuning: loss and accuracy per epoch")
    # The chart reads the epoch rows' declared fields: every held-out point is a number.
    held_out = page.evaluate(
        """() => Chart.getChart(document.querySelector('#curve-chart')).data.datasets
                .find((d) => d.label === 'held-out accuracy').data"""
    )
    assert len(held_out) >= 3 and all(isinstance(v, int | float) for v in held_out), held_out  # 3 a try
    decisions = page.locator("#decisions h3")
    for what in ("finetune_start:", "learning_rate:", "epochs:", "weights:", "finetune:"):
        expect(decisions.filter(has_text=what)).to_have_count(1)
    shot(page, "job-finetuned")
    assert not page.js_errors, page.js_errors


def test_the_representation_table_shows_the_log_loss_that_chose_it(
    page, shot, live_server, celery_worker_process, make_user, fitted, tmp_path
):
    from dataclasses import replace

    from ml.selection import Candidate, Decision

    # As steel defects with 2% of their labels wrong measured it: the top layer's CV accuracy is close to the
    # others', and blocks.3 wins on log loss, image by image.
    representation = Decision(
        "representation", "blocks.3 @ 240 px",
        (
            Candidate("top @ 240 px", 0.9646, 3.4, {"C": 0.1, "cv_loss": 0.1848, "z": 0.0}),
            Candidate("blocks.3 @ 240 px", 0.9771, 0.3, {"C": 0.1, "cv_loss": 0.1296, "z": -2.43}),
            Candidate("blocks.5 @ 240 px", 0.9729, 3.6, {"C": 0.1, "cv_loss": 0.1518, "z": -2.25}),
        ),
        "the plain top-layer probe at the native input stays unless the candidate with the lowest out-of-fold "
        "log loss beats it image by image by more than 2 standard errors",
        metric="5-fold CV accuracy on 480 training images; log loss decides",
    )  # fmt: skip
    user = make_user("rex", PASSWORD)
    sign_in(page, "rex")
    job = _finished_job(user, _upload(page, tmp_path), replace(fitted, decisions=[representation, *fitted.decisions]))
    page.goto(f"/jobs/{job.pk}/")
    block = page.locator(".decision").filter(has=page.locator("h3", has_text="representation: blocks.3 @ 240 px"))
    expect(block.locator("thead th")).to_have_text(["Candidate", "Score", "Log loss (z)", "Time"])
    expect(block.locator("tr.kept")).to_contain_text("97.7%")
    expect(block.locator("tr.kept td").nth(1)).to_have_text("0.130 (z −2.4)")
    expect(block.locator("tbody tr").first.locator("td").nth(1)).to_have_text("0.185")
    # The bars plot what decided: the loss (lower is better), not the accuracy the kept one does not lead on.
    chart = block.locator("canvas")
    expect(chart).to_have_attribute("aria-label", re.compile(r"^Cross-validated log loss of the representation"))
    drawn = chart.evaluate("c => { const d = Chart.getChart(c).data.datasets[0]; return [d.label, d.data]; }")
    assert drawn == ["cross-validated log loss", [0.1848, 0.1296, 0.1518]]
    # Decisions without a loss keep their three columns.
    others = page.locator(".decision").filter(has_not=page.locator("h3", has_text="representation"))
    if others.count():
        expect(others.first.locator("thead th")).to_have_count(3)
    shot(page, "job-representation")
    assert not page.js_errors, page.js_errors


def test_a_running_job_names_its_step_and_why_the_estimate_grew(page, shot, make_user):
    from django.utils import timezone

    from apps.training.models import Job

    user = make_user("ivo", PASSWORD)
    job = Job.objects.create(
        owner=user, status=Job.Status.RUNNING, progress=0.62, phase="finetune", started_at=timezone.now(),
        heartbeat_at=timezone.now(),
        report={
            "log": [f"line {i}" for i in range(80)],
            "progress": {
                "step": "finetune", "label": "Fine-tuning · epoch 3 of 12", "done": 900, "total": 4000, "eta_s": 95.0,
                "notes": [{"phase": "probe", "fraction": 0.4, "text": "The plan grew: a partial fine-tune was chosen "
                           "(large-similar), about 12 epochs, about 2 min more."}],
            },
        },
    )  # fmt: skip
    sign_in(page, "ivo")
    page.goto(f"/jobs/{job.pk}/")
    expect(page.locator("#phase")).to_have_text("Fine-tuning · epoch 3 of 12 · 62%")
    expect(page.locator("#eta")).to_have_text(re.compile(r"^about 1 min 35 s left$|^about .* left$"))
    expect(page.locator("#plan-note")).to_contain_text("a partial fine-tune was chosen")
    log = page.locator("#log")
    expect(log).to_contain_text("line 79")
    at_bottom = "(e) => e.scrollTop + e.clientHeight >= e.scrollHeight - 8"
    assert log.evaluate(at_bottom), "the log follows its newest line"
    shot(page, "job-running")


def test_train_again_after_cancel_makes_a_new_job(page, shot, live_server, celery_worker_process, make_user, tmp_path):
    from apps.training.models import Job

    user = make_user("uma", PASSWORD)
    sign_in(page, "uma")
    dataset = _upload(page, tmp_path)
    job = Job.objects.create(
        owner=user, dataset_id=dataset, status=Job.Status.CANCELLED, phase="cancelled", progress=0.95,
        config={"strategy": "linear", "max_epochs": 4},
    )  # fmt: skip
    page.goto(f"/jobs/{job.pk}/")
    expect(page.locator("#job-notice")).to_contain_text("cancelled")
    expect(page.locator("#job-error")).to_be_hidden()  # no red box for a cancel
    expect(page.locator("#progress-section")).to_be_hidden()
    shot(page, "job-cancelled")
    page.locator("#train-again").click()
    expect(page).not_to_have_url(re.compile(rf"/jobs/{job.pk}/$"))
    expect(page).to_have_url(re.compile(r"/jobs/\d+/$"))
    new = Job.objects.exclude(pk=job.pk).get(owner=user)
    assert page.url.endswith(f"/jobs/{new.pk}/")
    assert new.config["strategy"] == "linear" and new.config["max_epochs"] == 4
    expect(page.locator("#job-status")).to_have_text(re.compile(r"queued|running|succeeded"), timeout=30_000)
    if new.status == Job.Status.QUEUED:
        expect(page.locator("#phase")).not_to_contain_text("GPU")
