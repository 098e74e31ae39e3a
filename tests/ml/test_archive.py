"""Ingestion of uploaded zips: layouts that must work, and hostile input that must be refused."""

from __future__ import annotations

import stat
import zipfile

import pytest

from ml.archive import ArchiveLimits
from ml.dataset import IngestConfig, index_dataset
from ml.errors import DatasetError
from ml.splits import split_samples
from tests.conftest import class_folders, image_bytes, make_zip


def test_class_folders_with_wrapper_and_junk(tmp_path):
    members = class_folders({"cats": 6, "dogs": 6}, prefix="pets/")
    members["__MACOSX/pets/cats/._img_0.png"] = b"junk"
    members["pets/.DS_Store"] = b"junk"
    members["pets/cats/notes.txt"] = b"hello"
    index = index_dataset(make_zip(tmp_path / "d.zip", members))
    assert index.classes == ["cats", "dogs"]
    assert index.counts() == {"cats": 6, "dogs": 6}
    skipped = [w for w in index.warnings if w.code == "skipped"]
    assert skipped and "pets/cats/notes.txt" in skipped[0].files


def test_split_layout_keeps_the_users_val(tmp_path):
    members = class_folders({"a": 5, "b": 5}, prefix="train/") | {
        k.replace("img_", "v_"): v for k, v in class_folders({"a": 2, "b": 2}, prefix="val/").items()
    }
    # distinct pixels for val images
    members = {k: image_bytes(seed=1000 + i) for i, k in enumerate(members)}
    index = index_dataset(make_zip(tmp_path / "d.zip", members))
    train, val = split_samples(index)
    assert index.layout == "split"
    assert len(train) == 10 and len(val) == 4


def test_labels_csv_and_unicode_class_names(tmp_path):
    members = {f"img{i}.png": image_bytes(seed=i) for i in range(12)}
    rows = ["filename,label"] + [f"img{i}.png,{'señal' if i % 2 else '猫'}" for i in range(12)]
    members["labels.csv"] = "\n".join(rows).encode()
    index = index_dataset(make_zip(tmp_path / "d.zip", members))
    assert sorted(index.classes) == sorted(["señal", "猫"])
    assert index.layout == "csv"


def test_stratified_split_when_no_val(tmp_path):
    index = index_dataset(make_zip(tmp_path / "d.zip", class_folders({"a": 20, "b": 10})))
    train, val = split_samples(index, val_fraction=0.2)
    assert len(val) == 6
    assert sum(s.label == "b" for s in val) == 2  # stratified: 20% of each class


def _fails(tmp_path, members: dict[str, bytes], *needles: str, config=IngestConfig()) -> None:
    with pytest.raises(DatasetError) as err:
        index_dataset(make_zip(tmp_path / "bad.zip", members), config)
    for needle in needles:
        assert needle in err.value.message


def test_path_traversal_is_refused(tmp_path):
    _fails(tmp_path, class_folders({"a": 5, "b": 5}) | {"../evil.png": image_bytes()}, "../evil.png", "outside")


def test_absolute_path_is_refused(tmp_path):
    _fails(tmp_path, class_folders({"a": 5, "b": 5}) | {"/etc/evil.png": image_bytes()}, "/etc/evil.png", "absolute")


def test_symlink_is_refused(tmp_path):
    path = make_zip(tmp_path / "bad.zip", class_folders({"a": 5, "b": 5}))
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("a/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetError, match="a/link.png.*symbolic link"):
        index_dataset(path)


def test_zip_bomb_ratio_is_refused(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in class_folders({"a": 5, "b": 5}).items():
            zf.writestr(name, data)
        zf.writestr("a/bomb.png", b"\0" * (50 * 1024**2))
    with pytest.raises(DatasetError, match="a/bomb.png.*zip bomb"):
        index_dataset(path)


def test_total_size_and_entry_limits(tmp_path):
    members = class_folders({"a": 5, "b": 5})
    _fails(tmp_path, members, "entries", config=IngestConfig(limits=ArchiveLimits(max_entries=5)))
    _fails(tmp_path, members, "expand", config=IngestConfig(limits=ArchiveLimits(max_total_bytes=100)))


def test_empty_archive(tmp_path):
    _fails(tmp_path, {"__MACOSX/x": b"", ".DS_Store": b""}, "empty")


def test_only_one_class(tmp_path):
    _fails(tmp_path, class_folders({"cats": 8}), "at least 2 classes", "'cats'")


def test_class_below_minimum_names_the_class(tmp_path):
    _fails(tmp_path, class_folders({"cats": 8, "dogs": 2}), "'dogs' has 2", "at least 5")


def test_corrupt_and_truncated_images_are_reported_by_name(tmp_path):
    good = image_bytes(fmt="JPEG", size=(64, 64), seed=99)
    members = class_folders({"a": 5, "b": 5}) | {
        "a/truncated.jpg": good[: len(good) // 2],
        "b/fake.png": b"this is not a png",
    }
    index = index_dataset(make_zip(tmp_path / "d.zip", members))
    unreadable = next(w for w in index.warnings if w.code == "unreadable")
    assert any(f.startswith("a/truncated.jpg") for f in unreadable.files)
    assert any(f.startswith("b/fake.png") for f in unreadable.files)
    assert index.counts() == {"a": 5, "b": 5}


def test_all_images_unreadable_fails(tmp_path):
    _fails(tmp_path, {"a/x.png": b"nope", "b/y.png": b"nope"}, "no readable images")


def test_duplicates_and_label_conflicts(tmp_path):
    members = class_folders({"a": 6, "b": 6})
    members["a/copy.png"] = members["a/img_0.png"]
    members["b/conflict.png"] = members["a/img_1.png"]
    index = index_dataset(make_zip(tmp_path / "d.zip", members))
    codes = {w.code: w for w in index.warnings}
    assert codes["duplicate"].files == ["a/img_0.png duplicates a/copy.png"]  # first by name is kept
    assert any("b/conflict.png" in f and "a/img_1.png" in f for f in codes["label_conflict"].files)
    names = {s.member for s in index.samples}
    assert "a/img_1.png" not in names and "b/conflict.png" not in names
    assert ("a/copy.png" in names) != ("a/img_0.png" in names)


def test_decompression_bomb_image_is_unreadable_not_fatal(tmp_path):
    members = class_folders({"a": 5, "b": 5}) | {"a/huge.png": image_bytes(size=(5000, 5000), mode="L")}
    index = index_dataset(make_zip(tmp_path / "d.zip", members), IngestConfig(max_pixels=1_000_000))
    unreadable = next(w for w in index.warnings if w.code == "unreadable")
    assert "a/huge.png" in unreadable.files[0] and "limit" in unreadable.files[0]


def test_not_a_zip(tmp_path):
    path = tmp_path / "x.zip"
    path.write_bytes(b"plain text")
    with pytest.raises(DatasetError, match="not a readable zip"):
        index_dataset(path)


def _patch_member_header(path, name: str, offset_in_central: int, offset_in_local: int, value: int) -> None:
    """Rewrite a 4-byte field of `name`'s central-directory and local headers (an uploader lying)."""
    import struct

    raw = bytearray(path.read_bytes())
    encoded = name.encode()
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46 : central + 46 + len(encoded)] != encoded:
        central = raw.index(b"PK\x01\x02", central + 4)
    local = struct.unpack_from("<I", raw, central + 42)[0]
    struct.pack_into("<I", raw, central + offset_in_central, value)
    struct.pack_into("<I", raw, local + offset_in_local, value)
    path.write_bytes(bytes(raw))


def test_a_bomb_of_many_members_under_the_header_checks_is_stopped_by_the_bytes_actually_inflated(tmp_path):
    """300 members of 1 MiB of zeros: each under the per-member ratio check's floor, their sum
    far under the total limit, so the headers pass; 300 MB from a 300 KB archive is a bomb all
    the same, and what inflation produces, against the archive's real size, stops it."""
    path = _many_member_bomb(tmp_path / "bomb.zip")
    assert path.stat().st_size < 500_000
    with pytest.raises(DatasetError, match="zip bomb"):
        index_dataset(path, IngestConfig(min_per_class=5))


def _many_member_bomb(path):
    """12 images, then 300 members of 1 MiB of zeros (about 1 KB each in the zip)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in class_folders({"a": 6, "b": 6}).items():
            zf.writestr(name, data)
        for i in range(300):
            zf.writestr(f"a/zeros_{i}.png", b"\0" * 1024**2)
    return path


def test_a_bomb_stops_the_decoding_threads_before_the_members_not_yet_started(tmp_path, monkeypatch):
    """The budget trips about a fifth of the way through the 312 members; the members no thread
    had started then are never opened (each would inflate another MiB after the verdict)."""
    import threading

    import ml.dataset

    opened, lock, read_member = [], threading.Lock(), ml.dataset.read_member

    def counted(zf, name, *args):
        with lock:
            opened.append(name)
        return read_member(zf, name, *args)

    monkeypatch.setattr(ml.dataset, "read_member", counted)
    with pytest.raises(DatasetError, match="zip bomb"):
        index_dataset(_many_member_bomb(tmp_path / "bomb.zip"), IngestConfig(min_per_class=5, workers=4))
    assert len(opened) < 312 // 2, f"{len(opened)} of 312 members opened after a bomb"


def test_a_member_whose_compressed_size_lies_is_left_out_not_inflated(tmp_path):
    """The declared compressed size was rewritten so the ratio check passes: the member cannot
    be read back consistently, so it is reported by name and left out."""
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in class_folders({"a": 6, "b": 6}).items():
            zf.writestr(name, data)
        zf.writestr("a/bomb.png", b"\0" * (50 * 1024**2))
    _patch_member_header(path, "a/bomb.png", 20, 18, 30 * 1024**2)  # "compressed: 30 MB" (really ~50 KB)
    index = index_dataset(path, IngestConfig(min_per_class=5))
    unreadable = next(w for w in index.warnings if w.code == "unreadable")
    assert [f for f in unreadable.files if f.startswith("a/bomb.png: damaged in the archive")]
    assert len(index.samples) == 12


def test_a_member_with_a_bad_crc_is_left_out_by_name_not_a_crash(tmp_path):
    members = class_folders({"a": 6, "b": 6})
    path = tmp_path / "crc.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    raw = bytearray(path.read_bytes())
    at = raw.index(members["a/img_0.png"][-40:])
    raw[at] ^= 0xFF  # one flipped byte inside a stored member: its CRC no longer matches
    path.write_bytes(bytes(raw))
    index = index_dataset(path, IngestConfig(min_per_class=5))
    assert len(index.samples) == 11
    unreadable = next(w for w in index.warnings if w.code == "unreadable")
    assert any(f.startswith("a/img_0.png: damaged in the archive") for f in unreadable.files)


def test_a_labels_csv_field_over_the_csv_limit_is_a_readable_error(tmp_path):
    members = class_folders({"a": 6, "b": 6})
    members["labels.csv"] = ("filename,label\n" + "a/img_0.png," + "x" * 200_000 + "\n").encode()
    _fails(tmp_path, members, "labels.csv", "line 2", "not valid CSV")


@pytest.mark.parametrize(
    "folder,needle",
    [
        (" ", "empty class name"),
        ("cats\u202egnp.exe", "U+202E"),  # a right-to-left override disguising the name
        ("dogs\x07", "U+0007"),
        ("x" * 101, "101 characters"),
    ],
)
def test_class_names_that_would_disguise_themselves_are_refused(tmp_path, folder, needle):
    members = class_folders({"a": 6})
    members.update({f"{folder}/img_{i}.png": image_bytes(seed=100 + i) for i in range(6)})
    _fails(tmp_path, members, needle)


def test_a_file_name_longer_than_the_limit_is_refused(tmp_path):
    members = class_folders({"a": 6, "b": 6})
    members["a/" + "n" * 2000 + ".png"] = image_bytes(seed=99)
    _fails(tmp_path, members, "2,006 characters")


def test_warning_file_lists_are_capped(tmp_path):
    members = class_folders({"a": 6, "b": 6})
    members.update({f"a/notes_{i}.txt": b"x" for i in range(500)})
    index = index_dataset(make_zip(tmp_path / "d.zip", members), IngestConfig(min_per_class=5))
    skipped = next(w for w in index.warnings if w.code == "skipped")
    assert "500 file(s)" in skipped.message
    assert len(skipped.files) == 101 and skipped.files[-1] == "... and 400 more"
