from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction

from apps.common.decoding import decode_gate
from apps.common.errors import UserError
from apps.common.storage import delete_prefix
from apps.serving import predlog
from apps.serving.cache import get_predictor
from apps.serving.models import TrainedModel, model_storage_prefix
from apps.training.models import Job
from ml.images import ImageDecodeError, header_pixels
from ml.predict import Predictor
from ml.report import json_safe

if TYPE_CHECKING:  # for its type only: ml.fit brings in torch
    from ml.fit import FitResult


@dataclass(frozen=True)
class StoredBundle:
    prefix: str  # the model's storage prefix
    name: str
    size: int
    sha256: str


class LabelScore(TypedDict):
    """One of an image's top-k predictions, as the API answers it."""

    label: str
    score: float


def bundle_store(bundle_path: str) -> StoredBundle:
    """Copy a trained bundle into storage (slow: call it outside any transaction)."""
    path = Path(bundle_path)
    prefix = model_storage_prefix()
    with path.open("rb") as fh:
        name = default_storage.save(f"{prefix}bundle.zip", File(fh))
    return StoredBundle(prefix, name, path.stat().st_size, file_sha256(path))


def model_create(*, job: Job, bundle: StoredBundle, result: FitResult) -> TrainedModel:
    return TrainedModel.objects.create(
        owner=job.owner,
        job=job,
        dataset=job.dataset,
        version=job.version,
        name=model_default_name(job, result.strategy.name),
        backbone=job.config.get("backbone", ""),
        classes=result.classes,
        metrics=result.metrics.to_json(),
        strategy=json_safe(result.strategy.to_dict()),
        storage_prefix=bundle.prefix,
        bundle=bundle.name,
        bundle_bytes=bundle.size,
        bundle_sha256=bundle.sha256,
    )


def model_default_name(job: Job, strategy: str) -> str:
    """What tells a project's models apart at a glance: the version, the plan, and which of its kind
    it is ("pets v2 · linear", then "pets v2 · linear #2"); renamed at will."""
    if job.dataset is None:
        return f"job {job.pk}"
    version = f" v{job.version.number}" if job.version else ""
    base = f"{job.dataset.name}{version} · {strategy or 'model'}"[:190]
    same = TrainedModel.objects.filter(dataset=job.dataset, name__startswith=base).count()
    return base if same == 0 else f"{base} #{same + 1}"


def model_delete(*, model: TrainedModel) -> None:
    """Delete a model, its bundle, its batch predictions (a running one stops) and its prediction
    log. Its endpoint answers 404 from then on; the usage meter drops its bytes at once."""
    from apps.accounts.quotas import owner_locked

    with transaction.atomic():  # under the owner's lock: no batch is being created on it meanwhile
        owner_locked(model.owner)
        prefixes = [model.storage_prefix, *model.batches.values_list("storage_prefix", flat=True)]
        model.delete()  # batches and prediction records go with it (CASCADE)
    for prefix in prefixes:
        delete_prefix(prefix)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def model_predict(
    *, model: TrainedModel, images: list[UploadedFile[bytes]], k: int = 5, started: float | None = None
) -> tuple[list[list[LabelScore]], Predictor]:
    """Top-k for each image, and the predictor that answered (its runtime and precision); logged when
    the model's prediction log is on, with the time since `started` (time.perf_counter(); default:
    now) as the request's latency."""
    started = time.perf_counter() if started is None else started
    if not images:
        raise UserError("Attach one or more images as multipart fields named 'image'.")
    if len(images) > settings.GRAFT_MAX_PREDICT_IMAGES:
        raise UserError(f"At most {settings.GRAFT_MAX_PREDICT_IMAGES} images per request.")
    if sum(f.size or 0 for f in images) > settings.GRAFT_MAX_PREDICT_BYTES:
        raise UserError("The images are over the request size limit.", status_code=413)
    encoded = [(f.name, f.read()) for f in images]  # a few MB at most (GRAFT_MAX_PREDICT_BYTES)
    pixels = [header_pixels(data) for _, data in encoded]
    if sum(pixels) > settings.GRAFT_MAX_PREDICT_PIXELS:
        raise UserError(
            f"The images add up to {sum(pixels) / 1e6:,.0f} megapixels; one request may hold "
            f"{settings.GRAFT_MAX_PREDICT_PIXELS / 1e6:,.0f}. Send fewer or smaller images.",
            status_code=413,
        )
    predictor = get_predictor(model)
    inputs = []
    for (name, data), size in zip(encoded, pixels, strict=True):
        try:
            # One image at a time, decoded only when its pixels fit the process's decode budget.
            with decode_gate().hold(size):
                inputs.append(predictor.prepare(data, max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS))
        except ImageDecodeError as exc:
            raise UserError(f"'{name}' cannot be read as an image: {exc}.", file=name) from None
    results = predictor.predict_tensors(inputs, k=max(k, 2))  # the second label gives the log its margin
    predlog.record(
        model=model,
        latency_ms=(time.perf_counter() - started) * 1000,
        tops=[(row[0].label, row[0].score, row[0].score - row[1].score if len(row) > 1 else None) for row in results],
        images=encoded,
    )
    return [[{"label": p.label, "score": p.score} for p in row[:k]] for row in results], predictor
