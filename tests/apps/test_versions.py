"""Dataset versions over HTTP, with the real worker: change sets, added images, the finders' results,
export, and what the meter charges. A second user reaches none of it."""

from __future__ import annotations

import csv
import io
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from apps.accounts.quotas import usage
from apps.datasets.models import Dataset
from tests.apps.conftest import stored_files
from tests.conftest import class_folders, image_bytes, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _upload(api, tmp_path: Path, members: dict[str, bytes], name: str = "pets") -> dict:
    data = make_zip(tmp_path / f"{name}.zip", members).read_bytes()
    r = api.upload(data, f"{name}.zip", name=name)
    assert r.status_code == 201, r.text
    body = api.wait(f"/datasets/{r.json()['id']}/", ("ready", "failed"), timeout=180)
    assert body["status"] == "ready", body
    return body


def _images(api, dataset_id: int, number: int, **params) -> list[dict]:
    r = api.call("GET", f"/datasets/{dataset_id}/versions/{number}/images/", params={"page_size": 200, **params})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _split_counts(rows: list[dict]) -> Counter:
    return Counter((row["split"], row["label"]) for row in rows)


def test_change_sets_make_versions_that_export_and_upload_again(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    body = _upload(api, tmp_path, class_folders({"cats": 10, "dogs": 10, "owls": 8}))
    ds = body["id"]
    # v1 is the upload, with every image's split written down (the stratified 80/20 a fit makes).
    versions = api.call("GET", f"/datasets/{ds}/versions/").json()
    assert [v["number"] for v in versions] == [1]
    assert {c["name"]: (c["train"], c["val"]) for c in body["classes"]} == {
        "cats": (8, 2),
        "dogs": (8, 2),
        "owls": (6, 2),
    }
    v1 = _images(api, ds, 1)
    assert len(v1) == 28 and {row["split"] for row in v1} == {"train", "val"}

    cats = [row for row in v1 if row["label"] == "cats"]
    relabel = {row["sha256"]: "dogs" for row in cats[:3]}
    remove = [row["sha256"] for row in v1 if row["label"] == "owls"][:2]
    r = api.call(
        "POST", f"/datasets/{ds}/versions/", json={"parent": 1, "relabel": relabel, "remove": remove, "note": "fix"}
    )
    assert r.status_code == 201, r.text
    v2 = r.json()
    assert (v2["number"], v2["parent"], v2["status"], v2["note"]) == (2, 1, "ready", "fix")
    assert v2["summary"] == {"relabelled": 3, "removed": 2, "added": 0}
    assert {c["name"]: c["count"] for c in v2["classes"]} == {"cats": 7, "dogs": 13, "owls": 6}
    # Relabelled images keep their split; v1 is unchanged.
    after = {row["sha256"]: row for row in _images(api, ds, 2)}
    for row in cats[:3]:
        assert (after[row["sha256"]]["label"], after[row["sha256"]]["split"]) == ("dogs", row["split"])
    assert not set(remove) & set(after)
    assert len(_images(api, ds, 1)) == 28
    assert api.call("GET", f"/datasets/{ds}/").json()["num_images"] == 26  # the dataset is its newest version
    # Filters.
    assert {row["label"] for row in _images(api, ds, 2, label="owls")} == {"owls"}
    assert {row["split"] for row in _images(api, ds, 2, split="val")} == {"val"}

    # A change set made on v1 after v2 exists is refused, and so are changes that name nothing real.
    stale = api.call("POST", f"/datasets/{ds}/versions/", json={"parent": 1, "remove": [remove[0]]})
    assert stale.status_code == 409 and "Version 2 was saved after version 1" in stale.json()["error"]
    for change, words in [
        ({}, "empty"),
        ({"remove": ["f" * 64]}, "not in version 2"),
        ({"relabel": {cats[5]["sha256"]: "horses"}}, "'horses' is not a class"),
        ({"remove": [row["sha256"] for row in v1 if row["label"] == "owls"][2:6]}, "at least"),
    ]:
        r = api.call("POST", f"/datasets/{ds}/versions/", json=change)
        assert r.status_code == 400 and words in r.json()["error"], (change, r.text)
    assert [v["number"] for v in api.call("GET", f"/datasets/{ds}/versions/").json()] == [2, 1]

    # Export: the upload format with train/ and val/ folders; it uploads again as the same data.
    r = api.call("GET", f"/datasets/{ds}/versions/2/export/")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/zip"
    assert "pets-v2.zip" in r.headers["Content-Disposition"]
    assert int(r.headers["Content-Length"]) == len(r.content)  # known before the first byte: a download shows progress
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert len(names) == 26 and {n.split("/")[0] for n in names} == {"train", "val"}
    again = _upload(api, tmp_path, {n: zipfile.ZipFile(io.BytesIO(r.content)).read(n) for n in names}, "again")
    assert again["classes"] == v2["classes"]
    assert _split_counts(_images(api, again["id"], 1)) == _split_counts(list(after.values()))


def test_added_images_make_a_version_charged_once(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    body = _upload(api, tmp_path, class_folders({"cats": 6, "dogs": 6}))
    ds = body["id"]
    dataset = Dataset.objects.get(pk=ds)
    before = usage(dataset.owner).bytes_stored
    assert before == dataset.archive_bytes
    v1 = _images(api, ds, 1)
    api.call("POST", f"/datasets/{ds}/versions/", json={"relabel": {v1[0]["sha256"]: "dogs"}})  # v2, no bytes
    assert usage(dataset.owner).bytes_stored == before

    # Five new owls (a new class), one image already there, one already there under another class.
    old = class_folders({"cats": 6, "dogs": 6})
    members = {f"owls/new_{i}.png": image_bytes(seed=1000 + i) for i in range(5)}
    members["cats/same.png"] = old["cats/img_2.png"]
    members["owls/clash.png"] = old["dogs/img_3.png"]
    data = make_zip(tmp_path / "more.zip", members).read_bytes()
    r = api.call("POST", f"/datasets/{ds}/versions/", files={"file": ("more.zip", data)}, data={"note": "owls"})
    assert r.status_code == 202, r.text
    assert (r.json()["number"], r.json()["status"]) == (3, "processing")
    # While it is ingested, the line is busy: a change set waits.
    busy = api.call("POST", f"/datasets/{ds}/versions/", json={"remove": [v1[2]["sha256"]]})
    v3 = api.wait(f"/datasets/{ds}/versions/3/", ("ready", "failed"), timeout=180)
    assert busy.status_code in (201, 409)  # 409 while v3 was processing (201 only if it was already ready)
    assert v3["status"] == "ready", v3
    assert v3["summary"]["added"] == 5 and v3["parent"] == 2
    codes = {w["code"] for w in v3["warnings"]}
    assert {"duplicate", "label_conflict"} <= codes
    added = {row["sha256"]: row for row in v3["changes"]["added"]}
    assert Counter(row["split"] for row in added.values()) == Counter({"train": 4, "val": 1})
    assert {c["name"]: c["count"] for c in v3["classes"]}["owls"] == 5
    # The meter: the upload once, the added zip once, however many versions name their images.
    assert usage(dataset.owner).bytes_stored == before + len(data) == before + v3["archive_bytes"]
    # The added images have thumbnails and are in the export.
    sha = next(iter(added))
    r = api.call("GET", f"/datasets/{ds}/versions/3/images/", params={"label": "owls"})
    thumb = r.json()["results"][0]["thumbnail"]
    assert api.session.get(api.base.removesuffix("/api/v1") + thumb).status_code in (200, 302, 403)
    names = zipfile.ZipFile(io.BytesIO(api.call("GET", f"/datasets/{ds}/versions/3/export/").content)).namelist()
    assert len([n for n in names if "/owls/" in n]) == 5 and sha


def test_an_archive_of_nothing_new_fails_its_version_and_costs_nothing(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    old = class_folders({"cats": 6, "dogs": 6})
    body = _upload(api, tmp_path, old)
    ds = body["id"]
    owner = Dataset.objects.get(pk=ds).owner
    before = usage(owner).bytes_stored
    data = make_zip(tmp_path / "same.zip", {"cats/x.png": old["cats/img_0.png"]}).read_bytes()
    r = api.call("POST", f"/datasets/{ds}/versions/", files={"file": ("same.zip", data)})
    assert r.status_code == 202, r.text
    v2 = api.wait(f"/datasets/{ds}/versions/2/", ("ready", "failed"), timeout=120)
    assert v2["status"] == "failed" and "already in the dataset" in v2["error"]
    assert usage(owner).bytes_stored == before
    not_zip = api.call("POST", f"/datasets/{ds}/versions/", files={"file": ("x.zip", b"not a zip")})
    assert not_zip.status_code == 400 and "not a zip" in not_zip.json()["error"]
    # The failed version does not block the next change.
    rows = _images(api, ds, 1)
    r = api.call("POST", f"/datasets/{ds}/versions/", json={"relabel": {rows[0]["sha256"]: "dogs"}})
    assert r.status_code == 201 and r.json()["number"] == 3, r.text


def test_finders_results_reach_the_images_list(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    body = _upload(api, tmp_path, class_folders({"cats": 8, "dogs": 8}))
    ds = body["id"]
    found = api.wait(f"/datasets/{ds}/versions/1/findings/", ("ready", "failed"), timeout=300)
    assert found["status"] == "ready", found
    assert set(found) >= {"label_issues", "near_duplicates", "outliers"}
    v = api.call("GET", f"/datasets/{ds}/versions/1/").json()
    assert v["findings_summary"]["label_issues"] == len(found["label_issues"])
    flagged = _images(api, ds, 1, finder="flagged")
    facets = api.call("GET", f"/datasets/{ds}/versions/1/images/").json()["facets"]
    assert facets["flagged"] == len(flagged) and facets["label_issues"] == len(found["label_issues"])
    assert len(flagged) == len(
        {r["sha256"] for r in found["label_issues"] + found["outliers"]}
        | {s for d in found["near_duplicates"] for s in d["sha256s"]}
    )
    bad = api.call("GET", f"/datasets/{ds}/versions/1/images/", params={"finder": "nonsense"})
    assert bad.status_code == 400 and "Unknown finder" in bad.json()["error"]
    # The embeddings are kept by content for the next version, whose finders run by themselves.
    prefix = Dataset.objects.get(pk=ds).storage_prefix
    assert f"{prefix}embeddings.npz" in stored_files(prefix)
    # They hold what a fit of the version measures: a job trained on it reads them instead of extracting.
    r = api.call("POST", "/jobs/", json={"dataset": ds, "version": 1, "strategy": "linear"})
    job = api.wait(f"/jobs/{r.json()['id']}/", ("succeeded", "failed"), timeout=600)
    assert job["status"] == "succeeded", job["error"]
    assert any("read from the store" in line for line in job["report"]["log"]), job["report"]["log"]
    rows = _images(api, ds, 1)
    api.call(
        "POST",
        f"/datasets/{ds}/versions/",
        json={"relabel": {rows[0]["sha256"]: "dogs" if rows[0]["label"] == "cats" else "cats"}},
    )
    assert api.wait(f"/datasets/{ds}/versions/2/findings/", ("ready", "failed"), timeout=300)["status"] == "ready"


def test_a_second_user_reaches_none_of_it(celery_worker_process, api_for, tmp_path):
    alice, bob = api_for("alice"), api_for("bob")
    body = _upload(alice, tmp_path, class_folders({"cats": 6, "dogs": 6}))
    ds = body["id"]
    sha = _images(alice, ds, 1)[0]["sha256"]
    for method, path, kw in [
        ("GET", f"/datasets/{ds}/versions/", {}),
        ("GET", f"/datasets/{ds}/versions/1/", {}),
        ("GET", f"/datasets/{ds}/versions/1/images/", {}),
        ("GET", f"/datasets/{ds}/versions/1/findings/", {}),
        ("POST", f"/datasets/{ds}/versions/1/findings/", {}),
        ("GET", f"/datasets/{ds}/versions/1/export/", {}),
        ("POST", f"/datasets/{ds}/versions/", {"json": {"remove": [sha]}}),
        ("POST", "/jobs/", {"json": {"dataset": ds, "version": 1}}),
    ]:
        r = bob.call(method, path, **kw)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
    assert [v["number"] for v in alice.call("GET", f"/datasets/{ds}/versions/").json()] == [1]


def test_a_job_trains_on_the_version_it_names(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    body = _upload(api, tmp_path, class_folders({"cats": 6, "dogs": 6}))
    ds = body["id"]
    rows = _images(api, ds, 1)
    api.call("POST", f"/datasets/{ds}/versions/", json={"remove": [rows[0]["sha256"]]})
    assert api.call("POST", "/jobs/", json={"dataset": ds, "version": 7}).status_code == 400
    r = api.call("POST", "/jobs/", json={"dataset": ds, "version": 1, "strategy": "linear"})
    assert r.status_code == 201 and r.json()["version"] == 1, r.text
    newest = api.call("POST", "/jobs/", json={"dataset": ds, "strategy": "linear"})
    assert newest.json()["version"] == 2
    job = api.wait(f"/jobs/{r.json()['id']}/", ("succeeded", "failed"), timeout=600)
    assert job["status"] == "succeeded", job["error"]
    card = zipfile.ZipFile(io.BytesIO(api.call("GET", f"/models/{job['model']}/download/").content))
    text = card.read("model_card.md").decode()
    assert "Trained on: dataset pets, version 1" in text
    assert job["metrics"]["num_train"] + job["metrics"]["num_val"] == 12  # v1's images, not v2's 11


def test_images_added_over_tus_resume_and_make_a_version(celery_worker_process, api_for, tmp_path):
    from tests.apps.test_uploads import TUS, _meta, _patch

    alice, bob = api_for("alice"), api_for("bob")
    ds = _upload(alice, tmp_path, class_folders({"cats": 6, "dogs": 6}))["id"]
    data = make_zip(
        tmp_path / "more.zip", {f"dogs/more_{i}.png": image_bytes(seed=500 + i) for i in range(4)}
    ).read_bytes()
    meta = _meta(filename="more.zip", dataset=str(ds), note="four more dogs")
    # Bob cannot add to Alice's dataset.
    r = bob.call("POST", "/uploads/", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta})
    assert r.status_code == 404
    r = alice.call("POST", "/uploads/", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta})
    assert r.status_code == 201, r.text
    url = r.headers["Location"]
    half = len(data) // 2
    assert _patch(alice, url, 0, data[:half]).status_code == 204
    assert alice.session.head(url, headers=TUS, timeout=30).headers["Upload-Offset"] == str(half)
    r = _patch(alice, url, half, data[half:])
    assert r.status_code == 204, r.text
    assert (r.headers["Graft-Dataset"], r.headers["Graft-Version"]) == (str(ds), "2")
    v2 = alice.wait(f"/datasets/{ds}/versions/2/", ("ready", "failed"), timeout=180)
    assert (v2["status"], v2["note"], v2["summary"]["added"]) == ("ready", "four more dogs", 4)
    assert alice.call("GET", f"/datasets/{ds}/").json()["num_images"] == 16

    # Another upload that ends while images are being added (a second tab) waits: a 409 that says
    # so, and its file is kept; once the dataset is free, a HEAD finishes it without sending it again.
    from apps.datasets.models import DatasetVersion

    data = make_zip(tmp_path / "cats.zip", {f"cats/more_{i}.png": image_bytes(seed=600 + i) for i in range(4)})
    data = data.read_bytes()
    meta = _meta(filename="cats.zip", dataset=str(ds))
    r = alice.call("POST", "/uploads/", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta})
    url = r.headers["Location"]
    v2_row = DatasetVersion.objects.get(dataset_id=ds, number=2)
    busy = DatasetVersion.objects.create(dataset_id=ds, number=99, parent=v2_row, status="processing")
    r = _patch(alice, url, 0, data)
    assert r.status_code == 409 and "being added as version 99" in r.json()["error"], r.text
    assert "kept" in r.json()["error"]
    head = alice.session.head(url, headers=TUS, timeout=30)
    assert head.status_code == 409 and head.headers.get("Upload-Offset") in (None, str(len(data)))
    busy.delete()
    head = alice.session.head(url, headers=TUS, timeout=30)
    assert head.status_code == 200 and head.headers["Graft-Dataset"] == str(ds), head.headers
    number = head.headers["Graft-Version"]
    done = alice.wait(f"/datasets/{ds}/versions/{number}/", ("ready", "failed"), timeout=180)
    assert done["status"] == "ready" and done["summary"]["added"] == 4


def test_dismissed_findings_leave_the_finder_filters(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    ds = _upload(api, tmp_path, class_folders({"cats": 6, "dogs": 6}))["id"]
    api.wait(f"/datasets/{ds}/versions/1/findings/", ("ready", "failed"), timeout=300)
    rows = _images(api, ds, 1)
    flagged = _images(api, ds, 1, finder="flagged")
    target = [row["sha256"] for row in (flagged or rows)[:2]]
    r = api.call("POST", f"/datasets/{ds}/dismissals/", json={"sha256s": target})
    assert r.status_code == 200 and r.json() == {"dismissed": 2}
    after = {row["sha256"] for row in _images(api, ds, 1, finder="flagged")}
    assert not after & set(target)
    assert len(_images(api, ds, 1, finder="flagged", dismissed=1)) == len(flagged)
    assert all(row["dismissed"] == (row["sha256"] in target) for row in _images(api, ds, 1))
    r = api.call("POST", f"/datasets/{ds}/dismissals/", json={"sha256s": target[:1], "dismissed": False})
    assert r.json() == {"dismissed": 1}
    bad = api.call("POST", f"/datasets/{ds}/dismissals/", json={"sha256s": ["0" * 64]})
    assert bad.status_code == 400 and "not in this dataset" in bad.json()["error"]
    assert api_for("bob").call("POST", f"/datasets/{ds}/dismissals/", json={"sha256s": target}).status_code == 404


def test_deleting_a_version_frees_what_only_it_held(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    ds = _upload(api, tmp_path, class_folders({"cats": 6, "dogs": 6}))["id"]
    owner = Dataset.objects.get(pk=ds).owner
    start = usage(owner).bytes_stored
    more = make_zip(tmp_path / "more.zip", {f"dogs/m_{i}.png": image_bytes(seed=700 + i) for i in range(3)})
    r = api.call("POST", f"/datasets/{ds}/versions/", files={"file": ("more.zip", more.read_bytes())})
    assert api.wait(f"/datasets/{ds}/versions/2/", ("ready", "failed"), timeout=180)["status"] == "ready"
    assert usage(owner).bytes_stored == start + more.stat().st_size
    rows = _images(api, ds, 2)
    r = api.call("POST", f"/datasets/{ds}/versions/", json={"remove": [rows[0]["sha256"]]})  # v3 holds v2's images
    assert r.status_code == 201

    refused = api.call("DELETE", f"/datasets/{ds}/versions/2/")
    assert refused.status_code == 409 and "Version 3 also holds the images version 2 added" in refused.json()["error"]
    assert api.call("DELETE", f"/datasets/{ds}/versions/1/").status_code == 409
    assert api_for("bob").call("DELETE", f"/datasets/{ds}/versions/3/").status_code == 404

    assert api.call("DELETE", f"/datasets/{ds}/versions/3/").status_code == 204
    assert api.call("GET", f"/datasets/{ds}/").json()["num_images"] == 15  # v2 is the newest again
    assert api.call("DELETE", f"/datasets/{ds}/versions/2/").status_code == 204
    assert usage(owner).bytes_stored == start  # the added zip is gone, and its bytes from the meter
    prefix = Dataset.objects.get(pk=ds).storage_prefix
    assert not [f for f in stored_files(prefix) if "/additions/" in f]
    assert [v["number"] for v in api.call("GET", f"/datasets/{ds}/versions/").json()] == [1]
    assert api.call("GET", f"/datasets/{ds}/").json()["num_images"] == 12
    # Numbers are never given out again: the next version is 4, not a second 2 (a model card that
    # names version 2 keeps meaning the data it did).
    rows = _images(api, ds, 1)
    r = api.call("POST", f"/datasets/{ds}/versions/", json={"remove": [rows[0]["sha256"]]})
    assert r.status_code == 201 and r.json()["number"] == 4, r.text
    # While images are being added as version 5 from version 4, version 4 stays.
    from apps.datasets.models import DatasetVersion

    v4 = DatasetVersion.objects.get(dataset_id=ds, number=4)
    adding = DatasetVersion.objects.create(dataset_id=ds, number=5, parent=v4, status="processing")
    refused = api.call("DELETE", f"/datasets/{ds}/versions/4/")
    assert refused.status_code == 409 and "being added as version 5" in refused.json()["error"], refused.text
    adding.delete()


def test_a_batch_over_a_dataset_predicts_its_newest_version(celery_worker_process, api_for, make_tiny_model, tmp_path):
    """Images removed in a version are not predicted, and images added are: the batch reads the
    version that was newest when it was made, not the upload."""
    from django.contrib.auth.models import User

    api = api_for("alice")
    ds = _upload(api, tmp_path, class_folders({"cats": 6, "dogs": 6}))["id"]
    more = make_zip(tmp_path / "more.zip", {f"dogs/m_{i}.png": image_bytes(seed=700 + i) for i in range(3)})
    api.call("POST", f"/datasets/{ds}/versions/", files={"file": ("more.zip", more.read_bytes())})
    assert api.wait(f"/datasets/{ds}/versions/2/", ("ready", "failed"), timeout=180)["status"] == "ready"
    rows = _images(api, ds, 2)
    gone = next(r for r in rows if r["member"].endswith("img_0.png"))
    r = api.call("POST", f"/datasets/{ds}/versions/", json={"remove": [gone["sha256"]]})
    assert r.status_code == 201 and r.json()["num_images"] == 14, r.text

    model = make_tiny_model(User.objects.get(username="alice"), "pets")
    r = api.call("POST", f"/models/{model.pk}/batch/", json={"dataset": ds})
    assert r.status_code == 202, r.text
    batch = api.wait(f"/batches/{r.json()['id']}/", ("succeeded", "failed"), timeout=300)
    assert batch["status"] == "succeeded" and batch["total"] == 14, batch
    names = [
        row["file"]
        for row in csv.DictReader(io.StringIO(api.call("GET", batch["results"]["csv"].removeprefix("/api/v1")).text))
    ]
    assert len(names) == 14 and not any(n.endswith(gone["member"]) for n in names)
    assert sum("m_" in n for n in names) == 3  # the added images too
    # While a batch waits for a version, the version stays.
    from apps.serving.models import BatchPrediction

    waiting = BatchPrediction.objects.create(
        owner=model.owner, model=model, dataset_id=ds, version_id=batch_version(batch["id"]), name="again"
    )
    refused = api.call("DELETE", f"/datasets/{ds}/versions/3/")
    assert refused.status_code == 409 and "batch prediction waits" in refused.json()["error"], refused.text
    waiting.delete()


def batch_version(batch_id: int) -> int:
    from apps.serving.models import BatchPrediction

    return BatchPrediction.objects.get(pk=batch_id).version_id
