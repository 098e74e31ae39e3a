"""Versions on S3 (SeaweedFS): images added later sit in an archive of their own, and both an
export and a training input gather them by ranged reads and copies, with no shared disk."""

from __future__ import annotations

import io
import zipfile

import pytest

from apps.datasets.versions import (
    version_archive,
    version_change,
    version_export,
    version_index,
)
from tests.apps.stored_versions import two_archive_version
from tests.apps.test_storage import s3_storage  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_version_of_two_archives_exports_and_trains_from_s3(s3_storage, make_user, tmp_path):  # noqa: F811
    user = make_user()
    dataset, _, v2 = two_archive_version(user, tmp_path)
    assert (v2.status, v2.num_images, v2.summary["added"]) == ("ready", 17, 5), v2.error
    first = version_index(v2).samples[0]
    v3 = version_change(dataset=dataset, relabel={first.sha256: "owls"})

    export = version_export(v3)
    body = b"".join(export)
    assert len(body) == len(export)  # the size announced before the first byte
    exported = zipfile.ZipFile(io.BytesIO(body))
    names = exported.namelist()
    assert len(names) == 17 and len([n for n in names if "/owls/" in n]) == 6
    assert exported.testzip() is None  # every member's CRC holds

    with version_archive(v3) as (archive, idx):  # what a worker on another host hands to ml.fit
        with zipfile.ZipFile(archive) as zf:
            for s in idx.samples:
                assert zf.read(s.member)  # every image readable under the index's names
        assert {s.label for s in idx.samples} == {"cats", "dogs", "owls"}
    assert not archive.exists()  # the scratch copy goes when done
