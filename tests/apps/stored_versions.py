"""A dataset stored as the app stores one, with a second version that adds images from another archive."""

from __future__ import annotations

import json
from pathlib import Path

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

from apps.common import work
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.versions import ADDITION, version_add_stored, version_first, version_ingest
from ml.dataset import index_dataset
from ml.splits import with_splits
from tests.conftest import class_folders, image_bytes, make_zip


def two_archive_version(user: object, tmp_path: Path) -> tuple[Dataset, DatasetVersion, DatasetVersion]:
    """(dataset, v1, v2): v1 the upload (12 images), v2 the upload and five owls added later (two stored
    archives)."""
    path = make_zip(tmp_path / "d.zip", class_folders({"cats": 6, "dogs": 6}))
    dataset = Dataset(owner=user, name="pets", archive_bytes=path.stat().st_size)
    dataset.archive = default_storage.save(f"{dataset.storage_prefix}archive.zip", ContentFile(path.read_bytes()))
    index = with_splits(index_dataset(path))
    dataset.manifest = default_storage.save(
        f"{dataset.storage_prefix}manifest.json", ContentFile(json.dumps(index.to_dict()).encode())
    )
    dataset.status = Dataset.Status.READY
    dataset.save()
    v1 = version_first(dataset=dataset, index=index, manifest=dataset.manifest)

    more = make_zip(tmp_path / "more.zip", {f"owls/o_{i}.png": image_bytes(seed=900 + i) for i in range(5)})
    stored = default_storage.save(f"{dataset.storage_prefix}additions/more.zip", ContentFile(more.read_bytes()))
    with transaction.atomic():
        pending = version_add_stored(dataset=dataset, archive=stored, size=more.stat().st_size)
    claimed = work.claim(ADDITION, pending.pk, worker="test")
    assert claimed is not None
    version_ingest(version=claimed)
    return dataset, v1, DatasetVersion.objects.get(pk=pending.pk)
