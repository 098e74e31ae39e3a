"""apps.common.archive_cache: a worker host keeps the zips training reads, by content, for the next job."""

from __future__ import annotations

import os
import threading
import time
import zipfile
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from apps.common import archive_cache
from apps.common.archive_cache import cached_archive, stored_archive
from apps.common.storage import local_path
from apps.datasets.models import DatasetVersion
from apps.datasets.versions import (
    version_archive,
    version_change,
    version_index,
)
from tests.apps.stored_versions import two_archive_version
from tests.conftest import image_bytes


@pytest.fixture
def work_dir(settings, tmp_path) -> Path:
    settings.GRAFT_WORK_DIR = tmp_path / "work"
    settings.GRAFT_ARCHIVE_CACHE_BYTES = 1024**3
    return settings.GRAFT_WORK_DIR


class Maker:
    """A `make` for cached_archive that writes `data` and counts its calls."""

    def __init__(self, data: bytes = b"zip bytes") -> None:
        self.data, self.calls = data, 0

    def __call__(self, to: Path) -> None:
        self.calls += 1
        to.write_bytes(self.data)


def _entries(work_dir: Path) -> list[str]:
    return sorted(p.name for p in (work_dir / "archives").iterdir())


def _use(key: str, make: Maker) -> bytes:
    with cached_archive(key, make) as path:
        return path.read_bytes()


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_second_use_builds_nothing_and_is_the_same_file(work_dir):
    make = Maker()
    with cached_archive("k1", make) as first:
        assert first.read_bytes() == b"zip bytes"
        inode = first.stat().st_ino
    assert not first.exists()  # the caller's path goes; the entry stays
    entry = work_dir / "archives" / "k1.zip"
    assert entry.stat().st_ino == inode
    _age(entry, 3600)

    with cached_archive("k1", make) as second:
        assert second.stat().st_ino == inode
        assert second.read_bytes() == b"zip bytes"
    assert make.calls == 1
    assert time.time() - entry.stat().st_mtime < 60  # touched: used last, evicted last
    assert _entries(work_dir) == ["k1.zip"]


def test_another_key_gets_another_entry(work_dir):
    one, two = Maker(b"one"), Maker(b"two")
    assert (_use("k1", one), _use("k2", two), _use("k1", one)) == (b"one", b"two", b"one")
    assert (one.calls, two.calls) == (1, 1)
    assert _entries(work_dir) == ["k1.zip", "k2.zip"]


def test_the_byte_cap_evicts_the_least_recently_used(work_dir, settings):
    settings.GRAFT_ARCHIVE_CACHE_BYTES = 250
    for key in ("a", "b"):
        _use(key, Maker(bytes(100)))
    _age(work_dir / "archives" / "a.zip", 200)
    _age(work_dir / "archives" / "b.zip", 100)
    again = Maker(bytes(100))
    _use("a", again)  # a, older, used again: b is now the least recently used
    _use("c", Maker(bytes(100)))  # 300 bytes: over the cap
    assert again.calls == 0
    assert _entries(work_dir) == ["a.zip", "c.zip"]


def test_an_entry_being_read_survives_eviction(work_dir, settings):
    settings.GRAFT_ARCHIVE_CACHE_BYTES = 150
    with cached_archive("a", Maker(bytes(100))) as held:
        _age(work_dir / "archives" / "a.zip", 100)
        _use("b", Maker(bytes(100)))  # over the cap, but both were being read (removing frees nothing)
        assert _entries(work_dir) == ["a.zip", "b.zip"]
        (work_dir / "archives" / "a.zip").unlink()  # evicted by another process all the same
        assert held.read_bytes() == bytes(100)  # ml opens the path again and again: it must stay
    assert not held.exists()
    assert not list(work_dir.glob("*.zip"))
    _age(work_dir / "archives" / "b.zip", 50)
    _use("c", Maker(bytes(100)))  # none read now: the older goes
    assert _entries(work_dir) == ["c.zip"]


def test_no_cache_leaves_nothing_behind(work_dir, settings):
    settings.GRAFT_ARCHIVE_CACHE_BYTES = 0
    make = Maker()
    assert (_use("k1", make), _use("k1", make)) == (b"zip bytes", b"zip bytes")
    assert make.calls == 2
    assert not [p for p in work_dir.rglob("*") if p.is_file()]


def test_a_failed_build_leaves_nothing_behind(work_dir):
    def broken(to: Path) -> None:
        to.write_bytes(b"half a zip")
        raise OSError("the download broke off")

    with pytest.raises(OSError, match="broke off"):
        _use("k1", broken)
    assert not [p for p in work_dir.rglob("*") if p.is_file()]
    assert _use("k1", Maker()) == b"zip bytes"


def test_two_builds_of_one_key_at_once_leave_one_whole_entry(work_dir):
    """Two worker processes of a host miss the same key together: both build, both read a whole
    zip, and one entry stays."""
    both_building = threading.Barrier(2)
    payload = b"".join(image_bytes(seed=i) for i in range(20))

    def make(to: Path) -> None:
        with to.open("wb") as fh:
            fh.write(payload[: len(payload) // 2])
            both_building.wait(timeout=10)
            fh.write(payload[len(payload) // 2 :])

    read: list[bytes] = []

    def use() -> None:
        with cached_archive("k1", make) as path:
            time.sleep(0.05)  # the other's entry may replace this one's meanwhile
            read.append(path.read_bytes())

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert read == [payload, payload]
    assert _entries(work_dir) == ["k1.zip"]
    assert (work_dir / "archives" / "k1.zip").read_bytes() == payload
    assert not list(work_dir.glob("*.zip"))


def test_a_key_must_be_a_safe_file_name(work_dir):
    with pytest.raises(ValueError, match="letters, digits"):
        _use("../../etc/passwd", Maker())


def test_a_stored_archive_is_the_file_itself_on_local_storage(work_dir, own_storage):
    name = default_storage.save("datasets/x/archive.zip", ContentFile(b"stored"))
    with stored_archive(name) as path:
        assert path == local_path(name)
    assert not (work_dir / "archives").exists()


def test_a_stored_archive_is_downloaded_once_per_host(work_dir, own_storage, monkeypatch):
    """Object storage (no local path): the first use downloads, the next reads the host's copy."""
    name = default_storage.save("datasets/x/archive.zip", ContentFile(b"stored"))
    opened: list[str] = []

    def open_stream(name: str):
        opened.append(name)
        return default_storage.open(name, "rb")

    monkeypatch.setattr(archive_cache, "local_path", lambda name: None)
    monkeypatch.setattr(archive_cache, "open_stream", open_stream)
    for _ in range(2):
        with stored_archive(name) as path:
            assert path.read_bytes() == b"stored"
            assert path != local_path(name)
    assert opened == [name]
    assert len(_entries(work_dir)) == 1


# --- through version_archive (integration: the real database) -------------------------------------


def _two_archive_version(user, tmp_path: Path) -> tuple[DatasetVersion, DatasetVersion]:
    """v1, the upload, and v2, the upload and five images added later (two stored archives)."""
    _, v1, v2 = two_archive_version(user, tmp_path)
    assert (v2.status, v2.num_images) == ("ready", 17), v2.error
    return v1, v2


def _read_all(version: DatasetVersion) -> tuple[int, dict[str, str]]:
    """The inode of the zip version_archive gives, and the label of each image read from it."""
    with version_archive(version) as (archive, index), zipfile.ZipFile(archive) as zf:
        for s in index.samples:
            assert zf.read(s.member)
        return archive.stat().st_ino, {s.member: s.label for s in index.samples}


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_version_is_gathered_once_per_host(work_dir, own_storage, make_user, tmp_path, settings):
    v1, v2 = _two_archive_version(make_user(), tmp_path)
    gathered, labels = _read_all(v2)
    assert len(labels) == 17 and set(labels.values()) == {"cats", "dogs", "owls"}
    assert len(_entries(work_dir)) == 1
    entry = next((work_dir / "archives").iterdir())
    assert entry.stat().st_ino == gathered
    assert _read_all(v2) == (gathered, labels)  # the same zip: nothing gathered again

    dataset = v2.dataset
    first = version_index(v2).samples[0]
    relabelled = version_change(dataset=dataset, relabel={first.sha256: "owls"})
    ino, relabels = _read_all(relabelled)  # the same images under the same names: the same zip
    assert ino == gathered and relabels != labels
    fewer = version_change(dataset=dataset, remove=[first.sha256])
    ino, kept = _read_all(fewer)
    assert ino != gathered and len(kept) == 16
    assert len(_entries(work_dir)) == 2

    ino, labels = _read_all(v1)  # all in the upload, a local file: read where it lies
    assert ino == local_path(dataset.archive).stat().st_ino
    assert len(_entries(work_dir)) == 2

    settings.GRAFT_ARCHIVE_CACHE_BYTES = 0
    for p in (work_dir / "archives").iterdir():
        p.unlink()
    assert _read_all(fewer)[1] == kept
    assert not [p for p in work_dir.rglob("*") if p.is_file()]
