"""A model's int8 variant, made by the real worker: asked for over the API, kept or refused by its
rule, carried by the bundle, served; its owner's alone.

(The suite's worker does not make one after every job (GRAFT_INT8=0 in tests/settings.py); the
many-hosts test runs workers that do, as deployed.)
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from datetime import timedelta

import pytest
from django.core.files.storage import default_storage

from apps.accounts.quotas import usage
from apps.ops.sweep import sweep
from apps.serving.models import TrainedModel
from ml.quantize import serves_faster
from tests.apps.api_schema import schema_errors
from tests.apps.cluster import learnable_zip
from tests.conftest import image_bytes

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def trained(api_for, celery_worker_process, tmp_path):
    """alice's model: a linear probe trained by the worker on red and blue squares (24 of each)."""
    alice = api_for("alice")
    r = alice.upload(learnable_zip(tmp_path), "colours.zip")
    assert r.status_code in (201, 202), r.text
    dataset = alice.wait(f"/datasets/{r.json()['id']}/", ("ready", "failed"), 300)
    assert dataset["status"] == "ready", dataset.get("error")
    r = alice.call("POST", "/jobs/", json={"dataset": dataset["id"], "strategy": "linear"})
    assert r.status_code == 201, r.text
    job = alice.wait(f"/jobs/{r.json()['id']}/", ("succeeded", "failed"), 600)
    assert job["status"] == "succeeded", job.get("error")
    return alice, job["model"]


def _wait_int8(api, model_id: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api.call("GET", f"/models/{model_id}/").json()
        if body["int8_status"] not in ("pending", "running"):
            return body
        time.sleep(0.5)
    raise AssertionError(f"the int8 step did not finish: {body}")


def test_the_worker_makes_the_int8_model_and_the_server_serves_it(trained, api_for):
    alice, model_id = trained
    before = alice.call("GET", f"/models/{model_id}/").json()
    assert before["int8_status"] == "" and before["int8"] is None  # not made after the job here
    old_bundle = TrainedModel.objects.get(pk=model_id).bundle
    r = alice.call("POST", f"/models/{model_id}/predict/", files={"image": ("x.png", image_bytes(seed=1))})
    assert r.status_code == 200 and r.json()["model"]["precision"] == "fp32", r.text

    r = alice.call("POST", f"/models/{model_id}/int8/")
    assert r.status_code == 202 and r.json()["int8_status"] == "pending", r.text
    model = _wait_int8(alice, model_id)
    assert schema_errors(model, "ModelOutput") == []
    check = model["int8"]
    assert model["int8_status"] == ("kept" if check["kept"] else "refused"), check
    # What the rule read, and what the card reports beside it
    assert check["calibration_images"] > 0 and check["check_images"] > 0 and check["val_images"] > 0
    assert 0 <= check["agreement"] <= 1 and check["val_accuracy_fp32"] is not None
    assert check["reason"].startswith("Kept" if check["kept"] else "Refused")
    allowed = max(0.01, 1 / check["check_images"]) + 1e-9  # a point, or one image
    if check["kept"]:  # what kept it (a refusal names its reason: the tests of ml.quantize hold each to it)
        assert check["agreement"] >= 0.98 and check["accuracy_fp32"] - check["accuracy_int8"] <= allowed
        passes = check["batch_1_ms_fp32"], check["batch_1_ms_int8"], check["batch_ms_fp32"], check["batch_ms_int8"]
        assert check["calibration_agreement"] >= 0.98 and serves_faster(*passes)

    # The bundle was stored again, with the int8 model where kept and the figures in its card, and the
    # usage meter counts the new one. The old one stays for whoever read the row just before (a
    # download, a prediction), until the sweeper's grace period has passed.
    stored = TrainedModel.objects.get(pk=model_id)
    assert stored.bundle != old_bundle and default_storage.exists(old_bundle)
    swept = {r["name"] for r in sweep(grace=timedelta(0), scratch=False).removed}
    assert old_bundle in swept and not default_storage.exists(old_bundle)
    assert stored.bundle not in swept and default_storage.exists(stored.bundle)
    assert model["bundle_sha256"] == stored.bundle_sha256 != before["bundle_sha256"]
    r = alice.call("GET", f"/models/{model_id}/download/")
    bundle = zipfile.ZipFile(io.BytesIO(r.content))
    assert len(r.content) == model["bundle_bytes"] == stored.bundle_bytes
    assert ("model.int8.onnx" in bundle.namelist()) == check["kept"]
    assert json.loads(bundle.read("graft.json"))["int8"] == check
    assert "## Int8 model" in bundle.read("model_card.md").decode()
    assert usage(stored.owner).bytes_stored >= stored.bundle_bytes

    # The server serves the new bundle: int8 where it was kept (its worker ran on this CPU).
    assert (model["served_precision"], model["served_precision_note"]) == ("int8" if check["kept"] else "fp32", None)
    r = alice.call("POST", f"/models/{model_id}/predict/", files={"image": ("x.png", image_bytes(seed=1))})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["precision"] == ("int8" if check["kept"] else "fp32")
    assert r.json()["predictions"][0][0]["label"] in ("red", "blue")

    # Made, it is not made twice: asked again, a 409 that says how it went.
    r = alice.call("POST", f"/models/{model_id}/int8/")
    assert r.status_code == 409 and "made already" in r.json()["error"] and check["reason"] in r.json()["error"]

    # Another user reaches none of it.
    bob = api_for("bob")
    assert bob.call("POST", f"/models/{model_id}/int8/").status_code == 404
    assert bob.call("GET", f"/models/{model_id}/").status_code == 404


def test_a_model_whose_job_is_gone_cannot_be_quantized_and_says_why(trained):
    alice, model_id = trained
    model = TrainedModel.objects.get(pk=model_id)
    job_id = model.job_id
    assert alice.call("DELETE", f"/jobs/{job_id}/").status_code == 204
    r = alice.call("POST", f"/models/{model_id}/int8/")
    assert r.status_code == 409 and "trained on" in r.json()["error"], r.text
    assert TrainedModel.objects.get(pk=model_id).int8_status == ""


def test_a_step_on_its_way_is_left_to_finish_and_a_silent_one_fails_with_a_sentence(trained):
    """Asked again while pending, the step is not queued twice, unless it has waited long (a lost
    message); a running step whose worker went silent is failed by beat, and can be asked for again."""
    from django.utils import timezone

    from apps.serving.quantization import ASK_AGAIN_AFTER, int8_recover_stale
    from apps.training.tasks import recover_stale_jobs

    alice, model_id = trained
    rows = TrainedModel.objects.filter(pk=model_id)
    an_hour_ago = timezone.now() - timedelta(hours=1)
    # Pending a moment: asked again, it is left as it is (no second message).
    rows.update(int8_status="pending", int8_at=timezone.now())
    asked = rows.get().int8_at
    r = alice.call("POST", f"/models/{model_id}/int8/")
    assert r.status_code == 202 and r.json()["int8_status"] == "pending" and rows.get().int8_at == asked
    # Pending for longer than a working queue takes: queued again, and the worker makes it.
    rows.update(int8_status="pending", int8_at=timezone.now() - ASK_AGAIN_AFTER - timedelta(seconds=1))
    r = alice.call("POST", f"/models/{model_id}/int8/")
    assert r.status_code == 202 and rows.get().int8_at > asked
    assert _wait_int8(alice, model_id)["int8_status"] in ("kept", "refused")

    # Running, its worker silent for longer than the stale time: beat fails it.
    rows.update(int8_status="running", int8={}, int8_at=an_hour_ago)
    assert model_id in recover_stale_jobs()["int8"] and int8_recover_stale() == []
    body = alice.call("GET", f"/models/{model_id}/").json()
    assert body["int8_status"] == "failed" and "stopped before it finished" in body["int8"]["error"]
    assert schema_errors(body, "ModelOutput") == []
    r = alice.call("POST", f"/models/{model_id}/int8/")
    assert r.status_code == 202 and r.json()["int8_status"] == "pending", r.text
    assert _wait_int8(alice, model_id)["int8_status"] in ("kept", "refused")


def test_no_int8_step_is_queued_while_storage_is_full_and_it_says_why(trained, settings):
    """The int8 model is stored in the bundle beside the fp32 one: with storage full it is refused with
    a sentence (413), nothing is queued, and once there is room it is made."""
    alice, model_id = trained
    owner = TrainedModel.objects.get(pk=model_id).owner
    settings.GRAFT_QUOTA_BYTES = usage(owner).bytes_stored  # exactly full
    r = alice.call("POST", f"/models/{model_id}/int8/")
    assert r.status_code == 413, r.text
    assert "storage is full" in r.json()["error"] and "serves in fp32" in r.json()["error"]
    assert TrainedModel.objects.get(pk=model_id).int8_status == ""  # not pending: no step on its way

    settings.GRAFT_QUOTA_BYTES = usage(owner).bytes_stored + 10 * 2**20
    r = alice.call("POST", f"/models/{model_id}/int8/")
    assert r.status_code == 202 and r.json()["int8_status"] == "pending", r.text
    assert _wait_int8(alice, model_id)["int8_status"] in ("kept", "refused")
