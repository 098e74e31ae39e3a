"""One fit's context: progress events, the log, timings and peak memory per phase, and its decisions.

Progress is work done over work planned. The fit plans its steps up front (reading images, loading
the network, features at each input size, the probes, the fine-tune, scoring, export), each as a
count of items (images, image-fits, training passes) with a cost per item in forward passes of the
frozen backbone at its native input. Seconds per forward pass are measured as the steps run, per
kind of work, so the plan's work is in estimated seconds and the ETA is what is left of it.

When a decision adds work (a fine-tune chosen, a retry, a search, a range test) the plan grows and
the event carries a `note` saying why; the bar keeps its place and what is left of it is shared out
over the work left. When work is dropped (early stopping), the bar moves on to where the plan says.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ml.checkpoint import Checkpoints
from ml.selection import Decision

# Seconds per forward pass (one image through the frozen backbone at its native input) until the
# fit has measured its own; events carry no ETA before that.
PRIOR_SECONDS_PER_PASS = 0.02
# The kind of work that measures the backbone's speed (frozen forward passes): kinds not measured yet
# are estimated from it.
FEATURES = "features"
# Features read from a store instead of extracted (ml.measure): no forward passes, nothing to measure.
STORED = "stored"
# A kind of work's own rate is used once this share of the step running it is done (its first
# items carry set-up time: thread pools filling, the first batch's allocations).
CALIBRATE_AFTER = 0.1
# An ETA that rises more than this above its lowest in a step says why, in a note.
NOTEWORTHY_RISE = 0.15


@dataclass(frozen=True)
class Progress:
    phase: str  # the step running (a short key: decode, load, features, probe, checks, lr_test, finetune, ...)
    done: int  # the step's items done (images, image-fits, training passes)
    total: int  # the step's items planned
    fraction: float  # the whole fit, 0..1, never decreasing
    row: dict[str, Any] | None = None  # a history row, when this event completes one
    message: str | None = None  # a log line, as it is written (the event carries nothing else new)
    label: str = ""  # the step in words a user understands ("Fine-tuning · epoch 3 of 12")
    eta_s: float | None = None  # seconds of planned work left at the measured rates (None: not measured yet)
    note: str | None = None  # why the plan just grew (or what a measurement changed), on the event that did


ProgressFn = Callable[[Progress], None]


@dataclass
class _Step:
    key: str
    label: str
    items: float  # planned
    passes: float  # forward-pass equivalents per item (1.0: one image at the native input)
    fixed: float  # seconds the step takes whatever its items (loading weights, exporting)
    kind: str  # steps of one kind share a measured rate (the LR range test calibrates the fine-tune)
    done: float = 0.0

    def seconds(self, rate: float, items: float) -> float:
        """Estimated seconds of `items` of this step at `rate` seconds per pass."""
        if self.items <= 0:
            return 0.0
        return items * (self.fixed / self.items + self.passes * rate)


class WorkPlan:
    """The fit's steps and how fast each kind of work goes; the fraction and the ETA come from here."""

    def __init__(self) -> None:
        self.steps: dict[str, _Step] = {}
        self.measured: dict[str, list[float]] = {}  # kind -> [seconds, passes]
        self.calibrated: set[str] = set()
        self.fraction = 0.0
        self.work_done = 0.0  # estimated seconds of the work done, as each item was estimated when done
        self._t = time.monotonic()

    def rate(self, kind: str) -> float:
        """Seconds per pass: the kind's own once measured, else the backbone's (frozen features), else the prior."""
        for k in (kind, FEATURES):
            if k in self.calibrated:
                seconds, passes = self.measured[k]
                return seconds / passes
        return PRIOR_SECONDS_PER_PASS

    def left(self) -> float:
        """Estimated seconds of the planned work not done yet."""
        return sum(s.seconds(self.rate(s.kind), max(0.0, s.items - s.done)) for s in self.steps.values())

    def eta(self) -> float | None:
        """Seconds left, once the backbone's speed is measured (before, the estimate is a guess); where
        no step extracts features (they were stored), once any kind of work is measured."""
        extracts = any(s.kind == FEATURES and s.items > 0 for s in self.steps.values())
        measured = FEATURES in self.calibrated or (not extracts and bool(self.calibrated))
        return round(self.left(), 1) if measured else None

    def set(self, key: str, label: str, items: float, passes: float, fixed: float, kind: str) -> None:
        step = self.steps.get(key)
        if step is None:
            self.steps[key] = _Step(key, label, max(0.0, items), passes, fixed, kind)
        else:
            step.label, step.items, step.passes, step.fixed, step.kind = (
                label,
                max(step.done, items),
                passes,
                fixed,
                kind,
            )
        self._catch_up()

    def finish(self, key: str) -> None:
        """The step is over: work planned for it and not done is dropped."""
        step = self.steps.get(key)
        if step is not None:
            step.items = step.done
            self._catch_up()

    def advance(self, key: str, done: float) -> None:
        step = self.steps[key]
        new = min(max(done, step.done), step.items)
        items = new - step.done
        if items <= 0:
            return
        now = time.monotonic()
        elapsed, self._t = now - self._t, now
        kind = self.measured.setdefault(step.kind, [0.0, 0.0])
        # A step's first items carry its set-up (threads starting, the first batch's allocations):
        # its speed is measured from the items after them.
        if step.passes > 0 and step.done > 0:
            kind[0] += elapsed
            kind[1] += items * step.passes
        work = step.seconds(self.rate(step.kind), items)
        step.done = new
        if step.kind not in self.calibrated and kind[1] > 0 and new >= CALIBRATE_AFTER * step.items:
            self.calibrated.add(step.kind)
        self.work_done += work
        left = self.left()
        # The rest of the bar is shared out over the work left: the plan may have grown since the last
        # event, and the bar does not go back; for an unchanged plan this is work done / work planned.
        self.fraction += (1 - self.fraction) * (work / (work + left) if work + left > 0 else 1.0)
        self._catch_up()

    def idle(self) -> None:
        """Time until now was not work of any planned step (it is not charged to the next)."""
        self._t = time.monotonic()

    def _catch_up(self) -> None:
        """Where dropped work puts the bar: forward to work done / work planned, never back."""
        left = self.left()
        total = self.work_done + left
        if total > 0:
            self.fraction = max(self.fraction, self.work_done / total)
        self.fraction = min(self.fraction, 1.0)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def about(seconds: float) -> str:
    """'about 40 s', 'about 3 min': for notes."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


class Run:
    """Carries what every step of a fit reports: progress (monotonic), log lines, timings, decisions."""

    def __init__(self, progress: ProgressFn | None = None) -> None:
        self._progress = progress
        self._checkpoints: Checkpoints | None = None
        self._key = ""
        # The checkpoint of an earlier attempt of this fit; while `replaying`, the steps before
        # the point it resumes from run again (deterministic under the seed) without sending
        # their history rows, which the earlier attempt already sent.
        self.resumed: dict[str, Any] | None = None
        self.replaying = False
        self.work = WorkPlan()
        self._current = ""  # the step last reported
        # The lowest ETA sent in step `_low_key` since its last note: a rise of more than
        # NOTEWORTHY_RISE above it goes out with a note saying so.
        self._low: float | None = None
        self._low_key = ""
        self._first = False  # the step's kind of work was measured for the first time by the last advance
        self.log: list[str] = []
        self.timings: dict[str, float] = {}
        self.peak_rss_mib: dict[str, float] = {}
        self.decisions: list[Decision] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase and record the process's peak memory at its end."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
            self.peak_rss_mib[name] = peak_rss_mib()

    # --- progress ---------------------------------------------------------------------------------

    def plan(
        self,
        key: str,
        label: str,
        items: float,
        *,
        passes: float = 1.0,
        fixed: float = 0.0,
        kind: str | None = None,
        note: str | None = None,
    ) -> None:
        """Plan (or plan again) a step: `items` of `passes` forward-pass equivalents each, plus `fixed`
        seconds. A `note` says why the plan changed; it goes out at once, on an event of its own."""
        self.work.set(key, label, items, passes, fixed, kind or key)
        if note is not None:
            self.note(note)

    def note(self, text: str) -> None:
        """Why the plan changed, on an event of its own."""
        self._send(self._current, note=text)

    def advance(self, key: str, done: float, *, label: str | None = None, row: dict[str, Any] | None = None) -> None:
        """`done` items of step `key` are done (a running count); `label` renames the step as it goes."""
        if key not in self.work.steps:  # a step no plan foresaw: as planned, from here
            self.plan(key, label or key, done if math.isfinite(done) else 1.0)
        step = self.work.steps[key]
        if label is not None:
            step.label = label
        self._first = step.kind not in self.work.calibrated
        self.work.advance(key, done)
        self._current = key
        self._send(key, row=None if self.replaying else row)

    def finish(self, key: str) -> None:
        """Step `key` is over; what was planned for it and not done is dropped (the bar moves on)."""
        self.work.finish(key)

    def idle(self) -> None:
        """Time until now belongs to no planned step (it does not slow the next one's measured rate)."""
        self.work.idle()

    def report(self, phase: str, done: float, total: float, row: dict[str, Any] | None = None) -> None:
        """`done` of `total` items of step `phase` (planned on first use, at one pass per item)."""
        step = self.work.steps.get(phase)
        if step is None or step.items != total:
            self.plan(phase, step.label if step else phase, total)
        self.advance(phase, done, row=row)

    def _send(
        self, key: str, *, row: dict[str, Any] | None = None, message: str | None = None, note: str | None = None
    ) -> None:
        if self._progress is None:
            return
        step = self.work.steps.get(key)
        done, total, label = (round(step.done), round(step.items), step.label) if step else (0, 0, "")
        eta = self.work.eta()
        if key != self._low_key:
            self._low, self._low_key = None, key
        if note is None and eta is not None and self._low is not None and eta > self._low * (1 + NOTEWORTHY_RISE):
            how = "the earlier steps suggested" if self._first else "measured so far (the machine may be busy)"
            note = f"{label.split(' · ')[0] or 'The work'} goes slower than {how}: {about(eta)} left"
        if note is not None:
            self._low = None
        if eta is not None:
            self._low = eta if self._low is None else min(self._low, eta)
        self._progress(Progress(key, done, total, round(self.work.fraction, 4), row, message, label, eta, note))

    # --- checkpoints ----------------------------------------------------------------------------

    def resume_from(self, checkpoints: Checkpoints | None, key: str) -> None:
        """Use `checkpoints` for this fit, whose inputs `key` names."""
        self._checkpoints, self._key = checkpoints, key
        saved = checkpoints.load() if checkpoints is not None else None
        if saved is None:
            return
        if saved.get("key") != key:
            self.say("a checkpoint of another dataset or configuration was ignored")
            self.discard_checkpoint(everything=True)
            return
        self.resumed, self.replaying = saved, True
        self.say(
            f"resuming from a checkpoint an earlier attempt wrote after epoch {saved['state']['epoch']} "
            "of its fine-tune: the measurements before the fine-tune run again (the same under the seed), "
            "the epochs already trained do not"
        )

    def end_replay(self) -> None:
        self.replaying = False

    def discard_checkpoint(self, everything: bool) -> None:
        """The fit will not go on from the checkpoint it found: tell its keeper (whose optional
        `discard` forgets what the earlier attempt reported that this one will report again:
        everything, or only its fine-tune when the measurements before it were replayed)."""
        discard = getattr(self._checkpoints, "discard", None)
        if discard is not None:
            discard(everything)

    def checkpoint(self, record: dict[str, Any]) -> None:
        if self._checkpoints is not None:
            self._checkpoints.save({**record, "key": self._key})

    # --- the log and decisions ------------------------------------------------------------------

    def say(self, line: str) -> None:
        """A log line: kept, and sent with the progress events as it is written."""
        self.log.append(line)
        self._send(self._current, message=line)

    def decide(self, decision: Decision) -> Decision:
        self.decisions.append(decision)
        scores = ", ".join(f"{c.name} {'n/a' if c.score is None else f'{c.score:.4f}'}" for c in decision.candidates)
        self.say(f"{decision.what}: {decision.chosen} ({decision.metric}: {scores}). {decision.reason}")
        return decision


class timer:  # noqa: N801 (used as a context manager, like a function)
    """`with timer() as t: ...` then `t.seconds`."""

    def __enter__(self) -> timer:
        self._t = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t
