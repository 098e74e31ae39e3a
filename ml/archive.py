"""Reading an uploaded dataset zip without trusting it.

Nothing from the archive is ever written to disk under its own name: members are
read straight from the zip, after every name and size has been checked. That
makes path traversal impossible by construction; we still reject such archives
loudly, because an archive that tries it is not one we want to half-accept.
"""

from __future__ import annotations

import csv
import io
import stat
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ml.errors import DatasetError
from ml.images import IMAGE_SUFFIXES

SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
LABELS_CSV = "labels.csv"


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps that keep a hostile archive from exhausting the worker."""

    max_entries: int = 200_000
    max_total_bytes: int = 20 * 1024**3  # sum of uncompressed sizes
    max_member_bytes: int = 256 * 1024**2
    max_ratio: float = 200.0  # per member, only checked above `ratio_floor_bytes`
    ratio_floor_bytes: int = 1024**2


@dataclass(frozen=True)
class Member:
    """One image candidate: where it is in the zip and what the layout says about it."""

    name: str  # exact member name inside the zip
    label: str
    split: str  # "train", "val", "test", or "" when the upload does not fix the split


@dataclass
class ArchiveScan:
    members: list[Member]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> member names
    layout: str = "folders"  # "folders", "split", or "csv"


def scan_archive(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> ArchiveScan:
    """List the image members of a dataset zip, enforcing the safety rules.

    Raises DatasetError naming the offending member for anything unsafe.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"The upload is not a readable zip archive ({exc}).") from None
    with zf:
        infos = zf.infolist()
        _check_limits(infos, limits)
        files = [info for info in infos if not info.is_dir()]
        for info in files:
            _check_member(info)
        skipped: dict[str, list[str]] = {}
        kept = []
        for info in files:
            if _is_junk(info.filename):
                continue
            kept.append(info.filename)
        if not kept:
            raise DatasetError("The archive is empty: it holds no files besides system junk.")
        prefix = _wrapper_prefix(kept)
        rel = {name: name[len(prefix) :] for name in kept}
        if LABELS_CSV in rel.values():
            csv_member = next(n for n, r in rel.items() if r == LABELS_CSV)
            return _scan_csv(zf, csv_member, rel, skipped)
        return _scan_folders(rel, skipped)


def _check_limits(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    if len(infos) > limits.max_entries:
        raise DatasetError(f"The archive has {len(infos):,} entries; the limit is {limits.max_entries:,}.")
    total = sum(info.file_size for info in infos)
    if total > limits.max_total_bytes:
        raise DatasetError(f"The archive would expand to {total:,} bytes; the limit is {limits.max_total_bytes:,}.")
    for info in infos:
        if info.file_size > limits.max_member_bytes:
            raise DatasetError(
                f"'{info.filename}' would expand to {info.file_size:,} bytes; "
                f"the limit per file is {limits.max_member_bytes:,}."
            )
        if info.file_size > limits.ratio_floor_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_ratio:
                raise DatasetError(
                    f"'{info.filename}' expands {ratio:,.0f}x (limit {limits.max_ratio:,.0f}x): "
                    "this looks like a zip bomb."
                )


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DatasetError(f"Unsafe archive: '{name}' is an absolute path.", file=name)
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise DatasetError(f"Unsafe archive: '{name}' points outside the archive ('..').", file=name)
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DatasetError(f"Unsafe archive: '{name}' is a symbolic link.", file=name)
    if info.flag_bits & 0x1:
        raise DatasetError(f"'{name}' is encrypted; upload an archive without a password.", file=name)


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p in JUNK_NAMES or p.startswith(".") for p in parts)


def _wrapper_prefix(names: list[str]) -> str:
    """'wrap/' when every file sits under one folder that is not itself a class folder."""
    firsts = {PurePosixPath(n).parts[0] for n in names}
    if len(firsts) != 1 or any(len(PurePosixPath(n).parts) < 3 for n in names):
        return ""
    return firsts.pop() + "/"


def _label(text: str) -> str:
    return unicodedata.normalize("NFC", text.strip())


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _scan_folders(rel: dict[str, str], skipped: dict[str, list[str]]) -> ArchiveScan:
    parts = {name: PurePosixPath(r).parts for name, r in rel.items()}
    split_layout = "train" in {p[0].lower() for p in parts.values() if len(p) > 2}
    members = []
    for name, p in parts.items():
        split = ""
        if split_layout:
            top = p[0].lower()
            if top not in SPLIT_DIRS or len(p) < 3:
                skipped.setdefault("outside train/ and val/ class folders", []).append(name)
                continue
            split, p = SPLIT_DIRS[top], p[1:]
        if len(p) < 2:
            skipped.setdefault("not inside a class folder", []).append(name)
            continue
        if not _is_image(name):
            skipped.setdefault("not an image file", []).append(name)
            continue
        members.append(Member(name=name, label=_label(p[0]), split=split))
    return ArchiveScan(members, skipped, "split" if split_layout else "folders")


def _scan_csv(zf: zipfile.ZipFile, csv_member: str, rel: dict[str, str], skipped: dict[str, list[str]]) -> ArchiveScan:
    by_rel = {r: n for n, r in rel.items()}
    try:
        text = zf.read(csv_member).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"'{LABELS_CSV}' is not UTF-8 text.") from None
    members, seen = [], set()
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DatasetError(f"'{LABELS_CSV}' line {lineno}: expected 'filename,label'.")
        filename, label = row[0].strip().lstrip("./"), _label(row[1])
        if lineno == 1 and (filename.lower(), label.lower()) == ("filename", "label"):
            continue
        name = by_rel.get(filename)
        if name is None:
            raise DatasetError(f"'{LABELS_CSV}' line {lineno}: '{filename}' is not in the archive.")
        if not label:
            raise DatasetError(f"'{LABELS_CSV}' line {lineno}: '{filename}' has an empty label.")
        seen.add(name)
        members.append(Member(name=name, label=label, split=""))
    unlisted = [n for r, n in by_rel.items() if n not in seen and r != LABELS_CSV]
    if unlisted:
        skipped[f"not listed in {LABELS_CSV}"] = unlisted
    return ArchiveScan(members, skipped, "csv")


def read_member(zf: zipfile.ZipFile, name: str, max_bytes: int) -> bytes:
    """Read one member, never more than `max_bytes` whatever its header claims."""
    with zf.open(name) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DatasetError(f"'{name}' is larger than {max_bytes:,} bytes.", file=name)
    return data
