"""Progress from measured units of work, on the event streams of real fits (a linear probe, and a
partial fine-tune with a short time budget) on a tiny synthetic archive.

The job page shows the event's `fraction` as the bar and its `eta_s` as "about ... left". Held here:
the fraction never goes back; within a phase the ETA never rises more than 20% above its lowest
point unless an event's `note` says why; the fraction never stands still for more than a tenth of
the run while events arrive; every phase has a name in words.
"""

from __future__ import annotations

import io
import random
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from ml.fit import FitConfig, fit
from ml.run import Progress

ETA_RISE = 0.20  # at most, within a phase, unless a note says why
STALL = 0.10  # of the run's time, at most, while events arrive


@dataclass(frozen=True)
class Event:
    t: float  # seconds since the fit started
    ev: Progress


def _archive(path: Path, per_class: int = 20, size: int = 32) -> Path:
    """Three classes of shapes on noise; small images, so the cheap 64-px input is a candidate."""
    rng = random.Random(0)
    with zipfile.ZipFile(path, "w") as zf:
        for c, color in enumerate([(200, 40, 40), (40, 160, 60), (50, 70, 200)]):
            for i in range(per_class):
                img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
                x, y = rng.randrange(size // 2), rng.randrange(size // 2)
                box = [x, y, x + size // 3, y + size // 3]
                draw = ImageDraw.Draw(img)
                (draw.rectangle if c == 1 else draw.ellipse)(box, fill=color)
                buf = io.BytesIO()
                img.save(buf, "PNG")
                zf.writestr(f"c{c}/img_{i}.png", buf.getvalue())
    return path


def _record(tmp: Path, config: FitConfig) -> list[Event]:
    events: list[Event] = []
    t0 = time.monotonic()
    fit(
        _archive(tmp / "data.zip"),
        tmp / "out",
        config,
        progress=lambda ev: events.append(Event(time.monotonic() - t0, ev)),
    )
    return events


@pytest.fixture(scope="module")
def linear(tmp_path_factory) -> list[Event]:
    return _record(tmp_path_factory.mktemp("linear"), FitConfig(strategy="linear", batch_size=16))


@pytest.fixture(scope="module")
def finetune(tmp_path_factory) -> list[Event]:
    return _record(
        tmp_path_factory.mktemp("partial"), FitConfig(strategy="partial", batch_size=16, max_epochs=3, budget=8)
    )


def worst_eta_rise(events: list[Event]) -> tuple[float, Event | None]:
    """The largest rise of the ETA above its lowest point so far in the same phase, since the last note."""
    worst: tuple[float, Event | None] = (0.0, None)
    phase, low = None, None
    for e in events:
        if e.ev.phase != phase:
            phase, low = e.ev.phase, None
        if e.ev.note:
            low = None
        if e.ev.eta_s is None or e.ev.fraction <= 0.02:  # the page shows no ETA before 2%
            continue
        if low:
            worst = max(worst, (e.ev.eta_s / low - 1, e), key=lambda w: w[0])
        low = e.ev.eta_s if low is None else min(low, e.ev.eta_s)
    return worst


def longest_stall(events: list[Event]) -> tuple[float, Event | None]:
    """The longest time the fraction stood still while events kept arriving, as a share of the run."""
    run = events[-1].t
    worst: tuple[float, Event | None] = (0.0, None)
    since, last = 0.0, -1.0
    for e in events:
        if e.ev.fraction > last:
            since, last = e.t, e.ev.fraction
        else:
            worst = max(worst, ((e.t - since) / run, e), key=lambda w: w[0])
    return worst


@pytest.mark.parametrize("stream", ["linear", "finetune"])
def test_the_bar_moves_forward_only_and_ends_full(stream, request):
    events = request.getfixturevalue(stream)
    fractions = [e.ev.fraction for e in events]
    assert all(b >= a for a, b in zip(fractions, fractions[1:], strict=False))
    assert fractions[-1] == 1.0 and 0 <= fractions[0] < 0.2
    assert all(e.ev.label for e in events if e.ev.message is None), "every step is named in words"


@pytest.mark.parametrize("stream", ["linear", "finetune"])
def test_the_eta_does_not_climb_without_a_reason(stream, request):
    events = request.getfixturevalue(stream)
    rise, at = worst_eta_rise(events)
    notes = [e.ev.note for e in events if e.ev.note]
    print(f"\n{stream}: {events[-1].t:.0f} s, worst ETA rise within a phase {rise:.1%}; notes: {notes}")
    assert rise <= ETA_RISE, (rise, at)
    assert any(e.ev.eta_s is not None for e in events)


@pytest.mark.parametrize("stream", ["linear", "finetune"])
def test_the_bar_never_stands_still_while_events_arrive(stream, request):
    events = request.getfixturevalue(stream)
    stall, at = longest_stall(events)
    print(f"\n{stream}: longest stall while events arrive {stall:.1%} of the run")
    assert stall <= STALL, (stall, at)


def test_the_finetune_is_reported_within_its_epochs(finetune):
    """Epochs, range-test steps and the overfit check report as they go, not once at their end."""
    by_phase: dict[str, int] = {}
    for e in finetune:
        if e.ev.message is None:
            by_phase[e.ev.phase] = by_phase.get(e.ev.phase, 0) + 1
    assert by_phase.get("lr_test", 0) >= 2 and by_phase.get("finetune", 0) >= 6, by_phase
    labels = {e.ev.label.split(" · ")[0] for e in finetune if e.ev.message is None}
    assert {"Extracting features at 64 px", "Finding the learning rate", "Exporting the model"} <= labels, labels
    assert any(label.startswith("Fine-tuning") for label in labels), labels
    assert any("epoch 1 of" in e.ev.label for e in finetune)


def test_a_plan_that_grows_says_why():
    """Unit: a step added mid-run keeps the bar where it is and sends a note."""
    from ml.run import Run

    got: list[Progress] = []
    run = Run(got.append)
    run.plan("features@240", "Extracting features at 240 px", 100, kind="features")
    run.plan("export", "Exporting the model", 1, passes=0.0, fixed=1.0)
    for done in (20, 40, 60):
        time.sleep(0.01)
        run.advance("features@240", done)
    before = got[-1].fraction
    run.plan("finetune", "Fine-tuning", 5000, kind="train", note="a partial fine-tune was chosen: about 12 more epochs")
    assert got[-1].note and "12 more epochs" in got[-1].note and got[-1].fraction == before
    run.finish("finetune")  # early stopping: the bar moves on
    time.sleep(0.01)
    run.advance("features@240", 100)
    assert got[-1].fraction > before
