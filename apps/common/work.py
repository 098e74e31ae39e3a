"""Background work, one design for every kind: ingestion, training, batch prediction.

- An item (a row: a dataset being ingested, a job, a batch) is **claimed** with a conditional UPDATE
  that moves it to its running status and counts an attempt, so a duplicate delivery does nothing.
- Every later write of that attempt names it (`attempt_rows`): once a worker that went silent has
  been replaced, its writes match nothing, so it changes nothing and deletes nothing.
- While it works, a **heartbeat** thread stamps `heartbeat_at`; beat's `work_recover_stale` re-queues
  items whose heartbeat went stale (a new message with them) and fails, with a sentence, those that
  used up GRAFT_JOB_MAX_ATTEMPTS.
- On the `gpu` queue a message is a ticket, not an order (`claim_fairest`): the worker takes the
  fairest waiting item of any kind there, so one user's backlog of jobs and batches cannot starve
  everyone else.

A new kind of work declares a `Kind` (its model inherits `WorkFields`) and registers it; nothing
else here changes.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection, models, transaction
from django.db.models import Count, F, Max, Min, Q, QuerySet
from django.utils import timezone

log = logging.getLogger(__name__)


class WorkFields(models.Model):
    """What every kind of background work records about its attempts."""

    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)  # the Celery worker (node name) of the last attempt
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)  # null while waiting for a worker
    # When it last began to wait for a worker (made, re-queued, handed back), or beat last sent its
    # message again: a message lost on the way (the broker down at that moment, or restarted) is
    # sent again after GRAFT_RESEND_SECONDS (work_resend_waiting).
    queued_at = models.DateTimeField(default=timezone.now, null=True, blank=True)

    class Meta:
        abstract = True


_Item = TypeVar("_Item", bound=WorkFields)
_Row = TypeVar("_Row", bound=models.Model)


@dataclass(frozen=True)
class Kind(Generic[_Item]):
    """A kind of background work and the words its model uses for each state."""

    name: str  # "ingestion", "training", "batch prediction"
    model: type[_Item]
    queued: str  # waiting for a worker (the same as `running` where the model has one word for both)
    running: str
    failed: str
    lost: str  # why it failed after too many lost workers; {attempts} is filled in
    enqueue: Callable[..., None]  # (pk, countdown=0): sends the message that makes a worker take it
    on_lost: Callable[[_Item], None] | None = None  # cleanup once it failed that way (its files)
    requeued: dict[str, Any] = field(default_factory=dict)  # extra fields set when re-queued

    def rows(self) -> QuerySet[_Item]:
        return self.model._default_manager.all()  # `objects`: no model here declares a manager of its own

    def waiting(self) -> Q:
        return Q(status=self.queued, heartbeat_at__isnull=True)

    def stale(self, now: datetime | None = None) -> Q:
        before = (now or timezone.now()) - timedelta(seconds=settings.GRAFT_JOB_STALE_SECONDS)
        return Q(status=self.running, heartbeat_at__lt=before)

    def active(self) -> Q:
        return Q(status__in={self.queued, self.running})


KINDS: dict[str, Kind[Any]] = {}  # every kind, whatever its model


def register(kind: Kind[_Item]) -> Kind[_Item]:
    KINDS[kind.name] = kind
    return kind


def attempt_rows(kind: Kind[_Item], item: _Item) -> QuerySet[_Item]:
    """This attempt's row while it runs: what every write of the attempt goes through."""
    return kind.rows().filter(pk=item.pk, attempts=item.attempts, status=kind.running)


def claim(kind: Kind[_Item], pk: int, *, worker: str = "", waiting: bool = True) -> _Item | None:
    """Take item `pk` for this worker: waiting (when `waiting`) or left by a lost worker.
    Returns the claimed row, or None (a duplicate delivery, a live attempt elsewhere, or gone)."""
    now = timezone.now()
    _fail_exhausted(kind, kind.rows().filter(pk=pk))
    which = kind.stale(now) | kind.waiting() if waiting else kind.stale(now)
    under_cap = Q(attempts__lt=settings.GRAFT_JOB_MAX_ATTEMPTS)
    claimed = (
        kind.rows()
        .filter(which, under_cap, pk=pk)
        .update(
            status=kind.running,
            attempts=F("attempts") + 1,
            started_at=now,
            heartbeat_at=now,
            finished_at=None,
            worker=worker[:200],
            error="",
        )
    )
    if not claimed:
        return None
    item = kind.rows().get(pk=pk)
    if item.attempts > 1:
        log.warning("%s %s: attempt %s, after a lost worker", kind.name, pk, item.attempts)
    return item


def claim_fairest(kinds: Iterable[Kind[Any]], *, worker: str = "") -> tuple[Kind[Any], Any] | None:
    """Claim the fairest waiting item of `kinds`: its owner has the fewest items of these kinds
    running; among equals, the owner who least recently had one started (round robin between
    users); then the oldest item. Another worker may take the same pick first: then pick again."""
    kinds = list(kinds)
    while (pick := _fairest(kinds)) is not None:
        kind, pk = pick
        if (item := claim(kind, pk, worker=worker)) is not None:
            return kind, item
    return None


def _fairest(kinds: list[Kind[Any]]) -> tuple[Kind[Any], int] | None:
    cap = Q(attempts__lt=settings.GRAFT_JOB_MAX_ATTEMPTS)
    oldest: dict[int, tuple[datetime, int, Kind[Any]]] = {}  # owner -> their oldest waiting item
    for kind in kinds:
        waiting = kind.rows().filter(kind.waiting(), cap).order_by()
        for owner, created in waiting.values_list("owner").annotate(first=Min("created_at")):
            pk = waiting.filter(owner=owner, created_at=created).order_by("pk").values_list("pk", flat=True).first()
            if pk is not None and (owner not in oldest or (created, pk) < oldest[owner][:2]):
                oldest[owner] = (created, pk, kind)
    if not oldest:
        return None
    running: dict[int, int] = {}
    last_start: dict[int, datetime] = {}
    for kind in kinds:
        mine = kind.rows().filter(owner__in=list(oldest)).order_by()
        for owner, n in mine.filter(status=kind.running).values_list("owner").annotate(n=Count("pk")):
            running[owner] = running.get(owner, 0) + n
        for owner, at in mine.filter(started_at__isnull=False).values_list("owner").annotate(at=Max("started_at")):
            last_start[owner] = max(at, last_start.get(owner, at))
    never = datetime.min.replace(tzinfo=timezone.get_current_timezone())

    def order(owner: int) -> tuple[int, datetime, datetime, int]:
        return (running.get(owner, 0), last_start.get(owner, never), oldest[owner][0], oldest[owner][1])

    owner = min(oldest, key=order)
    return oldest[owner][2], oldest[owner][1]


def _fail_exhausted(kind: Kind[_Item], items: QuerySet[_Item]) -> list[int]:
    """Fail the stale or re-queued items among `items` that used up their attempts."""
    failed = []
    now = timezone.now()
    lost = items.filter(kind.stale(now) | kind.waiting(), attempts__gte=settings.GRAFT_JOB_MAX_ATTEMPTS)
    for item in lost:
        if (
            kind.rows()
            .filter(pk=item.pk, attempts=item.attempts, status__in={kind.queued, kind.running})
            .update(status=kind.failed, finished_at=now, error=kind.lost.format(attempts=item.attempts))
        ):
            log.warning("%s %s failed after %s lost workers", kind.name, item.pk, item.attempts)
            failed.append(item.pk)
            if kind.on_lost is not None:
                kind.on_lost(item)
    return failed


def work_recover_stale() -> dict[str, list[int]]:
    """Re-queue items of every kind whose worker stopped heart-beating, or fail them when that
    happened too often. Returns the ids re-queued, by kind (beat runs it every stale/2 seconds)."""
    recovered: dict[str, list[int]] = {}
    for kind in KINDS.values():
        stale = kind.rows().filter(kind.stale())
        _fail_exhausted(kind, stale)
        for item in stale.filter(attempts__lt=settings.GRAFT_JOB_MAX_ATTEMPTS):
            if (
                kind.rows()
                .filter(pk=item.pk, status=kind.running, heartbeat_at=item.heartbeat_at)
                .update(status=kind.queued, heartbeat_at=None, queued_at=timezone.now(), **kind.requeued)
            ):
                recovered.setdefault(kind.name, []).append(item.pk)
                transaction.on_commit(functools.partial(kind.enqueue, item.pk), robust=True)
    return recovered


def resend(waiting: QuerySet[Any], field: str, enqueue: Callable[[int], None]) -> list[int]:
    """Send again the message of the `waiting` rows whose `field` (when they began to wait, or were
    last sent again) is older than GRAFT_RESEND_SECONDS or unset, and stamp it now: each at most
    once a period. Returns their ids."""
    now = timezone.now()
    before = now - timedelta(seconds=settings.GRAFT_RESEND_SECONDS)
    late = waiting.filter(Q(**{f"{field}__lt": before}) | Q(**{f"{field}__isnull": True}))
    sent = []
    for pk, at in late.values_list("pk", field):
        if waiting.filter(pk=pk, **{field: at}).update(**{field: now}):
            sent.append(pk)
            transaction.on_commit(functools.partial(enqueue, pk), robust=True)
    return sent


def work_resend_waiting() -> dict[str, list[int]]:
    """Send again the message of items that have waited for a worker longer than
    GRAFT_RESEND_SECONDS: it may have been lost (the broker down when it was sent, or restarted
    without it). A duplicate is harmless: an item is claimed once, and a GPU ticket finds nothing
    to run. Returns the ids, by kind (beat)."""
    sent: dict[str, list[int]] = {}
    for kind in KINDS.values():
        if ids := resend(kind.rows().filter(kind.waiting()), "queued_at", kind.enqueue):
            sent[kind.name] = ids
    return sent


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OperationalError, InterfaceError]
    try:  # object storage unreachable for a moment (boto3, under django-storages)
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

        # S3UploadFailedError: an upload refused with a server error (SeaweedFS: no writable volume yet).
        errors += [EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, S3UploadFailedError]
    except ImportError:  # pragma: no cover - boto3 comes with django-storages[s3]
        pass
    return tuple(errors)


# The database or object storage went away for a moment: the work is handed back, not failed.
TRANSIENT = _transient_errors()


def hand_back(kind: Kind[_Item], rows: QuerySet[_Item]) -> bool:
    """After a transient error: the attempt's item waits again, and a new message takes it after
    a back-off that doubles with each attempt (GRAFT_JOB_STALE_SECONDS, then twice that, ...: with
    the defaults an outage of about 6 minutes is ridden out; every try counts toward the attempt
    cap, so one that outlasts them all ends in a failure with a sentence). If even this write
    fails, beat re-queues the item once its heartbeat goes stale. Returns whether it was handed back."""
    connection.close()  # a connection the database dropped is unusable; the next query opens one
    try:
        found = list(rows.values_list("pk", "attempts"))
        if found and rows.update(status=kind.queued, heartbeat_at=None, queued_at=timezone.now()):
            pk, attempts = found[0]
            kind.enqueue(pk, countdown=min(3600, settings.GRAFT_JOB_STALE_SECONDS * 2 ** max(0, attempts - 1)))
            return True
    except Exception:  # noqa: BLE001 - still unreachable: beat finds the stale heartbeat
        log.exception("could not hand %s back; beat will re-queue it", kind.name)
    return False


class Heartbeat:
    """A background thread proving the worker is alive while it works, through `rows` (the
    attempt's own row). When the row no longer matches (cancelled, deleted, or taken over by
    another worker) it sets `lost`, which the work checks between steps."""

    def __init__(self, rows: QuerySet[_Row], label: str, field: str = "heartbeat_at") -> None:
        # Any model's rows with a time field to beat (work items' heartbeat_at, a version's findings_at,
        # a model's int8_at); generic, so that `Heartbeat(attempt_rows(KIND, item), ...)` infers it.
        self.rows: QuerySet[Any] = rows
        self.label, self.field = label, field
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{label}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(settings.GRAFT_HEARTBEAT_SECONDS):
                try:
                    close_old_connections()
                    if not self.rows.update(**{self.field: timezone.now()}):
                        self.lost.set()
                except Exception:  # noqa: BLE001 - one missed beat (a database blip); the next may land
                    log.exception("heartbeat for %s failed", self.label)
                    connection.close()
        finally:
            connection.close()
