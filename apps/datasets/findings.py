"""The finders on dataset versions: run by a worker after each version is made (ml.finders), their
results stored with the version, the images' embeddings kept per dataset by content so the next
version embeds only what it added; and the user's dismissals, which hold in every version."""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections import Counter
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from apps.common import work
from apps.common.errors import UserError
from apps.common.storage import delete_quietly, open_if_stored, open_stream
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.versions import dataset_has_image, version_archive, version_index

if TYPE_CHECKING:  # imported when used: ml.features brings in torch
    from ml.features import EmbeddingCache

log = logging.getLogger(__name__)

MAX_DISMISSALS = 10_000  # in one request


def enqueue_findings(version_id: int) -> None:
    from apps.datasets.tasks import find_issues

    find_issues.delay(version_id)


def findings_request(*, version: DatasetVersion) -> DatasetVersion:
    """Run the finders on a version again (after they failed, or for a version made before them)."""
    if version.status != DatasetVersion.Status.READY:
        raise UserError(f"Version {version.number} is not ready yet.", status_code=409)
    if version.findings_status in (DatasetVersion.FindingsStatus.QUEUED, DatasetVersion.FindingsStatus.RUNNING):
        return version  # already on their way (a silent run is failed by beat, then can be asked for again)
    DatasetVersion.objects.filter(pk=version.pk).update(
        findings_status=DatasetVersion.FindingsStatus.QUEUED, findings_at=timezone.now()
    )
    transaction.on_commit(lambda: enqueue_findings(version.pk), robust=True)
    version.refresh_from_db()
    return version


def findings_recover_stale() -> list[int]:
    """Finders whose worker went silent (killed, or out of memory) fail with a sentence; the user
    can run them again. Not re-queued by themselves: a version that kills its worker would loop.
    Finders queued for longer than GRAFT_RESEND_SECONDS have their message sent again (it may have
    been lost; a duplicate finds them claimed)."""
    before = timezone.now() - timedelta(seconds=settings.GRAFT_JOB_STALE_SECONDS)
    stale = DatasetVersion.objects.filter(findings_status=DatasetVersion.FindingsStatus.RUNNING, findings_at__lt=before)
    ids = list(stale.values_list("pk", flat=True))
    stale.filter(pk__in=ids).update(
        findings_status=DatasetVersion.FindingsStatus.FAILED,
        findings_error="The finders' worker stopped before they finished (killed, or out of memory); run them again.",
    )
    queued = DatasetVersion.objects.filter(findings_status=DatasetVersion.FindingsStatus.QUEUED)
    work.resend(queued, "findings_at", enqueue_findings)
    return ids


def embeddings_name(dataset: Dataset) -> str:
    return f"{dataset.storage_prefix}embeddings.npz"


def version_find(*, version_id: int) -> None:
    """The finders on one version (`ml.finders`), their results stored with it. The images'
    embeddings are kept per dataset, by content, so the next version embeds only its new images."""
    from ml.finders import FinderConfig, find_issues

    claimed = DatasetVersion.objects.filter(
        pk=version_id,
        status=DatasetVersion.Status.READY,
        findings_status=DatasetVersion.FindingsStatus.QUEUED,
    ).update(findings_status=DatasetVersion.FindingsStatus.RUNNING, findings_at=timezone.now())
    if not claimed:
        return  # a duplicate message, or the version went meanwhile
    mine = DatasetVersion.objects.filter(pk=version_id, findings_status=DatasetVersion.FindingsStatus.RUNNING)
    version = DatasetVersion.objects.select_related("dataset").get(pk=version_id)
    try:
        with (
            work.Heartbeat(mine, f"findings-{version_id}", field="findings_at"),
            version_archive(version) as (
                path,
                index,
            ),
        ):
            cache = load_embeddings(version.dataset)
            findings = find_issues(path, FinderConfig(device="cpu"), index=index, cache=cache)
            _store_embeddings(version.dataset, cache)
            sha = {s.member: s.sha256 for s in index.samples}
            original = {s.sha256: s.member for s in version_index(version).samples}
        data = _with_shas(findings.to_dict(), sha, original)
        name = default_storage.save(
            f"{version.dataset.storage_prefix}findings/v{version.number}-{uuid.uuid4().hex[:8]}.json",
            ContentFile(json.dumps(data).encode()),
        )
        summary = {
            "label_issues": len(data["label_issues"]),
            "near_duplicates": len(data["near_duplicates"]),
            "outliers": len(data["outliers"]),
            **{kind: n for kind, n in Counter(d["kind"] for d in data["near_duplicates"]).items()},
        }
        if not mine.update(
            findings=name,
            findings_status=DatasetVersion.FindingsStatus.READY,
            findings_summary=summary,
            findings_error="",
            findings_at=timezone.now(),
        ):
            delete_quietly(name)
    except Exception as exc:  # noqa: BLE001 - the finders never cost the user their dataset
        message = getattr(exc, "message", "") or "The finders failed unexpectedly; the operators have the details."
        log.exception("finders on version %s failed", version_id)
        mine.update(findings_status=DatasetVersion.FindingsStatus.FAILED, findings_error=message)


def load_embeddings(dataset: Dataset) -> EmbeddingCache:
    """The dataset's embeddings so far (by image content), or an empty cache. They hold what the
    finders measured, among it every frozen feature a fit of the version reads (`ml.measure`)."""
    from ml.features import EmbeddingCache

    try:
        stream = open_if_stored(embeddings_name(dataset))
        if stream is None:
            return EmbeddingCache()
        with stream:
            return EmbeddingCache.from_bytes(stream.read())
    except Exception:  # noqa: BLE001 - a damaged cache only costs the embeddings it held
        log.exception("embeddings of dataset %s unreadable; starting over", dataset.pk)
        return EmbeddingCache()


def _store_embeddings(dataset: Dataset, cache: EmbeddingCache) -> None:
    """Replace the dataset's embeddings with `cache` (which holds every image the finders just read)."""
    name = embeddings_name(dataset)
    data = ContentFile(cache.to_bytes())
    delete_quietly(name)
    saved = default_storage.save(name, data)
    if saved != name:  # another run stored it between the delete and the save (a local disk renames)
        delete_quietly(saved)


def _with_shas(data: dict[str, Any], sha: dict[str, str], original: dict[str, str]) -> dict[str, Any]:
    """Findings name images by their member in the archive the finders read; the app names them by
    content (sha256), and by their path in the archive they arrived in."""

    def name(member: str) -> tuple[str, str]:
        digest = sha[member]
        return digest, original.get(digest, member)

    for row in data["label_issues"] + data["outliers"]:
        row["sha256"], row["member"] = name(row["member"])
    for row in data["near_duplicates"]:
        pairs = [name(m) for m in row["members"]]
        row["sha256s"] = [p[0] for p in pairs]
        row["members"] = [p[1] for p in pairs]
    return data


def findings_read(version: DatasetVersion) -> dict[str, Any]:
    if version.findings_status != DatasetVersion.FindingsStatus.READY or not version.findings:
        return {"label_issues": [], "near_duplicates": [], "outliers": []}
    return _read_findings(version.findings)


@functools.lru_cache(maxsize=16)
def _read_findings(name: str) -> dict[str, Any]:
    with open_stream(name) as fh:
        findings: dict[str, Any] = json.load(fh)  # what `version_find` wrote
        return findings


def findings_dismiss(*, dataset: Dataset, sha256s: list[str], dismissed: bool = True) -> int:
    """Dismiss (or restore) what the finders say of these images, in every version; returns how
    many images are dismissed now."""
    if len(sha256s) > MAX_DISMISSALS:
        raise UserError(f"Dismiss at most {MAX_DISMISSALS:,} images at once.")
    unknown = [s for s in sha256s if not dataset_has_image(dataset, s)]
    if unknown:
        raise UserError(f"{len(unknown)} image(s) are not in this dataset, e.g. {unknown[0][:64]!r}.")
    with transaction.atomic():
        current = set(Dataset.objects.select_for_update().filter(pk=dataset.pk).values_list("dismissed", flat=True)[0])
        current = current | set(sha256s) if dismissed else current - set(sha256s)
        Dataset.objects.filter(pk=dataset.pk).update(dismissed=sorted(current))
    dataset.dismissed = sorted(current)
    return len(current)
