"""Two models side by side: their metrics and the difference, per class, their confusion matrices,
and the validation images whose prediction changed between them (fixed by the second, broken by it).

Both models are judged on their own validation split. When both were trained on versions of one
dataset, splits are written down per image (a relabel keeps it), so an image in both validation
splits was judged by both; the images compared are those. Without versions (models trained before
them) an image is compared when both models saw the same data (same content hash).
"""

from __future__ import annotations

from typing import Any

from apps.common.errors import UserError
from apps.datasets.models import DatasetVersion
from apps.datasets.versions import version_index
from apps.serving.models import TrainedModel
from apps.training.gallery import gallery_members

SUMMARY = ("val_accuracy", "macro_f1", "val_loss", "ece", "num_val")


def _val_images(model: TrainedModel) -> dict[str, object] | None:
    """The model's validation images: the name its fit gave each, to what the image is (the archive
    and member it came from), or None when unknown. Names alone do not tell images apart across
    versions: a name is made from the order of the version's archives, which adding images changes."""
    version: DatasetVersion | None = model.version
    if version is None or not version.manifest:
        return None
    from apps.datasets.versions import training_names

    upload = version.dataset.archive
    val = {(s.source or upload, s.member) for s in version_index(version).samples if s.split == "val"}
    return {name: origin for name, origin in training_names(version).items() if origin in val}


def _summary(model: TrainedModel) -> dict[str, Any]:
    return {
        "id": model.pk,
        "name": model.name,
        "project": model.dataset_id,
        "version": model.version.number if model.version else None,
        "strategy": model.strategy.get("name"),
        "backbone": model.backbone,
        "created_at": model.created_at,
        **{k: model.metrics.get(k) for k in SUMMARY},
    }


def _per_class(a: TrainedModel, b: TrainedModel) -> list[dict[str, Any]]:
    rows_a = {r["label"]: r for r in a.metrics.get("per_class", [])}
    rows_b = {r["label"]: r for r in b.metrics.get("per_class", [])}
    out = []
    for label in sorted(set(rows_a) | set(rows_b)):
        ra, rb = rows_a.get(label, {}), rows_b.get(label, {})
        row: dict[str, Any] = {"label": label}
        for key in ("f1", "precision", "recall", "support"):
            row[f"a_{key}"], row[f"b_{key}"] = ra.get(key), rb.get(key)
        if ra.get("f1") is not None and rb.get("f1") is not None:
            row["delta_f1"] = rb["f1"] - ra["f1"]
        out.append(row)
    return out


def models_compare(a: TrainedModel, b: TrainedModel) -> dict[str, Any]:
    if a.pk == b.pk:
        raise UserError("Pick two different models to compare.")
    val_a, val_b = _val_images(a), _val_images(b)
    if val_a is None or val_b is None:
        val_a = val_b = {}  # an image is known by the name its fit gave it

    def keyed(model: TrainedModel, val: dict[str, object]) -> dict[object, dict[str, Any]]:
        """The model's misclassified validation images, by what the image is."""
        return {val.get(m["file"], m["file"]): m for m in model.metrics.get("misclassified", [])}

    wrong_a, wrong_b = keyed(a, val_a), keyed(b, val_b)
    if val_a and val_b:
        both = set(val_a.values()) & set(val_b.values())
    elif (
        a.dataset_id is not None
        and a.dataset_id == b.dataset_id
        and a.metrics.get("num_val") == b.metrics.get("num_val")
    ):
        both = set(wrong_a) | set(wrong_b)  # trained before versions: the same split, as far as is known
    else:
        both = set()
    shown_a, shown_b = set(gallery_members(a.metrics)), set(gallery_members(b.metrics))  # by the names fits gave
    fixed = [
        {**wrong_a[f], "model_with_image": a.pk if wrong_a[f]["file"] in shown_a else None}
        for f in wrong_a
        if f in both and f not in wrong_b
    ]
    broken = [
        {**wrong_b[f], "model_with_image": b.pk if wrong_b[f]["file"] in shown_b else None}
        for f in wrong_b
        if f in both and f not in wrong_a
    ]
    still = [
        {
            **wrong_b[f],
            "was": wrong_a[f]["predicted"],
            "model_with_image": b.pk if wrong_b[f]["file"] in shown_b else None,
        }
        for f in wrong_b
        if f in both and f in wrong_a
    ]
    deltas = {
        k: (b.metrics[k] - a.metrics[k])
        for k in ("val_accuracy", "macro_f1", "val_loss", "ece")
        if isinstance(a.metrics.get(k), int | float) and isinstance(b.metrics.get(k), int | float)
    }
    return {
        "a": _summary(a),
        "b": _summary(b),
        "deltas": deltas,
        "per_class": _per_class(a, b),
        "confusion": {
            "a": {"classes": a.classes, "matrix": a.metrics.get("confusion_matrix")},
            "b": {"classes": b.classes, "matrix": b.metrics.get("confusion_matrix")},
        },
        "compared_images": len(both),
        "fixed": fixed,
        "broken": broken,
        "still_wrong": still,
    }
