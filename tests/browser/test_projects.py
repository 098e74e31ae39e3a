"""Projects in headless Chromium (issue 21): the dashboard's timelines, a project's page (retrain,
compare, publish, rename, delete), the compare page, the label queue and a batch's predictions.

Datasets are tiny and fixed-split (red "cat" and blue "dog" squares), trained as linear probes on
the real Celery worker; what is not under test (upload, the first training) goes through the API.
Screenshots at 1280 and 390 px: test-artifacts/screenshots/projects-*.png.
"""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from tests.apps import conftest as apps_conftest
from tests.browser.conftest import sign_in
from tests.conftest import image_bytes, make_zip

api_for = apps_conftest.api_for  # a fixture: token clients for what the test sets up over the API

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

TRAIN_MS = 300_000
RED, BLUE = (210, 40, 40), (40, 60, 210)
MISLABELLED = "val/cat/blue_0.png"  # a blue square filed as a cat: the relabel fixes it


def _members() -> dict[str, bytes]:
    """train/ and val/ of red cats and blue dogs, and one blue square in val/cat."""
    out, seed = {}, 0
    for split, n in (("train", 6), ("val", 3)):
        for name, colour in (("cat", RED), ("dog", BLUE)):
            for i in range(n):
                seed += 1
                out[f"{split}/{name}/{name}_{i}.png"] = image_bytes(color=colour, seed=seed)
    out[MISLABELLED] = image_bytes(color=BLUE, seed=999)
    return out


def _project(api, tmp_path, name: str = "pets") -> int:
    r = api.upload(make_zip(tmp_path / f"{name}.zip", _members()), f"{name}.zip", name=name)
    assert r.status_code == 201, r.text
    assert api.wait(f"/datasets/{r.json()['id']}/", ("ready", "failed"), timeout=180)["status"] == "ready"
    return r.json()["id"]


def _train(api, pid: int) -> dict:
    r = api.call("POST", "/jobs/", json={"dataset": pid, "strategy": "linear"})
    assert r.status_code == 201, r.text
    job = api.wait(f"/jobs/{r.json()['id']}/", ("succeeded", "failed", "cancelled"), timeout=TRAIN_MS / 1000)
    assert job["status"] == "succeeded", job
    return job


def _predict(api, path: str, seed: int = 5, colour=BLUE):
    return api.call("POST", path, files={"image": ("photo.png", image_bytes(color=colour, seed=seed))})


def test_retrain_compare_publish_rename_and_delete(page, shot, live_server, celery_worker_process, api_for, tmp_path):
    api = api_for("ada")
    pid = _project(api, tmp_path)
    sign_in(page, "ada")

    # The dashboard shows the project before any model: what to do next.
    projects = page.locator("#datasets")
    card = projects.locator(f'article.project[data-project="{pid}"]')
    expect(card).to_contain_text("pets")
    expect(card.locator(".badge").first).to_have_text("ready")
    expect(card).to_contain_text("No model yet")
    shot(page, "projects-dashboard-new")

    first = _train(api, pid)
    a = first["model"]
    # Relabel the blue square filed as a cat: version 2.
    rows = api.call("GET", f"/datasets/{pid}/versions/1/images/", params={"split": "val"}).json()["results"]
    blue = next(r for r in rows if r["member"] == MISLABELLED)
    r = api.call(
        "POST", f"/datasets/{pid}/versions/", json={"relabel": {blue["sha256"]: "dog"}, "note": "blue is a dog"}
    )
    assert r.status_code in (200, 201, 202), r.text
    assert api.wait(f"/datasets/{pid}/versions/2/", ("ready", "failed"), timeout=120)["status"] == "ready"

    # The project page: v2 on top with no model yet, the first model under v1; Retrain in one click.
    page.goto(f"/projects/{pid}/")
    expect(page.locator("h1")).to_contain_text("pets")
    versions = page.locator("#timeline .tl-version")
    expect(versions).to_have_count(2)
    expect(versions.first).to_contain_text("v2")
    expect(versions.first).to_contain_text("1 relabelled")
    expect(versions.nth(1).locator(f'.tl-model[data-model="{a}"]')).to_have_count(1)
    expect(page.locator("#served-by")).to_contain_text("No model is published yet")
    expect(page.locator("#project-curl")).to_contain_text(f"/api/v1/projects/{pid}/predict/")
    old_row = page.locator(f'.tl-model[data-model="{a}"]')
    old_row.get_by_role("button", name="Retrain on v2").click()
    expect(page).to_have_url(re.compile(r"/jobs/\d+/$"))
    job_id = int(re.search(r"/jobs/(\d+)/$", page.url).group(1))
    page.goto(f"/projects/{pid}/")
    if page.locator("#timeline .tl-job").count():  # still training: shown under v2, live state named
        expect(versions.first.locator(".tl-job")).to_contain_text(f"Job {job_id}")
        shot(page, "projects-project-training")
        # The page follows the job and shows its model once it ends, without a reload by hand.
        expect(versions.first.locator(".tl-model")).to_have_count(1, timeout=TRAIN_MS)
    second = api.wait(f"/jobs/{job_id}/", ("succeeded", "failed", "cancelled"), timeout=TRAIN_MS / 1000)
    assert second["status"] == "succeeded" and second["version"] == 2, second
    assert second["config"]["strategy"] == "linear"
    b = second["model"]

    # Both models on the timeline, each under its version; tick both and compare.
    page.goto(f"/projects/{pid}/")
    expect(versions.first.locator(f'.tl-model[data-model="{b}"]')).to_have_count(1)
    go = page.locator("#compare-go")
    expect(go).to_have_attribute("aria-disabled", "true")
    page.locator(f'.tl-model[data-model="{b}"]').get_by_label("Compare").check()
    old_row.get_by_label("Compare").check()
    expect(go).to_have_attribute("href", f"/models/compare/?a={a}&b={b}")  # the older model is A
    shot(page, "projects-project-picked")
    go.click()

    # The compare page: scores with signed deltas, per class, two matrices, the image B fixed.
    expect(page).to_have_url(re.compile(rf"/models/compare/\?a={a}&b={b}$"))
    expect(page.locator("#model-a")).to_have_attribute("href", f"/models/{a}/")
    expect(page.locator("#metric-table tbody tr")).to_have_count(4)
    expect(page.locator("#per-class-table tbody tr")).to_have_count(2)
    expect(page.locator("#confusions table.heatmap")).to_have_count(2)
    fixed = page.locator("#fixed figure")
    expect(fixed).to_have_count(1)
    expect(fixed.locator(".file-name")).to_have_text(MISLABELLED)
    expect(fixed.locator(".verdict")).to_contain_text("true cat · A said dog")
    fixed_img = fixed.locator("img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=fixed_img.element_handle())
    shot(page, "projects-compare")
    fixed.locator("button.enlarge").click()
    expect(page.locator("#lightbox")).to_be_visible()
    expect(page.locator("#lightbox-caption")).to_contain_text(MISLABELLED)
    shot(page, "projects-compare-enlarged")
    page.keyboard.press("Escape")
    expect(page.locator("#lightbox")).to_be_hidden()

    # Publish B from the compare page: the project's URL answers with it (a program's request).
    page.get_by_role("button", name="Publish B").click()
    expect(page).to_have_url(re.compile(rf"/projects/{pid}/$"))
    expect(page.locator("#served-by")).to_contain_text("Served by")
    expect(page.locator(f'.tl-model[data-model="{b}"] .badge.published')).to_be_visible()
    r = _predict(api, f"/projects/{pid}/predict/")
    assert r.status_code == 200 and r.json()["model"]["id"] == b, r.text
    assert r.json()["predictions"][0][0]["label"] == "dog"

    # Rename the old model in place, then delete it (asked first); the URL still serves B.
    old_row.get_by_role("button", name="Rename").click()
    old_row.get_by_label("New name").fill("pets, before the relabel")
    old_row.get_by_label("New name").press("Enter")
    expect(old_row.locator(".model-name")).to_have_text("pets, before the relabel")
    assert api.call("GET", f"/models/{a}/").json()["name"] == "pets, before the relabel"
    shot(page, "projects-project")
    old_row.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("status")).to_contain_text("Model 'pets, before the relabel' deleted")
    expect(page.locator(f'.tl-model[data-model="{a}"]')).to_have_count(0)
    assert api.call("GET", f"/models/{a}/").status_code == 404
    assert _predict(api, f"/projects/{pid}/predict/").json()["model"]["id"] == b

    # The dashboard: the project's timeline with the published model.
    page.goto("/")
    expect(card.locator(f'.tl-model[data-model="{b}"] .badge.published')).to_be_visible()
    expect(card.locator(".project-head")).to_contain_text("serving")
    shot(page, "projects-dashboard")
    assert not page.js_errors, page.js_errors


def test_kept_predictions_labelled_in_the_queue_become_a_version_and_retrain(
    page, shot, live_server, celery_worker_process, api_for, tmp_path
):
    from apps.serving.models import PredictionRecord

    api = api_for("ada")
    pid = _project(api, tmp_path)
    job = _train(api, pid)
    model = job["model"]
    assert api.call("PATCH", f"/models/{model}/", json={"prediction_log": "with_images"}).status_code == 200
    for i in range(10):  # purple-ish squares: between the classes, so the margins differ
        colour = (120 + 9 * i, 40, 210 - 9 * i)
        assert _predict(api, f"/models/{model}/predict/", seed=300 + i, colour=colour).status_code == 200
    deadline = time.monotonic() + 30
    while PredictionRecord.objects.exclude(image="").count() < 10 and time.monotonic() < deadline:
        time.sleep(0.2)

    # The model page links to the queue.
    sign_in(page, "ada")
    page.goto(f"/models/{model}/")
    expect(page.locator(".model-project")).to_contain_text("pets")
    page.get_by_role("link", name="Label these predictions").click()
    expect(page).to_have_url(re.compile(rf"/projects/{pid}/label/$"))
    tiles = page.locator("#label-grid .label-tile")
    expect(tiles).to_have_count(10)
    expect(page.locator("#queue-status")).to_contain_text("10 images wait for a label")
    margins = [float(t.removeprefix("margin ")) for t in page.locator("#label-grid .margin").all_text_contents()]
    assert margins == sorted(margins), margins  # least certain first
    for i in range(3):
        _expect_loaded(page, tiles.nth(i).locator("img"))
    shot(page, "projects-label-queue")

    # One by key, one by a click, three as a selection; one skipped.
    tiles.nth(0).focus()
    page.keyboard.press("1")  # cat
    expect(tiles.nth(0)).to_have_class(re.compile(r"\blabelled\b"))
    expect(tiles.nth(1)).to_be_focused()
    tiles.nth(1).get_by_role("button", name="dog").click()
    tiles.nth(2).get_by_role("button", name="Skip").click()
    for i in (3, 4, 5):
        tiles.nth(i).locator("input[type=checkbox]").check()
    expect(page.locator("#selection-count")).to_have_text("3 selected")
    page.locator("#bulk-class").select_option("dog")
    add = page.locator("#add-version")
    expect(add).to_have_text("Add 5 labelled images as a new version")
    expect(page.locator("#labelled-detail")).to_have_text("cat 1 · dog 4")
    shot(page, "projects-label-picked")
    add.click()

    # The new version's progress, then Retrain with the model's options.
    expect(page.locator("#version-status")).to_contain_text("ready", timeout=180_000)
    expect(page.locator("#version-status")).to_contain_text("5 of your 5 labelled images added")
    expect(tiles).to_have_count(5)
    shot(page, "projects-label-done")
    page.get_by_role("button", name="Retrain on version 2").click()
    expect(page).to_have_url(re.compile(r"/jobs/\d+/$"))
    job_id = int(re.search(r"/jobs/(\d+)/$", page.url).group(1))
    retrained = api.call("GET", f"/jobs/{job_id}/").json()
    assert retrained["version"] == 2 and retrained["config"]["strategy"] == "linear", retrained

    # A batch over the project's images: its predictions, least confident first, by label.
    r = api.call("POST", f"/models/{model}/batch/", json={"dataset": pid, "k": 2})
    assert r.status_code == 202, r.text
    page.goto(f"/batches/{r.json()['id']}/")
    expect(page.locator("#batch-status")).to_have_text("succeeded", timeout=120_000)
    items = page.locator("#item-grid .batch-item")
    expect(items.first).to_be_visible()
    chips = page.locator("#item-labels .chip")
    expect(chips.first).to_contain_text("All")
    total = int(chips.first.locator(".count").text_content())
    assert total == items.count()
    scores = [
        float(s.rstrip("%")) for s in page.locator("#item-grid .verdict").all_inner_texts() for s in [s.split()[-1]]
    ]
    assert scores == sorted(scores), scores
    _expect_loaded(page, items.first.locator("img"))
    shot(page, "projects-batch")
    dog = chips.filter(has_text="dog")
    dogs = int(dog.locator(".count").text_content())
    dog.click()
    expect(dog).to_have_attribute("aria-pressed", "true")
    expect(items).to_have_count(dogs)
    expect(page.locator("#items-status")).to_contain_text("whose top label is dog")
    assert not page.js_errors, page.js_errors
    # The retrained model, on the labelled version (and nothing left running at teardown).
    done = api.wait(f"/jobs/{job_id}/", ("succeeded", "failed", "cancelled"), timeout=TRAIN_MS / 1000)
    assert done["status"] == "succeeded", done


def _expect_loaded(page, img) -> None:
    img.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())


def test_what_the_dashboard_leaves_out_is_one_click_away(page, shot, make_user):
    """The dashboard shows the newest few jobs and models; the rest are on "All" pages, a page of 50
    at a time, each row a link to open (and delete) it."""
    from apps.datasets.models import Dataset
    from apps.serving.models import TrainedModel
    from apps.training.models import Job
    from tests.browser.conftest import PASSWORD

    ada = make_user("ada", PASSWORD)
    project = Dataset.objects.create(owner=ada, name="pets", status=Dataset.Status.READY, num_images=120)
    for _ in range(55):
        Job.objects.create(owner=ada, dataset=project, status=Job.Status.SUCCEEDED, strategy={"name": "linear"})
    for i in range(7):
        TrainedModel.objects.create(
            owner=ada, dataset=project, name=f"pets v1 · linear #{i + 1}", metrics={"val_accuracy": 0.9 + i / 100}
        )
    sign_in(page, "ada")
    expect(page.locator("#jobs li")).to_have_count(8)
    expect(page.locator("#models li")).to_have_count(6)
    shot(page, "dashboard-all-links")
    page.locator("#all-models").click()
    expect(page.locator("h1")).to_have_text("Models")
    expect(page.locator("#all-items li")).to_have_count(7)
    expect(page.locator("#all-items li").first).to_contain_text("pets v1 · linear #7")  # newest first
    page.go_back()
    page.locator("#all-jobs").click()
    expect(page.locator("#all-count")).to_contain_text("55 in all, newest first · page 1 of 2")
    expect(page.locator("#all-items li")).to_have_count(50)
    shot(page, "all-jobs")
    page.get_by_role("link", name="Older").click()
    expect(page.locator("#all-items li")).to_have_count(5)
    oldest = Job.objects.filter(owner=ada).order_by("created_at").first()
    page.locator("#all-items li a").last.click()
    expect(page).to_have_url(re.compile(f"/jobs/{oldest.pk}/$"))
    assert page.goto("/all/secrets/").status == 404
    assert page.goto("/all/jobs/?page=²").status == 200  # an odd page number: the first page
