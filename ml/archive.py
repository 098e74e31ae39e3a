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
import threading
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

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
    max_name_chars: int = 1024  # a member's path inside the zip
    max_label_chars: int = 100
    max_csv_bytes: int = 64 * 1024**2


class DamagedMember(DatasetError):
    """One member cannot be read from the zip (bad CRC, truncated data): that image is left out."""


class InflateBudget:
    """Bytes actually inflated, over the whole archive, against its real size on disk.

    The sizes in a zip's headers are the uploader's word; this counts what decompression
    produces and stops a bomb as it goes off, whatever the headers claimed.
    """

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        self.limit = min(limits.max_total_bytes, int(limits.max_ratio * path.stat().st_size) + limits.ratio_floor_bytes)
        self.used = 0
        self._lock = threading.Lock()

    def charge(self, n: int, name: str) -> None:
        with self._lock:
            self.used += n
            used = self.used
        if used > self.limit:
            raise DatasetError(
                f"The archive expands to more than {self.limit:,} bytes as it is read (at '{name}'): "
                "far more than its size allows. This looks like a zip bomb."
            )


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
        kept = _safe_files(zf, limits)
        skipped: dict[str, list[str]] = {}
        prefix = _wrapper_prefix(kept)
        rel = {name: name[len(prefix) :] for name in kept}
        if LABELS_CSV in rel.values():
            csv_member = next(n for n, r in rel.items() if r == LABELS_CSV)
            return _scan_csv(zf, csv_member, rel, skipped, limits)
        return _scan_folders(rel, skipped, limits)


def scan_images(source: Path | IO[bytes], limits: ArchiveLimits = ArchiveLimits()) -> list[str]:
    """The image members of a zip of unlabelled images (any folders), in name order, under the
    same safety rules as a dataset. Raises DatasetError when there is none."""
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"The upload is not a readable zip archive ({exc}).") from None
    with zf:
        images = sorted(name for name in _safe_files(zf, limits) if _is_image(name))
    if not images:
        raise DatasetError(f"The archive holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return images


def _safe_files(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[str]:
    """The archive's file names, after every limit and safety rule, without system junk."""
    infos = zf.infolist()
    _check_limits(infos, limits)
    files = [info for info in infos if not info.is_dir()]
    for info in files:
        _check_member(info, limits)
    kept = [info.filename for info in files if not _is_junk(info.filename)]
    if not kept:
        raise DatasetError("The archive is empty: it holds no files besides system junk.")
    return kept


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


def _check_member(info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    name = info.filename
    if len(name) > limits.max_name_chars:
        raise DatasetError(
            f"A file name in the archive is {len(name):,} characters long (the limit is {limits.max_name_chars:,}): "
            f"'{name[:60]}...'."
        )
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


def _label(text: str, limits: ArchiveLimits, where: str) -> str:
    """A class name as shown everywhere: NFC, trimmed, and refused when empty, too long, or
    holding control or text-direction characters (they would disguise it on every page)."""
    label = unicodedata.normalize("NFC", text.strip())
    if not label:
        raise DatasetError(f"{where} has an empty class name; give every class a name.")
    hidden = sorted({c for c in label if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")})
    if hidden:
        codes = ", ".join(f"U+{ord(c):04X}" for c in hidden)
        raise DatasetError(
            f"{where}: the class name {label.encode('ascii', 'backslashreplace').decode()!r} holds control or "
            f"text-direction characters ({codes}); rename it."
        )
    if len(label) > limits.max_label_chars:
        raise DatasetError(
            f"{where}: a class name is {len(label)} characters long (the limit is {limits.max_label_chars}): "
            f"'{label[:40]}...'."
        )
    return label


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _scan_folders(rel: dict[str, str], skipped: dict[str, list[str]], limits: ArchiveLimits) -> ArchiveScan:
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
        members.append(Member(name=name, label=_label(p[0], limits, f"The folder of '{name}'"), split=split))
    return ArchiveScan(members, skipped, "split" if split_layout else "folders")


def _scan_csv(
    zf: zipfile.ZipFile, csv_member: str, rel: dict[str, str], skipped: dict[str, list[str]], limits: ArchiveLimits
) -> ArchiveScan:
    by_rel = {r: n for n, r in rel.items()}
    try:
        text = read_member(zf, csv_member, limits.max_csv_bytes).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"'{LABELS_CSV}' is not UTF-8 text.") from None
    members, seen = [], set()
    rows = csv.reader(io.StringIO(text))
    lineno = 0
    while True:
        try:
            row = next(rows, None)
        except csv.Error as exc:  # a field over the csv module's limit (128 KiB), a stray NUL, ...
            raise DatasetError(f"'{LABELS_CSV}' line {rows.line_num}: not valid CSV ({exc}).") from None
        if row is None:
            break
        lineno = rows.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DatasetError(f"'{LABELS_CSV}' line {lineno}: expected 'filename,label'.")
        filename = row[0].strip().lstrip("./")
        if lineno == 1 and (filename.lower(), row[1].strip().lower()) == ("filename", "label"):
            continue
        name = by_rel.get(filename)
        if name is None:
            raise DatasetError(f"'{LABELS_CSV}' line {lineno}: '{filename[:200]}' is not in the archive.")
        label = _label(row[1], limits, f"'{LABELS_CSV}' line {lineno}")
        seen.add(name)
        members.append(Member(name=name, label=label, split=""))
    unlisted = [n for r, n in by_rel.items() if n not in seen and r != LABELS_CSV]
    if unlisted:
        skipped[f"not listed in {LABELS_CSV}"] = unlisted
    return ArchiveScan(members, skipped, "csv")


def read_member(zf: zipfile.ZipFile, name: str, max_bytes: int, budget: InflateBudget | None = None) -> bytes:
    """Read one member, never more than `max_bytes` whatever its header claims, each MiB
    charged to `budget` as it is inflated. A member the zip cannot give back intact (bad CRC,
    truncated data, an unknown compression) is `DamagedMember`."""
    pieces, size = [], 0
    try:
        with zf.open(name) as fh:
            while piece := fh.read(min(1024 * 1024, max_bytes + 1 - size)):
                pieces.append(piece)
                size += len(piece)
                if budget is not None:
                    budget.charge(len(piece), name)
                if size > max_bytes:
                    raise DatasetError(f"'{name}' is larger than {max_bytes:,} bytes.", file=name)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError, ValueError) as exc:
        raise DamagedMember(f"damaged in the archive ({exc})", file=name) from None
    return b"".join(pieces)
