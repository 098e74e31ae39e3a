"""One fit's context: progress events, the log, timings and peak memory per phase, and its decisions."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ml.checkpoint import Checkpoints
from ml.selection import Decision

# Share of the overall progress bar each phase takes.
PHASE_WEIGHTS = {"decode": 0.05, "features": 0.35, "fit": 0.55, "export": 0.05}


@dataclass(frozen=True)
class Progress:
    phase: str  # decode | features | fit | export
    done: int
    total: int
    fraction: float  # overall, 0..1
    row: dict[str, Any] | None = None  # a history row, when this event completes one
    message: str | None = None  # a log line, as it is written (the event carries nothing else new)


ProgressFn = Callable[[Progress], None]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


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
        self._last = 0.0
        self._current: tuple[str, int, int] = ("decode", 0, 1)
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

    def report(self, phase: str, done: float, total: float, row: dict[str, Any] | None = None) -> None:
        if self._progress is None:
            return
        order = list(PHASE_WEIGHTS)
        before = sum(PHASE_WEIGHTS[p] for p in order[: order.index(phase)])
        frac = before + PHASE_WEIGHTS[phase] * (min(done, total) / total if total else 1.0)
        self._last = max(self._last, min(frac, 1.0))
        self._current = (phase, round(done), round(total))
        row = None if self.replaying else row
        self._progress(Progress(phase, round(done), round(total), round(self._last, 4), row))

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

    def say(self, line: str) -> None:
        """A log line: kept, and sent with the progress events as it is written."""
        self.log.append(line)
        if self._progress is not None:
            phase, done, total = self._current
            self._progress(Progress(phase, done, total, round(self._last, 4), message=line))

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
