"""Review in the browser (issue 20, item 4), in headless Chromium against the live server, the real
PostgreSQL + Redis and a real Celery worker (ingestion and the finders):

upload a small real dataset with labels flipped on purpose -> the finders flag them -> relabel 3,
remove 2, accept 1 suggestion, dismiss a finding -> save: the summary shows that diff -> the new
version shows it -> export it -> the export uploads again to the same counts per class and split.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, sign_in

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

INGEST_MS = 180_000
FIND_MS = 300_000  # the finders: one frozen pass over ~50 images and a cross-validated probe, on CPU

# Four labels flipped between cats and dogs, and a resized copy of a cat filed under dogs.
FLIPS = {"cats/cat.10.jpg": "dogs", "cats/cat.11.jpg": "dogs", "dogs/dog.10.jpg": "cats", "dogs/dog.11.jpg": "cats"}
COPY_OF, COPY = "cats/cat.101.jpg", "dogs/cat.101-copy.jpg"


def _noisy_zip(datasets_dir: Path, path: Path) -> Path:
    """46 real photos (16 cats, 16 dogs, 14 daisies) with FLIPS applied, plus COPY: 47 images."""
    from PIL import Image

    members: dict[str, bytes] = {}
    for cls, source, prefix, n in (
        ("cats", "cats_vs_dogs_subset.zip", "train/cats/", 16),
        ("dogs", "cats_vs_dogs_subset.zip", "train/dogs/", 16),
        ("daisies", "flowers-5class-small.zip", "daisy/", 14),
    ):
        with zipfile.ZipFile(datasets_dir / source) as zf:
            for name in sorted(n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/"))[:n]:
                members[f"{cls}/{name.rsplit('/', 1)[1]}"] = zf.read(name)
    image = Image.open(io.BytesIO(members[COPY_OF])).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4))
    copy = io.BytesIO()
    image.save(copy, "JPEG", quality=70)
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in sorted(members.items()):
            cls, name = member.split("/")
            zf.writestr(f"{FLIPS.get(member, cls)}/{name}", data)
        zf.writestr(COPY, copy.getvalue())
    return path


def _filed(member: str) -> str:
    """Where _noisy_zip filed an original member."""
    return f"{FLIPS[member]}/{member.split('/')[1]}"


def _upload(page, archive: Path, name: str) -> str:
    page.goto("/upload/")
    page.locator("#dataset-name").fill(name)
    page.locator("#file-input").set_input_files(archive)
    expect(page).to_have_url(re.compile(r"/datasets/\d+/$"), timeout=120_000)
    status = page.locator("#dataset-status")
    expect(status).to_have_text(re.compile(r"\b(ready|failed)\b"), timeout=INGEST_MS)
    assert status.text_content().strip() == "ready", page.locator("main").inner_text()
    return re.search(r"/datasets/(\d+)/$", page.url).group(1)


def _class_table(page) -> dict[str, tuple[int, ...]]:
    """The dataset page's table: class -> (train, val, images)."""
    out = {}
    for row in page.locator("#class-counts tbody tr").all():
        out[row.locator("th").text_content().strip()] = tuple(int(c) for c in row.locator("td").all_text_contents())
    return out


def _tile(page, member: str):
    return page.locator(f'#gallery .tile[data-member="{member}"]')


def _filter(page, chip: str) -> None:
    """Click a filter chip and wait for its page of images."""
    page.locator(chip).click()
    expect(page.locator("#gallery")).to_have_attribute("aria-busy", "false")


def _chip_count(page, filter_: str, value: str) -> int:
    text = page.locator(f'.chip[data-filter="{filter_}"][data-value="{value}"] .count').inner_text()
    return int(text.strip("()"))


def test_review_fix_save_export_and_upload_again(
    page, shot, live_server, celery_worker_process, datasets_dir, make_user, tmp_path
):
    archive = _noisy_zip(datasets_dir, tmp_path / "pets.zip")
    make_user("rita", PASSWORD)
    sign_in(page, "rita")
    dataset = _upload(page, archive, "pets")

    # The dataset page lists version 1; its finders run live and then say what they found.
    v1 = page.locator("#version-1")
    expect(v1).to_contain_text("The upload: 47 images")
    expect(v1.locator(".version-findings")).to_contain_text("likely label error", timeout=FIND_MS)
    expect(v1.get_by_role("link", name="Export version 1 as a .zip")).to_be_visible()
    page.evaluate("() => window.scrollTo(0, 0)")
    shot(page, "review-dataset-v1")

    # The review page, filtered to likely label errors: the flipped images are there, most likely first.
    v1.get_by_role("link", name="Review version 1").click()
    expect(page).to_have_url(re.compile(rf"/datasets/{dataset}/review/\?v=1$"))
    expect(page.locator("#gallery .tile").first).to_be_visible()
    assert _chip_count(page, "finder", "") == 47
    _filter(page, '.chip[data-value="label_issues"]')
    expect(page).to_have_url(re.compile(r"finder=label_issues"))
    issues = _chip_count(page, "finder", "label_issues")
    expect(page.locator("#gallery .tile")).to_have_count(issues)
    for member in FLIPS:
        expect(_tile(page, _filed(member))).to_be_visible()
        expect(_tile(page, _filed(member)).locator(".finding.issue")).to_contain_text(member.split("/")[0])
    classes = page.locator("#bulk-relabel option").all_inner_texts()[1:]  # "1 · cats", ...
    number = {c.split(" · ")[1]: c.split(" · ")[0] for c in classes}
    _expect_thumbnail(_tile(page, _filed("cats/cat.10.jpg")).locator(".tile-pick img"))
    shot(page, "review-label-issues")

    # Relabel three, three ways: the tile's own select; the keyboard (focus, then the class's number);
    # a selection and the toolbar.
    _tile(page, _filed("cats/cat.10.jpg")).locator("select[data-act=relabel]").select_option("cats")
    _tile(page, _filed("cats/cat.11.jpg")).locator(".tile-member").click()
    page.keyboard.press(number["cats"])
    _tile(page, _filed("dogs/dog.10.jpg")).locator(".tile-pick").click()
    expect(page.locator("#selection-count")).to_have_text("1 image selected")
    page.locator("#bulk-relabel").select_option("dogs")
    # Accept one suggestion (the tile's button says what it accepts).
    _tile(page, _filed("dogs/dog.11.jpg")).get_by_role("button", name="Accept “dogs”").click()
    expect(_tile(page, _filed("dogs/dog.11.jpg")).locator("[data-act=accept]")).to_have_attribute(
        "aria-pressed", "true"
    )
    for member, to in (
        ("cats/cat.10.jpg", "cats"),
        ("cats/cat.11.jpg", "cats"),
        ("dogs/dog.10.jpg", "dogs"),
        ("dogs/dog.11.jpg", "dogs"),
    ):
        expect(_tile(page, _filed(member)).locator(".pending-tag")).to_have_text(f"→ {to}")
        expect(_tile(page, _filed(member))).to_have_class(re.compile(r"\bpending-relabel\b"))
    expect(page.locator("#pending-count")).to_have_text("4 changes not saved: 4 relabelled, 0 removed.")

    # Remove two: the near-duplicate copy (its partner shown beside it), and a daisy by the toolbar.
    page.keyboard.press("Escape")  # clears the selection
    _filter(page, '.chip[data-value="cross-class"]')
    copy = _tile(page, COPY)
    expect(copy.locator(".partner figcaption")).to_contain_text(COPY_OF)
    _expect_thumbnail(copy.locator(".partner img"))
    shot(page, "review-near-duplicates")
    copy.locator(".tile-member").click()
    page.keyboard.press("r")
    expect(copy).to_have_class(re.compile(r"\bpending-remove\b"))
    _filter(page, '.chip[data-filter="finder"][data-value=""]')
    _filter(page, '.chip[data-filter="label"][data-value="daisies"]')
    expect(page.locator("#gallery .tile")).to_have_count(14)
    daisies = page.locator("#gallery .tile")
    daisy = daisies.nth(3).get_attribute("data-member")
    # Shift-click selects a range; the toolbar acts on the selection, then Undo takes it back.
    daisies.nth(0).locator(".tile-pick").click()
    daisies.nth(2).locator(".tile-pick").click(modifiers=["Shift"])
    expect(page.locator("#selection-count")).to_have_text("3 images selected")
    page.locator("#toolbar").get_by_role("button", name="Remove").click()
    expect(page.locator("#gallery .tile.pending-remove")).to_have_count(3)
    page.get_by_role("button", name="Undo").click()
    expect(page.locator("#gallery .tile.pending-remove")).to_have_count(0)
    page.keyboard.press("Escape")
    _tile(page, daisy).locator(".tile-pick").click()
    page.locator("#toolbar").get_by_role("button", name="Remove").click()
    expect(page.locator("#pending-count")).to_have_text("6 changes not saved: 4 relabelled, 2 removed.")

    # Dismiss an outlier: it leaves the outliers filter (the image itself stays).
    _filter(page, '.chip[data-filter="label"][data-value=""]')
    _filter(page, '.chip[data-value="outliers"]')
    outliers = _chip_count(page, "finder", "outliers")
    if outliers:
        first = page.locator("#gallery .tile").first
        first.locator(".tile-member").click()
        page.keyboard.press("d")
        expect(first).to_have_class(re.compile(r"\bdismissed\b"))
        expect(page.locator('.chip[data-value="outliers"] .count')).to_have_text(f"({outliers - 1})")

    # The shortcuts are listed in a help panel.
    page.keyboard.press("?")
    expect(page.locator("#help-dialog")).to_be_visible()
    expect(page.locator("#help-dialog")).to_contain_text("Relabel to class 1–9")
    page.keyboard.press("Escape")
    expect(page.locator("#help-dialog")).to_be_hidden()

    # A reload loses nothing.
    page.reload()
    expect(page.locator("#pending-count")).to_have_text("6 changes not saved: 4 relabelled, 2 removed.")
    _filter(page, '.chip[data-value="label_issues"]')
    expect(_tile(page, _filed("cats/cat.10.jpg")).locator(".pending-tag")).to_have_text("→ cats")
    shot(page, "review-pending")

    # Save: the summary shows the change set first, grouped; then version 2 opens with a message.
    page.get_by_role("button", name="Save as a new version…").click()
    dialog = page.locator("#save-dialog")
    expect(dialog).to_be_visible()
    relabels = dialog.locator("#summary-relabels > li")
    expect(relabels).to_have_count(2)
    assert {
        (li.get_attribute("data-from"), li.get_attribute("data-to"), li.get_attribute("data-count"))
        for li in relabels.all()
    } == {
        ("dogs", "cats", "2"),
        ("cats", "dogs", "2"),
    }
    removals = dialog.locator("#summary-removals > li")
    assert {(li.get_attribute("data-from"), li.get_attribute("data-count")) for li in removals.all()} == {
        ("dogs", "1"),
        ("daisies", "1"),
    }
    expect(dialog.locator("#summary-classes")).to_contain_text("13 (-1)")
    dialog.locator("#save-note").fill("fixed flipped cats and dogs")
    shot(page, "review-save-summary")
    dialog.get_by_role("button", name="Save version").click()
    expect(page).to_have_url(re.compile(rf"/datasets/{dataset}/review/\?v=2$"))
    expect(page.locator("#flash")).to_contain_text("Saved version 2: 4 relabelled, 2 removed, 45 images in all.")
    expect(page.locator("#pending-count")).to_have_text("No changes yet.")
    expect(page.locator("#version-select")).to_have_value("2")
    assert _chip_count(page, "label", "cats") == 16 and _chip_count(page, "label", "dogs") == 16
    assert _chip_count(page, "label", "daisies") == 13
    shot(page, "review-saved")

    # A change on the older version is refused with an explanation, and can be taken to the newest.
    page.goto(f"/datasets/{dataset}/review/?v=1")
    expect(page.locator("#not-newest")).to_be_visible()
    page.locator("#gallery .tile").first.locator(".tile-member").click()
    page.keyboard.press("r")
    page.keyboard.press("Control+s")
    page.locator("#save-dialog").get_by_role("button", name="Save version").click()
    error = page.locator("#save-error")
    expect(error).to_contain_text("Version 2 was saved after version 1")
    expect(error).to_contain_text("Your changes are kept")
    page.get_by_role("button", name="Take my changes to version 2").click()
    expect(page).to_have_url(re.compile(r"\?v=2$"))
    expect(page.locator("#pending-count")).to_have_text("1 change not saved: 0 relabelled, 1 removed.")
    page.get_by_role("button", name="Discard all").click()  # the page's confirm() is accepted
    expect(page.locator("#pending-count")).to_have_text("No changes yet.")

    # The dataset page: version 2 says what changed; its export is the upload format.
    page.goto(f"/datasets/{dataset}/")
    v2 = page.locator("#version-2")
    expect(v2).to_contain_text("From version 1: 4 relabelled, 2 removed · 45 images.")
    expect(v2).to_contain_text("fixed flipped cats and dogs")
    expect(page.locator("#train-version")).to_have_value("2")
    expect(v2.locator(".version-findings")).to_contain_text(re.compile(r"Finders:|flagged nothing"), timeout=FIND_MS)
    page.evaluate("() => window.scrollTo(0, 0)")
    shot(page, "review-dataset-v2")
    with page.expect_download() as download:
        v2.get_by_role("link", name="Export version 2 as a .zip").click()
    exported = tmp_path / download.value.suggested_filename
    download.value.save_as(exported)
    with zipfile.ZipFile(exported) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    per_split = Counter(tuple(n.split("/")[:2]) for n in names)
    assert len(names) == 45 and {split for split, _ in per_split} == {"train", "val"}, per_split
    totals = {"cats": 16, "dogs": 16, "daisies": 13}
    assert {c: k for c, k in Counter(cls for (_, cls), k in per_split.items() for _ in range(k)).items()} == totals
    assert {c: counts[-1] for c, counts in _class_table(page).items()} == totals

    # The export uploads again as the same dataset: the same counts per class, and the same split.
    _upload(page, exported, "pets again")
    assert _class_table(page) == {c: (per_split["train", c], per_split["val", c], k) for c, k in totals.items()}
    assert not page.js_errors, page.js_errors


def test_adding_images_makes_a_version(page, shot, live_server, celery_worker_process, make_user, tmp_path):
    from tests.conftest import class_folders, image_bytes, make_zip

    make_user("sam", PASSWORD)
    sign_in(page, "sam")
    dataset = _upload(page, make_zip(tmp_path / "shapes.zip", class_folders({"red": 6, "blue": 6})), "shapes")
    more = make_zip(
        tmp_path / "more.zip", {f"green/g_{i}.png": image_bytes(color=(20, 200, 40), seed=500 + i) for i in range(6)}
    )
    page.locator("#add-note").fill("a green class")
    page.locator("#add-file").set_input_files(more)
    status = page.locator("#add-status")
    expect(status).to_contain_text("Version 2 is ready: 6 images added, 18 images in all.", timeout=INGEST_MS)
    expect(status.get_by_role("link", name="Review version 2")).to_have_attribute(
        "href", f"/datasets/{dataset}/review/?v=2"
    )
    v2 = page.locator("#version-2")
    expect(v2).to_contain_text("From version 1: 6 added · 18 images.")
    expect(v2).to_contain_text("a green class")
    expect(page.locator("#train-version-field")).to_be_visible()
    expect(page.locator("#train-version")).to_have_value("2")
    page.locator("#add-drop").scroll_into_view_if_needed()
    shot(page, "review-dataset-added")
    # A zip of nothing new fails its version, and says why.
    page.locator("#add-file").set_input_files(more)
    expect(page.locator("#add-error")).to_contain_text("Version 3 was not made", timeout=INGEST_MS)
    expect(page.locator("#version-3")).to_contain_text("failed")

    # The train form trains on the version chosen (the newest by default).
    from apps.training.models import Job

    page.locator("#train-version").select_option("1")
    page.locator("#train-form").get_by_role("button", name="Train", exact=True).click()
    expect(page).to_have_url(re.compile(r"/jobs/\d+/$"))
    job = Job.objects.select_related("version").get(pk=int(re.search(r"/jobs/(\d+)/$", page.url).group(1)))
    assert job.version is not None and job.version.number == 1
    cancel = page.get_by_role("button", name="Cancel", exact=True)
    if cancel.is_visible():
        cancel.click()
    expect(page.locator("#job-status")).to_have_text(re.compile(r"cancelled|succeeded|failed"), timeout=120_000)
    assert not page.js_errors, page.js_errors


def _expect_thumbnail(img) -> None:
    img.scroll_into_view_if_needed()
    img.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
