"""Dataset versions: a dataset is a line of immutable versions, each its parent plus a change set.

- **v1** is the upload, with every image's split written down (the stratified split a fit would
  make, unless the upload brought its own `val/`), so later versions keep each image where it was.
- **A change set** relabels and removes images (named by content, their sha256) and makes the next
  version at once: a new manifest, no bytes copied.
- **Adding images** stores their zip and ingests it as background work (`ADDITION`, apps.common.work):
  the same checks as an upload, exact duplicates of images already there left out, each new image
  given a split by the same stratified rule (or the zip's own `train/`/`val/`).
- **Bytes** stay in the archive each image arrived in (`Sample.source`); the usage meter counts each
  archive once, however many versions name its images.

While a version is being added, the line is busy: a change set waits for it (409), so versions
never branch. The dataset row mirrors its newest ready version (manifest, counts, classes), which
is what training uses unless a job names another.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, TypedDict

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from apps.accounts.quotas import check_new_dataset, owner_locked
from apps.common import work
from apps.common.archive_cache import cached_archive, content_key, stored_archive
from apps.common.errors import UserError
from apps.common.storage import delete_quietly, local_copy, open_seekable, open_stream
from apps.datasets.models import Dataset, DatasetVersion
from ml.archive import read_member
from ml.dataset import DatasetIndex, DatasetWarning, IngestConfig, Sample, index_images, validate_classes
from ml.errors import DatasetError
from ml.images import ImageDecodeError, thumbnail_jpeg
from ml.splits import place_added

if TYPE_CHECKING:
    from zipstream import ZipStream

log = logging.getLogger(__name__)

THUMB_SIDE = 160
MAX_LISTED_CHANGES = 10_000  # per kind, in a version's `changes` (the summary counts them all)


# --- reading --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _read_manifest(name: str) -> DatasetIndex:
    """A version's manifest never changes once written, so a process may keep a few."""
    with open_stream(name) as fh:
        return DatasetIndex.from_dict(json.load(fh))


def version_index(version: DatasetVersion) -> DatasetIndex:
    if not version.manifest:
        raise UserError(f"Version {version.number} has no images yet.", status_code=409)
    return _read_manifest(version.manifest)


def version_head(dataset: Dataset) -> DatasetVersion | None:
    """The newest ready version: what training and the dataset's page use unless told otherwise."""
    return dataset.versions.filter(status=DatasetVersion.Status.READY).order_by("-number").first()


class ClassCount(TypedDict):
    """A class of a version, as `Dataset.classes` and `DatasetVersion.classes` list them."""

    name: str
    count: int
    train: int
    val: int


def class_counts(index: DatasetIndex) -> list[ClassCount]:
    totals, train, val = index.counts(), index.counts("train"), index.counts("val")
    return [{"name": c, "count": totals[c], "train": train[c], "val": val[c]} for c in index.classes]


def image_thumb_name(dataset: Dataset, sha256: str) -> str:
    return f"{dataset.storage_prefix}images/{sha256[:32]}.jpg"


# --- v1: the upload --------------------------------------------------------------------------------


def version_first(*, dataset: Dataset, index: DatasetIndex, manifest: str) -> DatasetVersion:
    """The upload's version (made once its ingestion marked the dataset ready)."""
    version, _ = DatasetVersion.objects.get_or_create(
        dataset=dataset,
        number=1,
        defaults={
            "manifest": manifest,
            "num_images": len(index.samples),
            "classes": class_counts(index),
            "content_hash": index.content_hash,
            "summary": {"added": len(index.samples), "relabelled": 0, "removed": 0},
            "note": "Uploaded",
            "findings_status": DatasetVersion.FindingsStatus.QUEUED,
            "findings_at": timezone.now(),
        },
    )
    transaction.on_commit(lambda: _enqueue_findings(version.pk), robust=True)
    return version


def _enqueue_findings(version_id: int) -> None:
    from apps.datasets.findings import enqueue_findings

    enqueue_findings(version_id)


def store_image_thumbs(dataset: Dataset, archive: Path, samples: list[Sample]) -> None:
    """A thumbnail of every image, made once by the worker: the review gallery never decodes an image."""
    local = threading.local()
    max_bytes = _ingest_config().limits.max_member_bytes

    def make(sample: Sample) -> None:
        if not hasattr(local, "zf"):
            local.zf = zipfile.ZipFile(archive)
        try:
            jpeg = thumbnail_jpeg(
                read_member(local.zf, sample.member, max_bytes), THUMB_SIDE, max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS
            )
        except ImageDecodeError:
            return
        default_storage.save(image_thumb_name(dataset, sample.sha256), ContentFile(jpeg))

    with ThreadPoolExecutor(max_workers=4) as pool:  # object storage: a round trip each
        list(pool.map(make, samples))


def _ingest_config() -> IngestConfig:
    from apps.datasets.services import ingest_config

    return ingest_config()


# --- change sets ------------------------------------------------------------------------------------


def version_change(
    *,
    dataset: Dataset,
    parent: int | None = None,
    relabel: dict[str, str] | None = None,
    remove: list[str] | None = None,
    note: str = "",
) -> DatasetVersion:
    """The next version: `parent` (a version number; the newest when None) with images relabelled
    ({sha256: class}) and removed (sha256s). Ready at once; its finders are queued."""
    relabel, removed = dict(relabel or {}), set(remove or [])
    if not relabel and not removed:
        raise UserError("The change set is empty: relabel or remove at least one image.")
    both = sorted(set(relabel) & removed)
    if both:
        raise UserError(f"Image {both[0][:12]} is both relabelled and removed; choose one.")
    with transaction.atomic():
        owner_locked(dataset.owner)
        base = _parent_for_change(dataset, parent)
        index = version_index(base)
        by_sha = {s.sha256: s for s in index.samples}
        unknown = sorted((set(relabel) | removed) - set(by_sha))
        if unknown:
            raise UserError(
                f"{len(unknown)} image(s) are not in version {base.number}, e.g. {unknown[0][:64]!r}; "
                "name images by the sha256 the images list gives."
            )
        bad = sorted({label for label in relabel.values() if label not in index.classes})
        if bad:
            raise UserError(
                f"'{bad[0]}' is not a class of this dataset; relabel to one of: {', '.join(index.classes)}."
            )
        relabelled, gone = [], []
        samples = []
        for s in index.samples:
            if s.sha256 in removed:
                gone.append({"sha256": s.sha256, "member": s.member, "label": s.label})
            elif s.sha256 in relabel and relabel[s.sha256] != s.label:
                relabelled.append({"sha256": s.sha256, "member": s.member, "from": s.label, "to": relabel[s.sha256]})
                samples.append(replace(s, label=relabel[s.sha256]))
            else:
                samples.append(s)
        if not relabelled and not gone:
            raise UserError("Nothing would change: every image named already has that label.")
        new = _validated(index, samples)
        return _save_version(
            dataset,
            base,
            new,
            changes={"relabelled": relabelled, "removed": gone, "added": []},
            note=note,
        )


def _parent_for_change(dataset: Dataset, parent: int | None) -> DatasetVersion:
    busy = dataset.versions.filter(status=DatasetVersion.Status.PROCESSING).first()
    if busy is not None:
        raise UserError(
            f"Images are being added as version {busy.number}; save your changes once it is ready.", status_code=409
        )
    head = version_head(dataset)
    if head is None:
        raise UserError(f"Dataset '{dataset.name}' is not ready yet.", status_code=409)
    if parent is not None and parent != head.number:
        raise UserError(
            f"Version {head.number} was saved after version {parent}: review the changes on version "
            f"{head.number} and save again.",
            status_code=409,
        )
    return head


def _next_number(dataset: Dataset) -> int:
    """Numbers are never reused: a version whose images failed to be added keeps its own, and a
    deleted one's is not given out again (call under the owner's lock)."""
    last = dataset.versions.order_by("-number").values_list("number", flat=True).first() or 0
    given = Dataset.objects.filter(pk=dataset.pk).values_list("last_version_number", flat=True).first() or 0
    number = max(last, given) + 1
    Dataset.objects.filter(pk=dataset.pk).update(last_version_number=number)
    return number


def _validated(base: DatasetIndex, samples: list[Sample]) -> DatasetIndex:
    try:
        classes = validate_classes(samples, _ingest_config().min_per_class, base.layout)
    except DatasetError as exc:
        raise UserError(f"The new version would not make a dataset: {exc.message}") from None
    return DatasetIndex(classes=classes, samples=samples, warnings=[], layout=base.layout)


def _save_version(
    dataset: Dataset,
    parent: DatasetVersion,
    index: DatasetIndex,
    *,
    changes: dict[str, list[dict[str, str]]],  # kind ("relabelled", "removed", "added") -> one row an image
    note: str,
    number: int | None = None,
    version: DatasetVersion | None = None,
) -> DatasetVersion:
    """Write the manifest, then the row (or fill in the processing `version`); mirror the dataset."""
    number = number or _next_number(dataset)
    manifest = default_storage.save(
        f"{dataset.storage_prefix}versions/v{number}-{uuid.uuid4().hex[:8]}.json",
        ContentFile(json.dumps(index.to_dict()).encode()),
    )
    summary = {kind: len(rows) for kind, rows in changes.items()}
    listed = {kind: rows[:MAX_LISTED_CHANGES] for kind, rows in changes.items()}
    fields = {
        "manifest": manifest,
        "num_images": len(index.samples),
        "classes": class_counts(index),
        "content_hash": index.content_hash,
        "changes": listed,
        "summary": summary,
        "findings_status": DatasetVersion.FindingsStatus.QUEUED,
        "findings_at": timezone.now(),
    }
    try:
        if version is None:
            version = DatasetVersion.objects.create(
                dataset=dataset, number=number, parent=parent, note=note[:300], **fields
            )
        else:
            for key, value in fields.items():
                setattr(version, key, value)
        Dataset.objects.filter(pk=dataset.pk).update(
            manifest=manifest,
            num_images=len(index.samples),
            classes=class_counts(index),
            content_hash=index.content_hash,
            updated_at=timezone.now(),
        )
    except BaseException:
        delete_quietly(manifest)
        raise
    pk = version.pk
    transaction.on_commit(lambda: _enqueue_findings(pk), robust=True)
    return version


# --- adding images ---------------------------------------------------------------------------------


def _enqueue_addition(version_id: int, countdown: float = 0) -> None:
    from apps.datasets.tasks import ingest_addition

    ingest_addition.apply_async((version_id,), countdown=countdown or None)


def _drop_addition(version: DatasetVersion) -> None:
    """A failed addition: its zip goes; predictions labelled into it wait to be labelled again."""
    from apps.serving.labelling import settle_labelled  # serving builds on datasets: imported when used

    if DatasetVersion.objects.filter(pk=version.pk).update(archive="", archive_bytes=0):
        delete_quietly(version.archive)
    settle_labelled(version, ready=False)


ADDITION = work.register(
    work.Kind(
        name="addition",
        model=DatasetVersion,
        queued=DatasetVersion.Status.PROCESSING,
        running=DatasetVersion.Status.PROCESSING,
        failed=DatasetVersion.Status.FAILED,
        lost=(
            "Adding these images stopped its worker {attempts} times (killed, or out of memory), so it was "
            "not tried again. Try a smaller archive, or ask the operators to check the workers."
        ),
        enqueue=_enqueue_addition,
        on_lost=_drop_addition,
    )
)


def version_add(*, dataset: Dataset, file: UploadedFile[bytes], note: str = "") -> DatasetVersion:
    """Store a zip of images to add and queue its ingestion as the next version."""
    size = file.size or 0
    if size == 0:
        raise UserError("The uploaded file is empty.")
    if size > settings.GRAFT_MAX_UPLOAD_BYTES:
        raise UserError("The upload is over the size limit.", status_code=413)
    if not zipfile.is_zipfile(file):
        raise UserError(f"'{file.name}' is not a zip archive. Upload a .zip with one folder of images per class.")
    file.seek(0)
    stored = default_storage.save(f"{dataset.storage_prefix}additions/{uuid.uuid4().hex}.zip", file)
    try:
        with transaction.atomic():
            return version_add_stored(dataset=dataset, archive=stored, size=size, note=note)
    except BaseException:
        delete_quietly(stored)
        raise


def version_add_stored(
    *, dataset: Dataset, archive: str, size: int, note: str = "", reserved: bool = False
) -> DatasetVersion:
    """The processing version for a zip of images already in storage (call in a transaction)."""
    owner_locked(dataset.owner)
    head = _parent_for_change(dataset, None)
    check_new_dataset(dataset.owner, 0 if reserved else size, new_dataset=False)  # the storage quota
    version = DatasetVersion.objects.create(
        dataset=dataset,
        number=_next_number(dataset),
        parent=head,
        status=DatasetVersion.Status.PROCESSING,
        archive=archive,
        archive_bytes=size,
        note=note[:300],
    )
    transaction.on_commit(lambda: _enqueue_addition(version.pk), robust=True)
    return version


def version_ingest(*, version: DatasetVersion) -> None:
    """Ingest the claimed version's added images onto its parent; end `ready` or `failed`."""
    mine = work.attempt_rows(ADDITION, version)
    dataset = version.dataset
    try:
        with work.Heartbeat(mine, f"version-{version.pk}"), local_copy(version.archive) as path:
            added = index_images(path, _ingest_config())
            parent = version_index(version.parent) if version.parent else None
            if parent is None:
                raise DatasetError("The version these images were added to was deleted.")
            index, rows, warnings = _merge(parent, added, version.archive)
            store_image_thumbs(dataset, path, [s for s in index.samples if s.source == version.archive])
        with transaction.atomic():
            if not mine.update(warnings=[asdict(w) for w in warnings]):
                return  # taken over meanwhile
            version.refresh_from_db()
            if version.parent is None:  # its parent went meanwhile (versions are not deleted one by one)
                raise DatasetError("The version these images were added to was deleted.")
            saved = _save_version(
                dataset,
                version.parent,
                index,
                changes={"relabelled": [], "removed": [], "added": rows},
                note=version.note,
                number=version.number,
                version=version,
            )
            ready = mine.update(
                status=DatasetVersion.Status.READY,
                finished_at=timezone.now(),
                error="",
                **{
                    f: getattr(saved, f)
                    for f in (
                        "manifest",
                        "num_images",
                        "classes",
                        "content_hash",
                        "changes",
                        "summary",
                        "findings_status",
                    )
                },
            )
            if ready:
                from apps.serving.labelling import settle_labelled

                settle_labelled(version, ready=True)
    except DatasetError as exc:
        _fail_addition(mine, version, exc.message)
    except work.TRANSIENT:
        log.exception("adding images as version %s lost the database or storage; handing it back", version.pk)
        work.hand_back(ADDITION, mine)
    except Exception:
        log.exception("adding images as version %s failed", version.pk)
        _fail_addition(
            mine, version, "Processing the added images failed unexpectedly; the operators have the details."
        )


def _fail_addition(mine: QuerySet[DatasetVersion], version: DatasetVersion, message: str) -> None:
    if mine.update(status=DatasetVersion.Status.FAILED, error=message, finished_at=timezone.now()):
        _drop_addition(version)


def _merge(
    parent: DatasetIndex, added: DatasetIndex, source: str
) -> tuple[DatasetIndex, list[dict[str, str]], list[DatasetWarning]]:
    """The parent with the added images: those already in it left out, each new one given a split."""
    known = {s.sha256: s for s in parent.samples}
    new, same, clash = [], [], []
    for s in added.samples:
        there = known.get(s.sha256)
        if there is None:
            new.append(s)
        elif there.label == s.label:
            same.append(f"{s.member} is already in the dataset as {there.member}")
        else:
            clash.append(f"{s.member} ({s.label}) is already in the dataset as {there.member} ({there.label})")
    warnings = list(added.warnings)
    if same:
        warnings.append(DatasetWarning("duplicate", f"{len(same)} image(s) were already in the dataset.", same))
    if clash:
        warnings.append(
            DatasetWarning(
                "label_conflict",
                f"{len(clash)} image(s) are already in the dataset under another class and were left out; "
                "relabel them there if the new label is right.",
                clash,
            )
        )
    if not new:
        raise DatasetError("Every image in this archive is already in the dataset; nothing was added.")
    placed = place_added(parent, new, own_split=any(s.split == "val" for s in added.samples))
    samples = [*parent.samples, *(replace(s, source=source) for s in placed)]
    index = DatasetIndex(
        classes=validate_classes(samples, _ingest_config().min_per_class, parent.layout),
        samples=samples,
        warnings=[],
        layout=parent.layout,
    )
    rows = [{"sha256": s.sha256, "member": s.member, "label": s.label, "split": s.split} for s in placed]
    return index, rows, warnings


# --- reading a version's images --------------------------------------------------------------------


def training_names(version: DatasetVersion) -> dict[str, tuple[str, str]]:
    """How `version_archive` names each image for ml: {name: (stored archive, member in it)}. An image
    keeps its member name unless another archive of the version has the same one (then `k/member`)."""
    index = version_index(version)
    upload = version.dataset.archive
    sources = sorted({s.source or upload for s in index.samples})
    seen = Counter(s.member for s in index.samples)
    names = {}
    for s in index.samples:
        source = s.source or upload
        name = s.member if seen[s.member] == 1 else f"{sources.index(source)}/{s.member}"
        names[name] = (source, s.member)
    return names


@contextmanager
def version_archive(version: DatasetVersion) -> Iterator[tuple[Path, DatasetIndex]]:
    """A local zip holding the version's images and the index that reads it, for ml (which reads one
    archive). A version whose images all sit in the upload uses the upload itself; otherwise the
    images are gathered, stored uncompressed, into one zip, named as `training_names` says. Either
    is kept in this host's archive cache for the next job (apps.common.archive_cache)."""
    index = version_index(version)
    upload = version.dataset.archive
    sources = sorted({s.source or upload for s in index.samples})
    if sources == [upload]:
        with stored_archive(upload) as path:
            yield path, index
        return
    names = {origin: name for name, origin in training_names(version).items()}
    renamed = [replace(s, member=names[(s.source or upload, s.member)], source="") for s in index.samples]

    def gather(to: Path) -> None:
        with ExitStack() as stack, zipfile.ZipFile(to, "w", zipfile.ZIP_STORED) as out:
            readers = {
                name: stack.enter_context(zipfile.ZipFile(stack.enter_context(stored_archive(name))))
                for name in sources
            }
            for s, gathered in zip(index.samples, renamed, strict=True):
                with readers[s.source or upload].open(s.member) as src:
                    with out.open(gathered.member, "w", force_zip64=True) as dst:
                        shutil.copyfileobj(src, dst, 1024 * 1024)

    # The zip's members, in order, by name and content (sha256): all that makes its bytes. A version
    # that only relabels another shares its zip.
    key = content_key("gathered", [(s.member, s.sha256) for s in renamed])
    with cached_archive(key, gather) as path:
        yield path, replace(index, samples=renamed)


def export_name(version: DatasetVersion) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in version.dataset.name).strip("-") or "dataset"
    return f"{safe}-v{version.number}.zip"


class VersionZip:
    """A version's export as it streams: `len()` is its size in bytes before the first is sent (the
    response's Content-Length, so a browser shows the download's progress and a cut-off transfer reads
    as one), iterating gives the bytes, `close()` lets the source archives go (Django's response calls
    it, whether or not the body was sent)."""

    def __init__(self, stream: ZipStream, sources: ExitStack) -> None:
        self._stream, self._sources = stream, sources

    def __len__(self) -> int:
        return len(self._stream)

    def __iter__(self) -> Iterator[bytes]:
        with self._sources:
            yield from self._stream

    def close(self) -> None:
        self._sources.close()


def version_export(version: DatasetVersion) -> VersionZip:
    """The version as a zip in Graft's own upload format (`train/<class>/…`, `val/<class>/…`), stored
    (not compressed: the images are compressed already) and streamed as it is written (zipstream-ng),
    its images read from storage where they lie (ranged reads on S3). Each source archive is opened
    once, before the first byte: its directory gives every member's size, so the zip's is known."""
    from zipstream import ZIP_STORED, ZipStream

    index = version_index(version)
    upload = version.dataset.archive
    stream = ZipStream(compress_type=ZIP_STORED, sized=True)
    taken: set[str] = set()
    sources = ExitStack()
    opened: dict[str, zipfile.ZipFile] = {}

    def member_bytes(zf: zipfile.ZipFile, member: str) -> Iterator[bytes]:
        with zf.open(member) as src:
            while chunk := src.read(256 * 1024):
                yield chunk

    with ExitStack() as on_error:
        on_error.callback(sources.close)  # a source that cannot be opened closes those opened before it
        for s in sorted(index.samples, key=lambda s: (s.split, s.label, s.member)):
            source = s.source or upload
            if source not in opened:
                opened[source] = sources.enter_context(zipfile.ZipFile(sources.enter_context(open_seekable(source))))
            zf = opened[source]
            base = PurePosixPath(s.member).name
            name = f"{s.split or 'train'}/{s.label}/{base}"
            if name in taken:
                name = f"{s.split or 'train'}/{s.label}/{s.sha256[:8]}-{base}"
            taken.add(name)
            stream.add(member_bytes(zf, s.member), name, size=zf.getinfo(s.member).file_size)
        on_error.pop_all()
    return VersionZip(stream, sources)


def image_thumbnail(dataset: Dataset, sha256: str) -> IO[bytes] | None:
    """A stream of the thumbnail of the dataset's image `sha256` (any version's), or None when the
    dataset has no such image. Made once and stored: by the worker at ingestion, or here for images
    of a dataset ingested before every image had one (read from the archive by ranges, not whole)."""
    from apps.common.storage import open_if_stored

    name = image_thumb_name(dataset, sha256)
    stream = open_if_stored(name)
    if stream is not None:
        return stream
    sample = _find_sample(dataset, sha256)
    if sample is None:
        return None
    with open_seekable(sample.source or dataset.archive) as fh, zipfile.ZipFile(fh) as zf:
        data = read_member(zf, sample.member, _ingest_config().limits.max_member_bytes)
    try:
        jpeg = thumbnail_jpeg(data, THUMB_SIDE, max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS)
    except ImageDecodeError:
        return None
    default_storage.save(name, ContentFile(jpeg))
    return ContentFile(jpeg)


def _find_sample(dataset: Dataset, sha256: str) -> Sample | None:
    for version in dataset.versions.exclude(manifest="").order_by("-number"):
        for s in version_index(version).samples:
            if s.sha256 == sha256:
                return s
    return None


def dataset_has_image(dataset: Dataset, sha256: str) -> bool:
    from apps.datasets.review import version_members

    return any(sha256 in version_members(v) for v in dataset.versions.exclude(manifest=""))


def version_delete(*, version: DatasetVersion) -> None:
    """Delete a version (not the upload's, v1: delete the dataset for that). Its images stay in the
    versions that also hold them; the zip of images it added is deleted, and leaves the meter, once
    no other version names them. Refused (409) while it is being made or a job waits for it or reads it."""
    from apps.training.models import Job

    dataset = version.dataset
    with transaction.atomic():
        owner_locked(dataset.owner)
        version = DatasetVersion.objects.select_for_update().get(pk=version.pk)
        if version.number == 1:
            raise UserError(
                "Version 1 is the upload every other version starts from; delete the dataset to delete it.",
                status_code=409,
            )
        if version.status == DatasetVersion.Status.PROCESSING:
            raise UserError(
                f"Version {version.number} is still being made; wait for it, then delete it.", status_code=409
            )
        busy = dataset.versions.filter(status=DatasetVersion.Status.PROCESSING).order_by("number").first()
        if busy is not None:  # it is being made from the newest version, which may be this one
            raise UserError(
                f"Images are being added as version {busy.number}; delete version {version.number} once it is ready.",
                status_code=409,
            )
        if Job.objects.filter(version=version, status__in=[Job.Status.QUEUED, Job.Status.RUNNING]).exists():
            raise UserError(
                f"A training job waits for or reads version {version.number}; cancel it or wait, then delete "
                "the version.",
                status_code=409,
            )
        if version.batches.filter(status__in=["queued", "running"]).exists():
            raise UserError(
                f"A batch prediction waits for or reads version {version.number}; delete it or wait, then delete "
                "the version.",
                status_code=409,
            )
        if version.archive:
            heirs = [
                v.number
                for v in dataset.versions.exclude(pk=version.pk).exclude(manifest="")
                if any(s.source == version.archive for s in version_index(v).samples)
            ]
            if heirs:
                raise UserError(
                    f"Version{'s' if len(heirs) > 1 else ''} {', '.join(map(str, sorted(heirs)))} also "
                    f"hold{'' if len(heirs) > 1 else 's'} the images version {version.number} added; delete "
                    f"{'them' if len(heirs) > 1 else 'it'} first.",
                    status_code=409,
                )
        drop = [name for name in (version.archive, version.manifest, version.findings) if name]
        version.delete()
        head = version_head(dataset)
        if head is not None:
            Dataset.objects.filter(pk=dataset.pk).update(
                manifest=head.manifest,
                num_images=head.num_images,
                classes=head.classes,
                content_hash=head.content_hash,
                updated_at=timezone.now(),
            )
        transaction.on_commit(lambda: _delete_all(drop), robust=True)


def _delete_all(names: list[str]) -> None:
    for name in names:
        delete_quietly(name)
