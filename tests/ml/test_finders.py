"""ml.finders on tiny synthetic datasets (the real EfficientNet-Lite backbone, on the CPU):
flipped labels, planted copies and an outlier are found; the embedding cache (a relabelled or grown
version embeds only what is new); the JSON shape; `python -m ml inspect`."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ml.dataset import index_dataset
from ml.finders import (
    Embedding,
    EmbeddingCache,
    FinderConfig,
    Findings,
    LabelIssue,
    NearDuplicate,
    Outlier,
    find_in_embedding,
    find_issues,
    find_label_issues,
)
from tests.conftest import ROOT, make_zip

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200)}


def picture(colour: tuple[int, int, int], seed: int, size: int = 96) -> Image.Image:
    """A class-coloured background with a few random grey shapes: distinct images, one look per class."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.randrange(size - 20), rng.randrange(size - 20)
        w, h = rng.randrange(10, 30), rng.randrange(10, 30)
        shade = rng.randrange(40, 220)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=(shade,) * 3)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def copy_of(img: Image.Image) -> bytes:
    """Re-encoded (JPEG 70), half size, central 90 %: the benchmark's copy."""
    img = img.resize((img.width // 2, img.height // 2))
    w, h = img.size
    img = img.crop((round(w * 0.05), round(h * 0.05), round(w * 0.95), round(h * 0.95)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    return buf.getvalue()


N_PER_CLASS = 14


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """train/ and val/ of three colours; two flipped labels, two planted copies, one noise image."""
    members: dict[str, bytes] = {}
    seed = 0
    for name, colour in COLOURS.items():
        for i in range(N_PER_CLASS):
            seed += 1
            split = "val" if i >= N_PER_CLASS - 4 else "train"
            members[f"{split}/{name}/{i}.png"] = png(picture(colour, seed))
    members["train/green/flipped_red.png"] = png(picture(COLOURS["red"], 1001))
    members["train/blue/flipped_green.png"] = png(picture(COLOURS["green"], 1002))
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    members["train/red/noise.png"] = png(Image.fromarray(noise))
    path = make_zip(tmp_path_factory.mktemp("finders") / "colours.zip", members)
    cache = EmbeddingCache()
    return path, find_issues(path, FinderConfig(folds=3), cache=cache), cache, members


def test_the_cache_holds_every_image_and_a_relabelled_version_embeds_nothing(dataset):
    """A version that relabels one image: read from the cache (after a trip through bytes), nothing is
    decoded or embedded, the near-duplicates are the same, and the relabelled image is no longer an issue."""
    path, first, cache, members = dataset
    assert first.embedded == first.num_images == len(members) == len(cache)
    index = index_dataset(path)
    fixed = "train/green/flipped_red.png"
    index.samples = [replace(s, label="red") if s.member == fixed else s for s in index.samples]
    again = EmbeddingCache.from_bytes(cache.to_bytes())
    second = find_issues(path, FinderConfig(folds=3), index=index, cache=again)
    assert second.embedded == 0
    assert second.near_duplicates == first.near_duplicates
    assert fixed in {i.member for i in first.label_issues}
    issues = {i.member: i for i in second.label_issues}
    assert fixed not in issues
    assert issues["train/blue/flipped_green.png"].suggested == "green"


def test_a_version_with_an_added_image_embeds_only_that_image(dataset, tmp_path):
    path, first, cache, members = dataset
    grown = make_zip(tmp_path / "grown.zip", {**members, "train/blue/new.png": png(picture(COLOURS["blue"], 2001))})
    findings = find_issues(grown, FinderConfig(folds=3), cache=EmbeddingCache.from_bytes(cache.to_bytes()))
    assert findings.embedded == 1 and findings.num_images == len(members) + 1


def test_cache_bytes_round_trip():
    cache = EmbeddingCache()
    cache.put("b/top@240r240", "aa", np.arange(4, dtype=np.float32))
    cache.put("b/dup@96s48", "aa", np.ones(2, dtype=np.float32))
    cache.put("b/dup@96s48", "bb", np.zeros(2, dtype=np.float32))
    again = EmbeddingCache.from_bytes(cache.to_bytes())
    assert again.counts() == {"b/top@240r240": 1, "b/dup@96s48": 2} and len(again) == 2
    assert np.array_equal(again.get("b/top@240r240", "aa"), np.arange(4))
    assert again.get("b/top@240r240", "bb") is None
    assert len(EmbeddingCache.from_bytes(EmbeddingCache().to_bytes())) == 0


def test_flipped_labels_are_flagged_with_the_true_class(dataset):
    _, findings, _, _ = dataset
    flagged = {i.member: i for i in findings.label_issues}
    assert flagged["train/green/flipped_red.png"].suggested == "red"
    assert flagged["train/blue/flipped_green.png"].suggested == "green"
    assert flagged["train/green/flipped_red.png"].label == "green"
    assert all(0 <= i.score <= 1 for i in findings.label_issues)


@pytest.fixture(scope="module")
def photos(datasets_dir, tmp_path_factory):
    """26 real photos (the near-duplicate rule is calibrated on real images, not on flat colours), one
    re-encoded/resized/cropped copy filed under the other class, one copy in val/."""
    members: dict[str, bytes] = {}
    with zipfile.ZipFile(datasets_dir / "hymenoptera.zip") as zf:
        for label in ("ants", "bees"):
            names = sorted(n for n in zf.namelist() if n.startswith(f"train/{label}/") and n.endswith(".jpg"))
            for name in names[:12]:
                members[name] = zf.read(name)
            members[f"val/{label}/{names[12].rsplit('/', 1)[1]}"] = zf.read(names[12])
    ant, bee = (
        sorted(m for m in members if m.startswith("train/ants/"))[0],
        sorted(m for m in members if m.startswith("train/bees/"))[0],
    )
    members["train/bees/copy_of_ant.jpg"] = copy_of(Image.open(io.BytesIO(members[ant])).convert("RGB"))
    members["val/bees/copy_of_bee.jpg"] = copy_of(Image.open(io.BytesIO(members[bee])).convert("RGB"))
    path = make_zip(tmp_path_factory.mktemp("photos") / "photos.zip", members)
    return ant, bee, find_issues(path, FinderConfig(folds=3))


@pytest.mark.slow
def test_copies_are_found_across_classes_and_across_the_split(photos):
    ant, bee, findings = photos
    kinds = {frozenset(d.members): d.kind for d in findings.near_duplicates}
    assert kinds.get(frozenset({ant, "train/bees/copy_of_ant.jpg"})) == "cross-class", findings.near_duplicates
    assert kinds.get(frozenset({bee, "val/bees/copy_of_bee.jpg"})) == "cross-split", findings.near_duplicates


def test_a_noise_image_among_flat_colours_is_the_first_outlier(dataset):
    _, findings, _, _ = dataset
    assert findings.outliers[0].member == "train/red/noise.png"
    assert findings.outliers[0].score > 1


def test_json_shape(dataset):
    _, findings, _, _ = dataset
    data = json.loads(json.dumps(findings.to_dict()))
    assert {"label_issues", "near_duplicates", "outliers"} <= set(data)
    assert all(set(i) == {"member", "label", "suggested", "score"} for i in data["label_issues"])
    assert all(set(d) == {"members", "kind", "similarity"} for d in data["near_duplicates"])
    assert all(
        len(d["members"]) == 2 and d["kind"] in ("cross-class", "cross-split", "same-class")
        for d in data["near_duplicates"]
    )
    assert all(set(o) == {"member", "score"} for o in data["outliers"])


def test_findings_to_dict_from_plain_values():
    findings = Findings(
        (LabelIssue("a/1.png", "a", "b", 0.91234),),
        (NearDuplicate(("a/1.png", "b/2.png"), "cross-class", 0.97),),
        (Outlier("a/3.png", 2.5),),
    )
    data = findings.to_dict()
    assert data["label_issues"] == [{"member": "a/1.png", "label": "a", "suggested": "b", "score": 0.9123}]
    assert data["near_duplicates"] == [{"members": ["a/1.png", "b/2.png"], "kind": "cross-class", "similarity": 0.97}]
    assert data["outliers"] == [{"member": "a/3.png", "score": 2.5}]


def test_finders_on_features_alone():
    """Two clusters, one point filed under the wrong one, one far away, one exact pair across the split."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (2, 32)) * 4
    labels = np.repeat([0, 1], 30)
    X = centres[labels] + rng.normal(0, 1, (60, 32))
    X[5] = centres[1] + rng.normal(0, 1, 32)  # filed as 0, looks like 1
    X[59] = X[40] + 1e-3  # a copy of 40, in val
    X[7] = rng.normal(0, 1, 32) * 40  # far from both
    X = X + 20  # positive, like pooled ReLU features
    splits = ["train"] * 50 + ["val"] * 10
    emb = Embedding(["a", "b"], [f"m{i}" for i in range(60)], labels, splits, X.astype(np.float32))
    findings = find_in_embedding(emb, FinderConfig(folds=3))
    assert "m5" in {i.member for i in findings.label_issues}
    assert any(set(d.members) == {"m40", "m59"} and d.kind == "cross-split" for d in findings.near_duplicates)
    assert [o.member for o in findings.outliers] == ["m7"]  # the rest lie within the dataset's own spread


def test_the_label_finder_reads_the_view_that_predicts_the_labels_best():
    """The top layer knows nothing of these classes and a stage tap does (a domain far from ImageNet): the
    flips are found in the stage view, and the finder says which view it read."""
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 40)
    centres = rng.normal(0, 1, (3, 24)) * 3
    stage = centres[labels] + rng.normal(0, 1, (120, 24))
    top = rng.normal(0, 1, (120, 64))  # no class signal
    flips = [3, 45, 90]
    given = labels.copy()
    given[flips] = (labels[flips] + 1) % 3
    splits = ["train"] * 100 + ["val"] * 20
    members = [f"m{i}" for i in range(120)]
    emb = Embedding(["a", "b", "c"], members, given, splits, top.astype(np.float32), stages={"blocks.3": stage})
    issues, probe = find_label_issues(emb, FinderConfig(folds=3))
    assert probe["view"] != "top" and probe["views"]["top"] > probe["cv_loss"]
    assert {f"m{i}" for i in flips} <= {i.member for i in issues}
    # Where the top layer is the one that knows the classes, it is read alone.
    emb = Embedding(["a", "b", "c"], members, given, splits, stage.astype(np.float32), stages={"blocks.3": top})
    assert find_label_issues(emb, FinderConfig(folds=3))[1]["view"] == "top"


def test_where_every_view_knows_the_classes_in_part_the_label_finder_reads_their_mean():
    """Three views of one signal with independent noise: their averaged probabilities predict better than
    any one of them, and the probe says so (no single C; the CLI names the mean)."""
    from ml.cli import _probe_view

    rng = np.random.default_rng(0)  # the mean won by 0.03-0.07 in log loss for each of seeds 0-5
    labels = np.repeat([0, 1, 2], 100)
    centres = rng.normal(0, 1, (3, 4))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    views = [centres[labels] + rng.normal(0, 1.0, (300, 4)) for _ in range(3)]
    splits = ["train"] * 240 + ["val"] * 60
    emb = Embedding(
        ["a", "b", "c"],
        [f"m{i}" for i in range(300)],
        labels,
        splits,
        views[0].astype(np.float32),
        stages={"blocks.2": views[1], "blocks.3": views[2]},
    )
    _, probe = find_label_issues(emb, FinderConfig(folds=3))
    assert probe["view"] == "mean" and probe["C"] is None
    assert probe["cv_loss"] < min(loss for view, loss in probe["views"].items() if view != "mean")
    assert _probe_view(probe) == "the mean of 3 views"


def test_inspect_cli_prints_the_findings_as_its_last_line(dataset):
    path, _, _, _ = dataset
    proc = subprocess.run(
        [sys.executable, "-m", "ml", "inspect", str(path), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "train/green/flipped_red.png" in {i["member"] for i in data["label_issues"]}


def test_inspect_cli_names_a_missing_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ml", "inspect", str(tmp_path / "nope.zip")], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no such file" in proc.stderr
