from __future__ import annotations

import hashlib
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile

from apps.common.errors import UserError
from apps.serving.cache import get_predictor
from apps.serving.models import TrainedModel
from apps.training.models import Job
from ml.images import ImageDecodeError


def model_create(*, job: Job, bundle_path: str, result) -> TrainedModel:
    path = Path(bundle_path)
    model = TrainedModel(
        owner=job.owner,
        job=job,
        name=job.dataset.name if job.dataset else f"job {job.pk}",
        backbone=job.config.get("backbone", ""),
        classes=result.classes,
        metrics=result.metrics,
        strategy=result.strategy,
        bundle_bytes=path.stat().st_size,
        bundle_sha256=_sha256(path),
    )
    with path.open("rb") as fh:
        model.bundle = default_storage.save(f"{model.storage_prefix}bundle.zip", File(fh))
    model.save()
    return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def model_predict(*, model: TrainedModel, images: list[UploadedFile], k: int = 5) -> list[list[dict]]:
    if not images:
        raise UserError("Attach one or more images as multipart fields named 'image'.")
    if len(images) > settings.GRAFT_MAX_PREDICT_IMAGES:
        raise UserError(f"At most {settings.GRAFT_MAX_PREDICT_IMAGES} images per request.")
    if sum(f.size for f in images) > settings.GRAFT_MAX_PREDICT_BYTES:
        raise UserError("The images are over the request size limit.", status_code=413)
    predictor = get_predictor(model)
    decoded = []
    for f in images:
        try:
            decoded.append(predictor.decode(f.read(), max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS))
        except ImageDecodeError as exc:
            raise UserError(f"'{f.name}' cannot be read as an image: {exc}.", file=f.name) from None
    results = predictor.predict(decoded, k=k)
    return [[{"label": p.label, "score": p.score} for p in row] for row in results]
