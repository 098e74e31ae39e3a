"""Turning a scanned archive into a validated, deduplicated dataset index.

`index_dataset` is ingestion: it decodes every candidate image once, drops what
cannot be used, and says why in `warnings` (each naming its files). The result
is a plain, JSON-serialisable `DatasetIndex` that training reads back later.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.archive import ArchiveLimits, DamagedMember, InflateBudget, Member, read_member, scan_archive
from ml.errors import DatasetError
from ml.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb, header_size

Tick = Callable[[int, int], None]  # (done, total)
VERIFY_SIDE = 64  # ingestion decodes JPEGs at the smallest draft that keeps this side: it only verifies them


@dataclass(frozen=True)
class IngestConfig:
    limits: ArchiveLimits = ArchiveLimits()
    min_per_class: int = 5  # a class with fewer usable images fails the dataset
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = min(8, (os.cpu_count() or 2) * 2)  # decoding threads (Pillow releases the GIL)


@dataclass(frozen=True)
class Sample:
    member: str  # name inside the zip
    label: str
    split: str  # "train", "val", "test", or "" (split decided at fit time)
    sha256: str
    width: int
    height: int
    # The stored archive holding it when that is not the one being read (a dataset version made of
    # an upload and of images added later); ml reads one archive and leaves this to its caller.
    source: str = ""


MAX_WARNING_FILES = 100


@dataclass(frozen=True)
class DatasetWarning:
    code: str  # unreadable | not_image | duplicate | label_conflict | split_leak | imbalance | skipped
    message: str
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The message counts them all; the list names the first ones (a report, not a dump).
        if len(self.files) > MAX_WARNING_FILES + 1:
            rest = len(self.files) - MAX_WARNING_FILES
            object.__setattr__(self, "files", [*self.files[:MAX_WARNING_FILES], f"... and {rest} more"])


@dataclass
class DatasetIndex:
    classes: list[str]
    samples: list[Sample]
    warnings: list[DatasetWarning]
    layout: str

    def counts(self, split: str | None = None) -> dict[str, int]:
        c = Counter(s.label for s in self.samples if split is None or s.split == split)
        return {name: c.get(name, 0) for name in self.classes}

    @property
    def content_hash(self) -> str:
        """Identifies the data a model saw, independent of archive packaging."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: (s.sha256, s.label, s.split)):
            h.update(f"{s.sha256}\t{s.label}\t{s.split}\n".encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "layout": self.layout,
            "samples": [asdict(s) for s in self.samples],
            "warnings": [asdict(w) for w in self.warnings],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetIndex:
        return cls(
            classes=list(data["classes"]),
            samples=[Sample(**s) for s in data["samples"]],
            warnings=[DatasetWarning(**w) for w in data["warnings"]],
            layout=data["layout"],
        )


def index_dataset(path: Path, config: IngestConfig = IngestConfig(), progress: Tick | None = None) -> DatasetIndex:
    """Scan, decode, dedupe and validate a dataset zip. Raises DatasetError if unusable."""
    index = index_images(path, config, progress)
    index.classes = validate_classes(index.samples, config.min_per_class, index.layout)
    index.warnings.extend(_balance_warnings(index))
    return index


def index_images(path: Path, config: IngestConfig = IngestConfig(), progress: Tick | None = None) -> DatasetIndex:
    """Scan, decode and dedupe a zip of labelled images, without asking it to be a whole dataset
    (images added to one may be of a single class, or a few). Raises DatasetError if unusable."""
    scan = scan_archive(path, config.limits)
    warnings = [
        DatasetWarning("skipped", f"{len(names)} file(s) ignored: {reason}.", sorted(names))
        for reason, names in scan.skipped.items()
    ]
    decoded, unreadable = _decode_all(path, scan.members, config, progress)
    if unreadable:
        warnings.append(
            DatasetWarning(
                "unreadable",
                f"{len(unreadable)} file(s) could not be read as images and were left out.",
                [f"{name}: {why}" for name, why in unreadable],
            )
        )
    samples, dup_warnings = _dedupe(decoded)
    warnings.extend(dup_warnings)
    if not samples:
        raise DatasetError("The archive holds no readable images.")
    return DatasetIndex(
        classes=sorted({s.label for s in samples}), samples=samples, warnings=warnings, layout=scan.layout
    )


def _decode_all(
    path: Path, members: list[Member], config: IngestConfig, progress: Tick | None
) -> tuple[list[Sample], list[tuple[str, str]]]:
    local = threading.local()
    budget = InflateBudget(path, config.limits)

    def check(member: Member) -> Sample | tuple[str, str]:
        zf = getattr(local, "zf", None)
        if zf is None:
            zf = local.zf = zipfile.ZipFile(path)
        try:
            data = read_member(zf, member.name, config.limits.max_member_bytes, budget)
        except DamagedMember as exc:
            return member.name, exc.message
        try:
            # Decode every byte (catches truncation and corrupt data), but let JPEG skip the
            # inverse DCT at full size (draft mode, down to 1/8): only the header's size is kept.
            img = decode_rgb(data, max_pixels=config.max_pixels, min_side=VERIFY_SIDE)
        except ImageDecodeError as exc:
            return member.name, str(exc)
        size = header_size(data) or img.size
        return Sample(
            member=member.name,
            label=member.label,
            split=member.split,
            sha256=hashlib.sha256(data).hexdigest(),
            width=size[0],
            height=size[1],
        )

    samples: list[Sample] = []
    unreadable: list[tuple[str, str]] = []
    pool = ThreadPoolExecutor(max_workers=config.workers)
    try:
        for i, outcome in enumerate(pool.map(check, members), start=1):
            if isinstance(outcome, Sample):
                samples.append(outcome)
            else:
                unreadable.append(outcome)
            if progress:
                progress(i, len(members))
    finally:  # a zip bomb (or any error) stops the members not yet started, not after them
        pool.shutdown(wait=True, cancel_futures=True)
    return samples, unreadable


def _dedupe(samples: list[Sample]) -> tuple[list[Sample], list[DatasetWarning]]:
    """Keep one copy of each exact duplicate; drop images filed under two classes."""
    split_rank = {"train": 0, "": 0, "val": 1, "test": 2}
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: (split_rank.get(s.split, 3), s.member)):
        by_hash[s.sha256].append(s)
    kept: list[Sample] = []
    dups: list[str] = []
    conflicts: list[str] = []
    leaks: list[str] = []
    for group in by_hash.values():
        labels = {s.label for s in group}
        if len(labels) > 1:
            conflicts.append(" = ".join(f"{s.member} ({s.label})" for s in group))
            continue
        kept.append(group[0])
        for extra in group[1:]:
            (leaks if extra.split != group[0].split else dups).append(f"{extra.member} duplicates {group[0].member}")
    warnings = []
    if dups:
        warnings.append(DatasetWarning("duplicate", f"{len(dups)} exact duplicate(s) kept once.", dups))
    if leaks:
        warnings.append(
            DatasetWarning(
                "split_leak",
                f"{len(leaks)} image(s) appear in both training and validation; kept in training only.",
                leaks,
            )
        )
    if conflicts:
        warnings.append(
            DatasetWarning(
                "label_conflict",
                f"{len(conflicts)} image(s) are filed under more than one class and were left out.",
                conflicts,
            )
        )
    kept.sort(key=lambda s: s.member)
    return kept, warnings


def validate_classes(samples: list[Sample], min_per_class: int, layout: str) -> list[str]:
    """The classes, sorted, once the samples make a dataset a classifier can learn from; else DatasetError."""
    if not samples:
        raise DatasetError("The archive holds no readable images.")
    counts = Counter(s.label for s in samples)
    classes = sorted(counts)
    if len(classes) < 2:
        raise DatasetError(
            f"A classifier needs at least 2 classes; the archive has only one: '{classes[0]}'. "
            "Put each class's images in its own folder."
        )
    small = [f"'{c}' has {counts[c]}" for c in classes if counts[c] < min_per_class]
    if small:
        raise DatasetError(
            f"Each class needs at least {min_per_class} images: {', '.join(small)}.",
            classes=[c for c in classes if counts[c] < min_per_class],
        )
    if layout == "split" or any(s.split == "val" for s in samples):
        train = {s.label for s in samples if s.split == "train"}
        missing = sorted(set(classes) - train)
        if missing:
            raise DatasetError(
                f"Class(es) {', '.join(repr(m) for m in missing)} appear in val/ or test/ but have no "
                "training images in train/."
            )
    return classes


def _balance_warnings(index: DatasetIndex) -> Iterator[DatasetWarning]:
    counts = index.counts()
    most, least = max(counts.values()), min(counts.values())
    if least * 5 <= most:
        rare = [name for name, n in counts.items() if n * 5 <= most]
        yield DatasetWarning(
            "imbalance",
            f"Classes are imbalanced ({least} vs {most} images); training weights classes to compensate.",
            rare,
        )
