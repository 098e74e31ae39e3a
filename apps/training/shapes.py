"""The JSON a job carries, declared once as types: the API schema is made from them
(apps.training.api), and tests check a real job's output against that schema.

What the engine reports comes from ml.report (one `to_json` each); what the app adds while a job
runs (its log, where it stands) is declared here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.common.dataclass_schema import openapi_schema
from ml.preprocessing import Preprocessing
from ml.report import EpochRow, Hyperparameters, ProbeRow, RangeTest, SanityCheck
from ml.selection import Decision


@dataclass(frozen=True)
class ProgressNote:
    """Why the plan of work grew (the job page shows it beside the ETA)."""

    phase: str
    text: str
    fraction: float


@dataclass(frozen=True)
class JobProgress:
    """Where a running job stands: the step, in words, its items, and the engine's ETA."""

    step: str
    label: str
    done: float
    total: float
    eta_s: float | None = None  # seconds of planned work left at the measured rates
    notes: list[ProgressNote] = field(default_factory=list)


@dataclass(frozen=True)
class JobReport:
    """A job's report: while it runs, the log and where it stands; once it succeeded, how the model
    was made (ml.report.FitResult's parts)."""

    log: list[str] = field(default_factory=list)
    progress: JobProgress | None = None
    sanity: list[SanityCheck] | None = None
    decisions: list[Decision] | None = None  # every choice the engine measured
    hyperparameters: Hyperparameters | None = None
    lr_range: RangeTest | None = None
    preprocessing: Preprocessing | None = None
    device: str | None = None
    peak_rss_mib: dict[str, float] | None = None


HISTORY_SCHEMA = openapi_schema(list[ProbeRow | EpochRow])  # the probe's cross-validation, then each epoch


def typed_json(tp: object, help_text: str) -> serializers.JSONField:
    """A read-only JSON field whose value has the shape of `tp` (declared in the API schema); an empty
    object (a job that has not got there yet) reads as null."""

    @extend_schema_field({**openapi_schema(tp), "nullable": True})
    class Typed(serializers.JSONField):
        def to_representation(self, value: Any) -> Any:  # the stored JSON as it is, or null
            return value if value != {} else None

    return Typed(read_only=True, help_text=help_text)


__all__ = ["HISTORY_SCHEMA", "JobProgress", "JobReport", "ProgressNote", "typed_json"]
