"""Versions on S3 (SeaweedFS): images added later sit in an archive of their own, and both an
export and a training input gather them by ranged reads and copies, with no shared disk."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

from apps.common import work
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.versions import (
    ADDITION,
    version_add_stored,
    version_archive,
    version_change,
    version_export,
    version_first,
    version_index,
    version_ingest,
)
from ml.dataset import index_dataset
from ml.splits import with_splits
from tests.apps.test_storage import s3_storage  # noqa: F401 - the fixture
from tests.conftest import class_folders, image_bytes, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_version_of_two_archives_exports_and_trains_from_s3(s3_storage, make_user, tmp_path):  # noqa: F811
    user = make_user()
    path = make_zip(tmp_path / "d.zip", class_folders({"cats": 6, "dogs": 6}))
    dataset = Dataset(owner=user, name="pets", archive_bytes=path.stat().st_size)
    dataset.archive = default_storage.save(f"{dataset.storage_prefix}archive.zip", ContentFile(path.read_bytes()))
    index = with_splits(index_dataset(path))
    dataset.manifest = default_storage.save(
        f"{dataset.storage_prefix}manifest.json", ContentFile(json.dumps(index.to_dict()).encode())
    )
    dataset.status = Dataset.Status.READY
    dataset.save()
    version_first(dataset=dataset, index=index, manifest=dataset.manifest)

    more = make_zip(tmp_path / "more.zip", {f"owls/o_{i}.png": image_bytes(seed=900 + i) for i in range(5)})
    stored = default_storage.save(f"{dataset.storage_prefix}additions/more.zip", ContentFile(more.read_bytes()))
    with transaction.atomic():
        pending = version_add_stored(dataset=dataset, archive=stored, size=more.stat().st_size)
    claimed = work.claim(ADDITION, pending.pk, worker="test")
    assert claimed is not None
    version_ingest(version=claimed)
    v2 = DatasetVersion.objects.get(pk=pending.pk)
    assert (v2.status, v2.num_images, v2.summary["added"]) == ("ready", 17, 5), v2.error
    first = version_index(v2).samples[0]
    v3 = version_change(dataset=dataset, relabel={first.sha256: "owls"})

    exported = zipfile.ZipFile(io.BytesIO(b"".join(version_export(v3))))
    names = exported.namelist()
    assert len(names) == 17 and len([n for n in names if "/owls/" in n]) == 6
    assert exported.testzip() is None  # every member's CRC holds

    with version_archive(v3) as (archive, idx):  # what a worker on another host hands to ml.fit
        with zipfile.ZipFile(archive) as zf:
            for s in idx.samples:
                assert zf.read(s.member)  # every image readable under the index's names
        assert {s.label for s in idx.samples} == {"cats", "dogs", "owls"}
    assert not archive.exists()  # the scratch copy goes when done
