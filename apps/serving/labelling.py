"""Predictions that come back as labels: the images a project's models answered (kept by their
prediction logs) wait in a queue, least certain first (the smallest margin between the top two
labels); the owner labels some, and they become a new version of the project's dataset, added as
any images are (apps.datasets.versions), after which Retrain is one click.

The labelled images move: they are packed into the version's zip of added images, and the log's
copies are deleted once that version is ready. Until then they stay, uncharged (the meter counts the
zip), so that a version that fails puts its images back in the queue, labels and all undone.
"""

from __future__ import annotations

import io
import uuid
import zipfile
from pathlib import PurePosixPath

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import F, QuerySet

from apps.common.errors import UserError
from apps.common.storage import delete_quietly, open_if_stored
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.versions import version_add_stored, version_head
from apps.serving.models import PredictionRecord

MAX_LABELS = 500  # in one request


def label_queue(project: Dataset) -> QuerySet[PredictionRecord]:
    """The project's kept prediction images not labelled yet, least certain first."""
    return (
        PredictionRecord.objects.filter(model__dataset=project, labelled="")
        .exclude(image="")
        .select_related("model")
        .order_by(F("margin").asc(nulls_last=True), "-id")
    )


def label_records(*, project: Dataset, labels: dict[int, str], note: str = "") -> DatasetVersion:
    """Add the images of these records ({record id: class}) to the project's dataset as its next
    version (ingested in the background, like any added images)."""
    if not labels:
        raise UserError("Label at least one image.")
    if len(labels) > MAX_LABELS:
        raise UserError(f"Label at most {MAX_LABELS} images at once.")
    head = version_head(project)
    if head is None:
        raise UserError(f"Dataset '{project.name}' is not ready.", status_code=409)
    classes = [c["name"] for c in head.classes]
    bad = sorted({label for label in labels.values() if label not in classes})
    if bad:
        raise UserError(f"'{bad[0]}' is not a class of '{project.name}'; label as one of: {', '.join(classes)}.")
    records = list(label_queue(project).filter(pk__in=list(labels)))
    missing = sorted(set(labels) - {r.pk for r in records})
    if missing:
        raise UserError(
            f"Prediction {missing[0]} is not waiting to be labelled in this project (labelled already, "
            "deleted, or kept without its image).",
            status_code=409,
        )
    archive = _pack(project, records, labels)
    try:
        with transaction.atomic():
            version = version_add_stored(
                dataset=project,
                archive=archive.name,
                size=archive.size,
                reserved=True,  # charged as the log's kept images until now: the meter counts the zip instead
                note=note or f"{len(records)} labelled prediction{'s' if len(records) != 1 else ''}",
            )
            for r in records:  # a request labelling the same record first wins; this one then changes nothing
                if not PredictionRecord.objects.filter(pk=r.pk, labelled="").update(
                    labelled=labels[r.pk], labelled_version=version
                ):
                    raise UserError(f"Prediction {r.pk} was labelled meanwhile.", status_code=409)
    except BaseException:
        delete_quietly(archive.name)
        raise
    return version


def settle_labelled(version: DatasetVersion, *, ready: bool) -> None:
    """The addition `version` ended: ready, the labelled records' own copies of the images go (the
    version holds them); failed, the records wait in the queue again, unlabelled."""
    records = PredictionRecord.objects.filter(labelled_version=version)
    if ready:
        names = [n for n in records.values_list("image", flat=True) if n]
        records.update(image="", image_bytes=0)
        transaction.on_commit(lambda: _delete_all(names), robust=True)
    else:
        records.update(labelled="", labelled_version=None)


def _delete_all(names: list[str]) -> None:
    for name in names:
        delete_quietly(name)


class _Packed:
    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size


def _pack(project: Dataset, records: list[PredictionRecord], labels: dict[int, str]) -> _Packed:
    """A zip of the labelled images, one folder per class, stored as the version's added images."""
    buffer = io.BytesIO()  # at most MAX_LABELS kept images (each under the prediction size limit)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for r in records:
            suffix = PurePosixPath(r.image).suffix or ".jpg"
            src = open_if_stored(r.image)
            if src is None:  # deleted meanwhile (the log trimmed, or image keeping turned off)
                raise UserError(f"Prediction {r.pk}'s image is no longer kept; label the others.", status_code=409)
            with src:
                zf.writestr(f"{labels[r.pk]}/prediction-{r.pk}{suffix}", src.read())
    data = buffer.getvalue()
    name = default_storage.save(f"{project.storage_prefix}additions/{uuid.uuid4().hex}.zip", ContentFile(data))
    return _Packed(name, len(data))
