"""The review gallery's queries: a version's images a page at a time, filtered by class, split and
finder, each with what the finders say of it. Manifests and findings never change once written, so
a page is a slice of lists a process keeps for a while, not a database query per image."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from apps.common.errors import UserError
from apps.datasets.findings import findings_read
from apps.datasets.models import DatasetVersion
from apps.datasets.versions import version_index
from ml.dataset import Sample

MAX_PAGE_SIZE = 200
FINDER_FILTERS = {
    "flagged": "flagged by any finder",
    "label_issues": "likely label errors",
    "near_duplicates": "near-duplicates",
    "cross-class": "near-duplicates across classes",
    "cross-split": "near-duplicates across training and validation",
    "outliers": "outliers",
}


@dataclass
class Flags:
    label_issue: dict[str, Any] | None = None  # the finders' rows, as `findings_read` gives them
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    outlier: dict[str, Any] | None = None

    def rank(self) -> float:
        """How much an image asks for a look: its strongest finding."""
        scores = [self.label_issue["score"] if self.label_issue else 0.0]
        scores += [d["similarity"] for d in self.near_duplicates]
        if self.outlier:
            scores.append(min(1.0, self.outlier["score"] / 2))
        return max(scores)


@functools.lru_cache(maxsize=16)
def _flags(findings: str, manifest: str, version_pk: int) -> dict[str, Flags]:
    version = DatasetVersion.objects.get(pk=version_pk)
    data = findings_read(version)
    flags: dict[str, Flags] = {}
    for row in data["label_issues"]:
        flags.setdefault(row["sha256"], Flags()).label_issue = row
    for row in data["near_duplicates"]:
        a, b = row["sha256s"]
        for me, other, other_member in ((a, b, row["members"][1]), (b, a, row["members"][0])):
            flags.setdefault(me, Flags()).near_duplicates.append(
                {**row, "partner": other, "partner_member": other_member}
            )
    for row in data["outliers"]:
        flags.setdefault(row["sha256"], Flags()).outlier = row
    return flags


def version_flags(version: DatasetVersion) -> dict[str, Flags]:
    if version.findings_status != DatasetVersion.FindingsStatus.READY:
        return {}
    return _flags(version.findings, version.manifest, version.pk)


def _matches(finder: str, f: Flags | None) -> bool:
    if f is None:
        return False
    if finder == "flagged":
        return True
    if finder == "label_issues":
        return f.label_issue is not None
    if finder == "outliers":
        return f.outlier is not None
    if finder == "near_duplicates":
        return bool(f.near_duplicates)
    return any(d["kind"] == finder for d in f.near_duplicates)


def version_images(
    version: DatasetVersion,
    *,
    label: str = "",
    split: str = "",
    finder: str = "",
    page: int = 1,
    page_size: int = 60,
    with_dismissed: bool = False,
) -> dict[str, Any]:
    """One page of the version's images; a finder filter leaves out dismissed images unless
    `with_dismissed`."""
    if finder and finder not in FINDER_FILTERS:
        raise UserError(f"Unknown finder '{finder}'. Valid choices: {', '.join(FINDER_FILTERS)}.")
    if split and split not in ("train", "val", "test"):
        raise UserError("split must be train, val or test.")
    page_size = min(page_size, MAX_PAGE_SIZE)
    index = version_index(version)
    if label and label not in index.classes:
        raise UserError(f"'{label}' is not a class of version {version.number}.")
    flags = version_flags(version)
    rows: list[Sample] = [
        s for s in index.samples if (not label or s.label == label) and (not split or s.split == split)
    ]
    dismissed = set(version.dataset.dismissed)
    # How many images each finder filter would show under this class and split: the filter chips' counts.
    facets = {
        key: sum(
            1 for s in rows if _matches(key, flags.get(s.sha256)) and (with_dismissed or s.sha256 not in dismissed)
        )
        for key in FINDER_FILTERS
    }
    if finder:
        rows = [
            s for s in rows if _matches(finder, flags.get(s.sha256)) and (with_dismissed or s.sha256 not in dismissed)
        ]
        rows.sort(key=lambda s: -flags[s.sha256].rank())
    pages = max(1, math.ceil(len(rows) / page_size))
    start = (page - 1) * page_size
    results = []
    for s in rows[start : start + page_size]:
        f = flags.get(s.sha256) or Flags()
        results.append(
            {
                "sha256": s.sha256,
                "member": s.member,
                "label": s.label,
                "split": s.split,
                "width": s.width,
                "height": s.height,
                "label_issue": f.label_issue,
                "near_duplicates": f.near_duplicates,
                "outlier": f.outlier,
                "dismissed": s.sha256 in dismissed,
            }
        )
    return {"count": len(rows), "page": page, "pages": pages, "facets": facets, "results": results}


def version_members(version: DatasetVersion) -> frozenset[str]:
    """The sha256s of the version's images."""
    return _shas(version.manifest, version.pk)


@functools.lru_cache(maxsize=32)
def _shas(manifest: str, version_pk: int) -> frozenset[str]:
    return frozenset(s.sha256 for s in version_index(DatasetVersion.objects.get(pk=version_pk)).samples)
