"""The model page beyond "Try it": the prediction log and batch prediction, in headless Chromium.

The model is trained here, cheaply (a linear probe on 12 tiny images, once per session), not
through the UI as in test_flow.py; batches run on the real Celery worker.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, sign_in
from tests.conftest import class_folders, image_bytes, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

BATCH_MS = 120_000  # the worker loads the model, then predicts five images
MS = r"\d+(\.\d)? ms"  # a latency as the log shows it


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """A linear probe fitted on two classes of six tiny images: the FitResult and its bundle."""
    from ml.fit import FitConfig, fit

    folder = tmp_path_factory.mktemp("fitted")
    archive = make_zip(folder / "small.zip", class_folders({"a": 6, "b": 6}))
    return fit(archive, folder / "fit", FitConfig(strategy="linear", resolution="native"))


@pytest.fixture
def trained_model(fitted, make_user):
    """ada's model (stored and saved as a finished job would leave it); she signs in as PASSWORD."""
    from apps.serving.services import bundle_store, model_create
    from apps.training.models import Job

    user = make_user("ada", PASSWORD)
    job = Job.objects.create(owner=user, status=Job.Status.SUCCEEDED)
    return model_create(job=job, bundle=bundle_store(fitted.artifacts["bundle"]), result=fitted)


def test_the_prediction_log_shows_a_prediction_made_in_try_it(page, shot, trained_model, tmp_path):
    sign_in(page, "ada")
    page.goto(f"/models/{trained_model.pk}/")
    log = page.locator("section#predlog")
    expect(log.get_by_label("Off")).to_be_checked()
    expect(log.locator("#log-empty")).to_contain_text("off")
    expect(log.locator("#log-body")).to_be_hidden()
    shot(page, "model-log-off")

    log.get_by_label("On: time, top label, score, latency").check()
    expect(log.locator("#log-saved")).to_have_text("Recording predictions.")
    expect(log.locator("#log-empty")).to_contain_text("Nothing recorded yet")
    page.reload()  # the choice was saved, not only shown
    expect(page.locator("section#predlog").get_by_label("On: time, top label, score, latency")).to_be_checked()

    picture = tmp_path / "picture.png"
    picture.write_bytes(image_bytes(seed=3))
    page.locator("#try-input").set_input_files(picture)
    top = page.locator("#predictions .prediction .label").first
    expect(top).to_have_text(re.compile(r"^(a|b)$"), timeout=60_000)
    predicted = top.text_content()

    # The record appears without a reload: its label, its score and latency, drawn in both charts.
    rows = log.locator("#log-table tbody tr")
    expect(rows).to_have_count(1, timeout=15_000)
    expect(rows.first.locator("th")).to_have_text(predicted)
    expect(rows.first.locator("td").nth(2)).to_have_text(re.compile(rf"^{MS}$"))
    expect(rows.first.locator("td").nth(1)).to_have_text(re.compile(r"^\d+\.\d%$"))
    expect(log.locator("#log-latency")).to_have_text(re.compile(rf"p50 {MS} · p95 {MS} over the last 1 prediction\b"))
    expect(log.locator("#log-empty")).to_be_hidden()
    for canvas in ("#latency-chart", "#label-chart"):
        expect(log.locator(canvas)).to_be_visible()
        counts = page.evaluate(f"() => Chart.getChart(document.querySelector('{canvas}')).data.datasets[0].data")
        assert sum(counts) == 1, (canvas, counts)
        assert _painted(page, canvas), f"{canvas} is blank"
    expect(log.locator("#label-chart")).to_have_attribute("aria-label", re.compile(rf"\b{predicted} 1\b"))
    shot(page, "model-log-on")

    # Keeping the images: the next prediction's row shows its input as a thumbnail.
    log.get_by_label("On, and keep the images").check()
    expect(log.locator("#log-saved")).to_have_text("Recording predictions and keeping their images.")
    page.locator("#try-input").set_input_files(picture)
    expect(rows).to_have_count(2, timeout=15_000)
    thumb = rows.first.locator("img")
    expect(thumb).to_have_attribute("src", re.compile(rf"/api/v1/models/{trained_model.pk}/predictions/\d+/image/$"))
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
    expect(rows.nth(1).locator("img")).to_have_count(0)  # recorded before images were kept
    expect(log.locator("#log-latency")).to_contain_text("over the last 2 predictions")
    shot(page, "model-log-images")
    assert not page.js_errors, page.js_errors


def test_a_batch_of_a_zip_runs_live_and_its_csv_names_the_files(
    page, shot, trained_model, celery_worker_process, tmp_path
):
    members = {f"photos/{c}{i}.png": image_bytes(seed=10 + 3 * i + (c == "b")) for c in "ab" for i in range(2)}
    members["photos/broken.jpg"] = b"this is not an image"
    archive = make_zip(tmp_path / "holiday.zip", members)
    sign_in(page, "ada")
    page.goto(f"/models/{trained_model.pk}/")
    batches = page.locator("#batches")
    expect(batches).to_contain_text("No batches yet")
    shot(page, "model-batch-empty")

    page.locator("#batch-input").set_input_files(archive)
    item = batches.locator("li[data-batch]")
    expect(item).to_have_count(1, timeout=60_000)
    expect(item.get_by_role("link", name="holiday.zip")).to_be_visible()
    expect(page.locator("#batch-upload-status")).to_contain_text("Uploaded holiday.zip")
    url = page.url

    # Live, without a reload: the badge reaches "succeeded", with 5 of 5 images and one unreadable.
    expect(item.locator(".badge")).to_have_text("succeeded", timeout=BATCH_MS)
    assert page.url == url
    expect(item).to_contain_text("5 of 5 images · 1 could not be read")
    expect(item.locator("progress")).to_have_attribute("value", "5")
    expect(page.locator("#batch-announce")).to_contain_text("succeeded")
    shot(page, "model-batch-done")

    with page.expect_download() as download:
        item.get_by_role("link", name="CSV").click()
    assert download.value.suggested_filename.endswith(".csv")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert sorted(r["file"] for r in rows) == sorted(members), rows
    unreadable = [r for r in rows if r["error"]]
    assert [r["file"] for r in unreadable] == ["photos/broken.jpg"], rows
    assert all(r["label_1"] in ("a", "b") for r in rows if not r["error"]), rows

    # The batch's own page: counts, downloads, and a delete that takes it off the model's list.
    item.get_by_role("link", name="holiday.zip").click()
    expect(page).to_have_url(re.compile(r"/batches/\d+/$"))
    expect(page.locator("h1")).to_contain_text("holiday.zip")
    expect(page.locator("#batch-status")).to_have_text("succeeded")
    expect(page.locator("#batch-done")).to_have_text("5 of 5 (100%)")
    expect(page.locator("#batch-failed")).to_have_text("1")
    expect(page.locator("#batch-eta")).to_have_text(re.compile(r"^took \d+ s$"))
    expect(page.get_by_role("link", name="Download CSV")).to_have_attribute("href", re.compile(r"predictions\.csv$"))
    expect(page.get_by_role("link", name=trained_model.name)).to_have_attribute("href", f"/models/{trained_model.pk}/")
    shot(page, "batch")
    page.get_by_role("button", name="Delete").click()  # the fixture accepts the confirm()
    expect(page).to_have_url(re.compile(rf"/models/{trained_model.pk}/$"))
    expect(page.locator("#batches")).to_contain_text("No batches yet")
    assert not page.js_errors, page.js_errors


def _painted(page, selector: str) -> bool:
    """Whether any pixel of the canvas was drawn on."""
    return page.evaluate(
        """s => { const c = document.querySelector(s);
                  return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v !== 0); }""",
        selector,
    )


def test_deleting_a_model_asks_first_and_then_its_endpoint_answers_404(page, shot, trained_model):
    """The issue: a model could not be deleted, in the UI or the API."""
    from apps.serving.models import TrainedModel
    from tests.apps.conftest import stored_files

    sign_in(page, "ada")
    page.goto(f"/models/{trained_model.pk}/")
    shot(page, "model-with-delete")
    asked: list[str] = []
    page.on("dialog", lambda dialog: asked.append(dialog.message))  # the page fixture accepts it
    page.get_by_role("button", name="Delete model").click()
    expect(page.get_by_role("status")).to_contain_text("deleted; its prediction endpoint answers 404")
    assert "Its endpoint will answer 404" in asked[0]
    shot(page, "dashboard-after-model-delete")
    assert not TrainedModel.objects.filter(pk=trained_model.pk).exists()
    assert stored_files(trained_model.storage_prefix) == set()
    assert page.goto(f"/models/{trained_model.pk}/").status == 404  # its page, like its endpoint


INT8_FIGURES = {  # as ml.quantize reports a kept model (hymenoptera's Lite1 probe, measured here)
    "kept": True,
    "reason": "Kept: top-1 agreement 100.0% and accuracy 100.0% against fp32's 100.0% on 181 training images "
    "its calibration did not read.",
    "method": "ONNX Runtime static quantization (QDQ): int8 weights per channel, uint8 activations, "
    "MinMax ranges over 64 training images",
    "calibration_images": 64,
    "check_images": 181,
    "agreement": 1.0,
    "accuracy_fp32": 1.0,
    "accuracy_int8": 1.0,
    "val_images": 153,
    "val_agreement": 0.9804,
    "val_accuracy_fp32": 0.9673,
    "val_accuracy_int8": 0.9608,
    "batch_1_ms_fp32": 19.02,
    "batch_1_ms_int8": 7.92,
    "batch": 8,
    "batch_ms_fp32": 121.3,
    "batch_ms_int8": 64.0,
    "seconds": 12.6,
    "file": "model.int8.onnx",
    "arithmetic": "saturating",  # served on every CPU
    "refit_agreement": 0.9945,
    "held": True,
}


def test_the_model_page_follows_the_int8_step_and_then_leads_with_its_speed(page, shot, trained_model, monkeypatch):
    from django.utils import timezone

    from apps.serving.models import TrainedModel

    rows = TrainedModel.objects.filter(pk=trained_model.pk)
    # Waiting for a worker longer than a working queue takes: the page offers to ask again.
    rows.update(int8_status="pending", int8_at=timezone.now() - timedelta(minutes=25))
    sign_in(page, "ada")
    page.goto(f"/models/{trained_model.pk}/")
    section = page.locator("#int8")
    expect(section).to_contain_text("Its int8 version waits for a worker (asked 25")
    expect(section.get_by_role("button", name="Ask again")).to_be_visible()
    page.locator("#h-int8").scroll_into_view_if_needed()
    shot(page, "model-int8-waiting")

    # A worker claims it: the page, still open, follows it without a reload.
    rows.update(int8_status="running", int8_at=timezone.now())
    expect(section).to_contain_text("A worker is making its int8 version", timeout=15_000)
    expect(section.get_by_role("button")).to_have_count(0)
    shot(page, "model-int8-running")

    # The worker finishes: the page shows the kept model's figures, still without a reload.
    TrainedModel.objects.filter(pk=trained_model.pk).update(int8_status="kept", int8=INT8_FIGURES)
    expect(section).to_contain_text(
        "it runs 2.4× faster per image alone and 1.9× faster in batches of 8", timeout=15_000
    )
    expect(section).to_contain_text("(7.9 ms against 19.0 ms a pass alone, 64.0 ms against 121.3 ms a batch of 8 on")
    expect(section).to_contain_text("on 100.0% of 181 training images it was not calibrated on")
    expect(section).to_contain_text("(and on 99.5% of them answered by heads refitted without them, as new images are)")
    expect(section).to_contain_text("98.0% of 153 validation images, where it scores 96.1% (fp32: 96.7%)")
    expect(page.locator("#bundle-size")).to_contain_text("its int8 version")
    page.locator("#h-int8").scroll_into_view_if_needed()
    shot(page, "model-int8-kept")

    # Checked on a CPU that multiplies int8 exactly, and served by one whose products saturate: it
    # serves in fp32 here, and the page says why.
    import ml.predict

    monkeypatch.setattr(ml.predict, "int8_arithmetic", lambda: "saturating")
    rows.update(int8={**INT8_FIGURES, "arithmetic": "exact"})
    page.reload()
    expect(section).to_contain_text("Its int8 version was kept, 2.4× faster per image alone and 1.9× faster in batches")
    expect(section).to_contain_text("but it serves in fp32 here")
    expect(page.locator("#int8-not-served")).to_contain_text("an x86 CPU without VNNI")
    page.locator("#h-int8").scroll_into_view_if_needed()
    shot(page, "model-int8-kept-not-served")

    # A test from before the arithmetic was recorded is taken as exact, and the page says so.
    rows.update(int8={k: v for k, v in INT8_FIGURES.items() if k != "arithmetic"})
    page.reload()
    expect(page.locator("#int8-not-served")).to_contain_text("tested before Graft recorded how the tester's CPU")

    # One faster only in batches (a 64-px model), from a step that timed both: the page does not call it faster alone.
    monkeypatch.setattr(ml.predict, "int8_arithmetic", lambda: "exact")
    batched = {
        **INT8_FIGURES,
        "batch_1_ms_fp32": 0.78,
        "batch_1_ms_int8": 0.79,
        "batch_ms_fp32": 4.0,
        "batch_ms_int8": 2.1,
    }
    rows.update(int8=batched)
    page.reload()
    expect(section).to_contain_text(
        "it runs as fast per image alone and 1.9× faster in batches of 8, as it serves under load"
    )
    expect(section).to_contain_text("(0.79 ms against 0.78 ms a pass alone, 2.1 ms against 4.0 ms a batch of 8 on")

    # A step from before the batched passes were timed: batch 1 alone.
    rows.update(int8={k: v for k, v in INT8_FIGURES.items() if not k.startswith("batch_ms")})
    page.reload()
    expect(section).to_contain_text("it runs 2.4× faster per image (7.9 ms against 19.0 ms a pass on")


def test_a_refused_int8_model_says_why_and_an_old_model_can_ask_for_one(page, shot, trained_model):
    from apps.serving.models import TrainedModel

    refused = {
        **INT8_FIGURES,
        "kept": False,
        "file": None,
        "agreement": 0.75,
        "held": False,
        "val_accuracy_int8": 0.5267,
        "reason": "Refused: top-1 agreement 75.0% and accuracy 75.2% against fp32's 99.4% on 256 training images "
        "its calibration did not read; it must agree on 98%.",
    }
    TrainedModel.objects.filter(pk=trained_model.pk).update(int8_status="refused", int8=refused)
    sign_in(page, "ada")
    page.goto(f"/models/{trained_model.pk}/")
    section = page.locator("#int8")
    expect(section).to_contain_text("It serves in fp32: its int8 version did not predict as it does")
    expect(section).to_contain_text("it must agree on 98%")
    expect(section).to_contain_text("it would have scored 52.7% (fp32: 96.7%)")
    shot(page, "model-int8-refused")

    # One that held, but was no faster (a 64-px model): the page says that, not that it differed.
    slow = {
        **INT8_FIGURES,
        "kept": False,
        "file": None,
        "batch_1_ms_fp32": 0.78,
        "batch_1_ms_int8": 0.84,
        "batch_ms_fp32": 4.0,
        "batch_ms_int8": 4.1,
        "reason": "Refused: it would serve no faster than fp32 here (0.84 against 0.78 ms a pass at batch 1; "
        "4.10 against 4.00 ms a pass at batch 8), though it held.",
    }
    TrainedModel.objects.filter(pk=trained_model.pk).update(int8_status="refused", int8=slow)
    page.reload()
    expect(section).to_contain_text(
        "its int8 version predicted as it does, but would serve no faster (0.84 ms against 0.78 ms a pass alone, "
        "4.1 ms against 4.0 ms a batch of 8 on"
    )
    expect(section).to_contain_text("it gave the same top label on 98.0% and scored 96.1% (fp32: 96.7%)")
    expect(section).not_to_contain_text("did not predict as it does")
    page.locator("#h-int8").scroll_into_view_if_needed()
    shot(page, "model-int8-no-faster")

    # A model from before the int8 step can ask for one; this one's job has no dataset to calibrate on.
    TrainedModel.objects.filter(pk=trained_model.pk).update(int8_status="", int8={})
    page.reload()
    page.get_by_role("button", name="Make an int8 model").click()
    expect(page.locator(".notice.error")).to_contain_text("trained on")
    assert TrainedModel.objects.get(pk=trained_model.pk).int8_status == ""
