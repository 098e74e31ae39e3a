"""A person in headless Chromium: sign up, upload, watch, train, inspect, try the model, manage tokens.

Runs against the live server, the real PostgreSQL + Redis and a real Celery worker process.
Every page visited is screenshotted (test-artifacts/screenshots/<name>-1280.png and -390.png).
"""

from __future__ import annotations

import re
import zipfile

import pytest
import requests
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, sign_in

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

BEE = "val/bees/220376539_20567395d8.jpg"  # a clear bee: the default model scores it ~0.93 "bees"
UPLOAD_BYTES_PER_S = 4 * 1024**2  # throttled so the upload's progress can be seen (~11 s for hymenoptera.zip)
INGEST_MS = 180_000
TRAIN_MS = 600_000


def test_the_whole_story(page, shot, live_server, celery_worker_process, datasets_dir, tmp_path):
    archive = datasets_dir / "hymenoptera.zip"

    # Sign up -> signed in, on the dashboard.
    page.goto("/accounts/signup/")
    shot(page, "signup")
    page.locator("#id_username").fill("ada")
    page.locator("#id_password1").fill(PASSWORD)
    page.locator("#id_password2").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(f"{live_server.url}/")
    expect(page.locator("h1")).to_have_text("Your work")
    for section in ("#datasets", "#jobs", "#models"):
        expect(page.locator(section)).to_be_attached()
    shot(page, "dashboard")

    # Upload: choosing the file starts it; progress shows bytes and a percent; then the dataset page.
    page.get_by_role("link", name="Upload a dataset").click()
    expect(page).to_have_url(f"{live_server.url}/upload/")
    for selector in ("#file-input", "#folder-input", "#dropzone", "#upload-progress"):
        expect(page.locator(selector)).to_be_attached()
    expect(page.get_by_label("Name", exact=True)).to_have_id("dataset-name")
    shot(page, "upload")
    page.locator("#dataset-name").fill("ants vs bees")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    _throttle_uploads(cdp, UPLOAD_BYTES_PER_S)
    page.locator("#file-input").set_input_files(archive)
    expect(page.locator("#upload-status")).to_have_text(
        re.compile(r"\d[\d.,]*\s*[kKMG]i?B of \d[\d.,]*\s*[kKMG]i?B \(\d{1,2}%\)"), timeout=60_000
    )
    shot(page, "upload-progress")
    _throttle_uploads(cdp, -1)
    expect(page).to_have_url(re.compile(r"/datasets/\d+/$"), timeout=120_000)

    # The dataset page follows ingestion live (the person never reloads) until it is ready.
    status = page.locator("#dataset-status")
    if "processing" in status.text_content().lower():
        shot(page, "dataset-processing")
    expect(status).to_have_text(re.compile(r"\b(ready|failed)\b", re.I), timeout=INGEST_MS)
    assert status.text_content().strip() == "ready", page.locator("main").inner_text()
    thumbs = page.locator("section.class-thumbs")
    expect(thumbs).to_have_count(2)
    assert sorted(t.strip() for t in thumbs.locator("h3").all_text_contents()) == ["ants", "bees"]
    for i in range(2):
        first = thumbs.nth(i).locator("img").first
        first.scroll_into_view_if_needed()
        expect(first).to_be_visible()
        _expect_image_loaded(first)
    expect(page.locator("canvas#class-chart")).to_be_visible()
    expect(page.locator("#warnings")).to_be_attached()
    for cell in ("small-similar", "small-different", "large-similar", "large-different"):
        expect(page.locator(f'#matrix [data-cell="{cell}"]')).to_be_attached()
    expect(page.locator("#matrix .current")).to_have_count(1)
    expect(page.locator("#matrix .current")).to_have_attribute("data-cell", "small-similar")
    expect(page.locator("#reason")).not_to_be_empty()
    for control in ("select#strategy", "select#backbone", "input#budget", "input#max-epochs", "input#hflip"):
        expect(page.locator(f"details#advanced {control}")).to_be_attached()
    expect(page.locator("input#hflip")).to_be_checked()
    expect(page.get_by_role("button", name="Delete dataset")).to_be_visible()
    page.evaluate("() => window.scrollTo(0, 0)")
    shot(page, "dataset")
    # The advanced options come from the one table of fit options (ml.config): bounds and hints shown.
    page.locator("details#advanced > summary").click()
    expect(page.locator("details#advanced input#seed")).to_be_visible()
    expect(page.locator("input#max-epochs")).to_have_attribute("max", "200")
    expect(page.locator("#max-epochs-help")).to_contain_text("1 to 200")
    page.locator("#train-form").scroll_into_view_if_needed()
    shot(page, "dataset-advanced")
    page.locator("details#advanced > summary").click()

    # Train with the defaults: one click.
    page.locator("#train-form").get_by_role("button", name="Train", exact=True).click()
    expect(page).to_have_url(re.compile(r"/jobs/\d+/$"))
    job_status = page.locator("#job-status")
    expect(job_status).to_have_text(re.compile(r"\b(queued|running|succeeded|failed|cancelled)\b"))
    if re.search(r"\b(queued|running)\b", job_status.text_content()):
        expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_visible()
    for selector in ("progress#job-progress", "#eta", "#early-stopping", "pre#log"):
        expect(page.locator(selector)).to_be_attached()
    shot(page, "job")
    expect(job_status).to_have_text(re.compile(r"\b(succeeded|failed|cancelled)\b"), timeout=TRAIN_MS)
    error = page.locator("#job-error")
    assert job_status.text_content().strip() == "succeeded", error.inner_text() if error.count() else page.url
    expect(page.locator("canvas#curve-chart")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_have_count(0)
    expect(page.locator("pre#log")).not_to_be_empty()
    sanity = page.locator("#sanity li")
    assert sanity.count() >= 1
    for i in range(sanity.count()):
        expect(sanity.nth(i)).to_have_class(re.compile(r"\b(ok|failed)\b"))

    # Results.
    results = page.locator("section#results")
    expect(results).to_be_visible()
    accuracy = _percent(results.locator("#accuracy").inner_text())
    assert accuracy >= 90.0, f"accuracy {accuracy}%"
    per_class = results.locator("table#per-class tbody tr")
    expect(per_class).to_have_count(2)
    expect(per_class.filter(has_text="ants")).to_have_count(1)
    expect(per_class.filter(has_text="bees")).to_have_count(1)
    confusion = results.locator("table#confusion tbody tr")
    expect(confusion).to_have_count(2)
    for i in range(2):
        expect(confusion.nth(i).locator("td")).to_have_count(2)
    figures = results.locator("#misclassified figure")
    if accuracy < 100.0:
        expect(figures.first).to_be_attached()
    for i in range(min(figures.count(), 3)):
        expect(figures.nth(i).locator("figcaption")).to_have_text(re.compile(r"\S+.*true \S+.*predicted \S+ \(\d+%\)"))
        _expect_image_loaded(figures.nth(i).locator("img"))
    shot(page, "results")

    # The model: download the bundle, then try it on a bee.
    results.get_by_role("link", name="Open model").click()
    expect(page).to_have_url(re.compile(r"/models/\d+/$"))
    model_id = re.search(r"/models/(\d+)/$", page.url).group(1)
    download_link = page.get_by_role("link", name="Download bundle")
    expect(download_link).to_have_attribute("href", re.compile(rf"/api/v1/models/{model_id}/download/$"))
    with page.expect_download() as download:
        download_link.click()
    with zipfile.ZipFile(download.value.path()) as bundle:
        assert {"model.torchscript.pt", "labels.json", "model_card.md"} <= set(bundle.namelist())
    curl = page.locator("pre#curl")
    expect(curl).to_contain_text("curl")
    expect(curl).to_contain_text("/predict/")
    expect(page.locator("#try-drop")).to_be_attached()
    shot(page, "model")
    with zipfile.ZipFile(archive) as zf:
        bee = tmp_path / BEE.rsplit("/", 1)[1]
        bee.write_bytes(zf.read(BEE))
    page.locator("#try-input").set_input_files(bee)
    predictions = page.locator("#predictions .prediction")
    expect(predictions.first).to_be_visible(timeout=60_000)
    expect(predictions.first.locator(".label")).to_have_text("bees")
    expect(predictions.first.locator(".score")).not_to_be_empty()
    shot(page, "model-prediction")

    # Tokens: the key shows once, can be copied, works on the API, and stops working once revoked.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.url)
    page.goto("/tokens/")
    shot(page, "tokens")
    page.get_by_role("button", name="Create token").click()
    new_token = page.locator("#new-token")
    expect(new_token).to_be_visible()
    key = re.search(r"\b[0-9a-f]{40}\b", new_token.evaluate("el => el.value ?? el.textContent")).group(0)
    page.get_by_role("button", name="Copy", exact=True).click()
    assert page.evaluate("navigator.clipboard.readText()") == key
    r = _api_get(live_server, "/datasets/", key)
    assert r.status_code == 200 and [d["name"] for d in r.json()["results"]] == ["ants vs bees"], r.text
    shot(page, "tokens-created")
    revoke = page.locator("#tokens").get_by_role("button", name="Revoke")
    expect(revoke).to_have_count(1)
    revoke.click()
    expect(revoke).to_have_count(0)
    assert _api_get(live_server, "/datasets/", key).status_code in (401, 403)
    shot(page, "tokens-revoked")

    # Back on the dashboard everything is listed, newest first, with its status; then sign out.
    page.goto("/")
    expect(page.locator("#datasets")).to_contain_text("ants vs bees")
    expect(page.locator("#datasets .badge").first).to_have_text(re.compile("ready"))
    expect(page.locator("#jobs .badge").first).to_have_text(re.compile("succeeded"))
    expect(page.locator("#models .badge").first).to_be_visible()
    shot(page, "dashboard-after")
    sign_out = page.get_by_role("button", name="Sign out")
    sign_out.click()
    expect(sign_out).to_have_count(0)
    expect(page.get_by_role("link", name="Sign in").first).to_be_visible()
    page.goto("/tokens/")  # pages of one's own work need signing in again
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    assert not page.js_errors, page.js_errors


def test_an_upload_that_is_not_a_zip_says_why(page, shot, make_user):
    make_user("bob", PASSWORD)
    sign_in(page, "bob")
    page.goto("/upload/")
    page.locator("#file-input").set_input_files(
        files=[{"name": "holiday.zip", "mimeType": "application/zip", "buffer": b"not a zip"}]
    )
    error = page.locator("#upload-error")
    expect(error).to_be_visible(timeout=60_000)
    expect(error).to_have_attribute("role", "alert")
    expect(error).to_contain_text(re.compile("zip", re.I))
    text = error.inner_text().strip()
    assert "{" not in text and '"error"' not in text, text
    assert len(text.split()) >= 4 and text.rstrip()[-1] in ".!", f"not a readable sentence: {text!r}"
    assert page.url.endswith("/upload/")
    shot(page, "upload-error")
    assert not page.js_errors, page.js_errors


def test_sign_in_with_the_keyboard_only(page, shot, make_user):
    make_user("carol", PASSWORD)
    page.goto("/accounts/login/")
    shot(page, "login")
    for _ in range(30):
        if _focused_id(page) == "id_username":
            break
        page.keyboard.press("Tab")
    assert _focused_id(page) == "id_username", "Tab never reached the username field"
    page.keyboard.type("carol")
    page.keyboard.press("Tab")
    assert _focused_id(page) == "id_password", "Tab from the username should go to the password"
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("Your work")
    assert not page.js_errors, page.js_errors


def _api_get(live_server, path: str, token: str) -> requests.Response:
    # Connection: close, or the live server's keep-alive thread would hold its database
    # connection open past the test and the test database could not be dropped.
    headers = {"Authorization": f"Token {token}", "Connection": "close"}
    return requests.get(f"{live_server.url}/api/v1{path}", headers=headers, timeout=30)


def _throttle_uploads(cdp, bytes_per_second: int) -> None:
    """DevTools network emulation; -1 lifts it."""
    conditions = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": bytes_per_second}
    cdp.send("Network.emulateNetworkConditions", conditions)


def _focused_id(page) -> str:
    return page.evaluate("() => document.activeElement && document.activeElement.id")


def _expect_image_loaded(img) -> None:
    img.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())


def _percent(text: str) -> float:
    match = re.search(r"(\d+(?:\.\d+)?)\s*%", text)
    assert match, f"no percentage in {text!r}"
    return float(match.group(1))
