from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_field, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.common.pagination import paginated, paginated_response
from apps.common.requests import AuthenticatedRequest
from apps.datasets.selectors import dataset_get
from apps.training.models import Job
from apps.training.selectors import job_get, job_list
from apps.training.services import job_cancel, job_create, job_delete, job_retrain
from apps.training.shapes import HISTORY_SCHEMA, JobReport, typed_json
from ml.config import Option, options_for
from ml.report import Metrics
from ml.strategy import Plan


class JobOutputSerializer(serializers.ModelSerializer[Job]):
    strategy = typed_json(Plan, "what the engine decided from the data: the plan, its matrix cell and why")
    metrics = typed_json(Metrics, "the model on the validation split; null until the job succeeds")
    report = typed_json(JobReport, "the log and progress while it runs; how the model was made once it succeeded")
    model = serializers.SerializerMethodField()
    version = serializers.IntegerField(source="version.number", allow_null=True, default=None, read_only=True)
    stale = serializers.BooleanField(source="is_stale")
    history = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = [
            "id",
            "dataset",
            "version",
            "status",
            "config",
            "strategy",
            "phase",
            "progress",
            "metrics",
            "timings",
            "report",
            "history",
            "model",
            "error",
            "stale",
            "attempts",
            "worker",
            "created_at",
            "started_at",
            "finished_at",
        ]

    def get_model(self, job: Job) -> int | None:
        return getattr(getattr(job, "trained_model", None), "pk", None)

    @extend_schema_field(HISTORY_SCHEMA)
    def get_history(self, job: Job) -> list[dict[str, Any]]:
        return [{"phase": row.phase, **row.data} for row in job.history.all()]


class JobListSerializer(serializers.ModelSerializer[Job]):
    """A job in a list: state and outcome (the detail has the report, history and metrics)."""

    model = serializers.SerializerMethodField()
    strategy = serializers.SerializerMethodField()
    val_accuracy = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = [
            "id", "dataset", "status", "phase", "progress", "strategy", "val_accuracy", "model", "error",
            "attempts", "created_at", "finished_at",
        ]  # fmt: skip

    def get_model(self, job: Job) -> int | None:
        return getattr(getattr(job, "trained_model", None), "pk", None)

    def get_strategy(self, job: Job) -> str | None:
        name: str | None = job.strategy.get("name")
        return name

    def get_val_accuracy(self, job: Job) -> float | None:
        accuracy: float | None = job.metrics.get("val_accuracy")
        return accuracy


def _option_field(option: Option[Any]) -> serializers.Field[Any, Any, Any, Any]:
    """A user option of ml.config as an input field: its type, choices, default and help with the bounds.
    Types and choices only: the bounds are checked once, by FitConfig.validate (via job_create), so an
    out-of-range value gets the engine's words, as from the web form and the CLI."""
    about: dict[str, Any] = {"help_text": option.describe()}
    if option.optional:
        about["required"] = False
    else:  # explicit: a form-encoded request that leaves a checkbox out must not turn it off
        about["default"] = option.default_value()
    if option.choices is not None:
        return serializers.ChoiceField(choices=option.choices(), **about)
    if option.kind is bool:
        return serializers.BooleanField(**about)
    if option.kind is int:
        return serializers.IntegerField(**about)
    if option.kind is float:
        return serializers.FloatField(**about)
    return serializers.CharField(**about)


class JobListCreateApi(APIView):
    @extend_schema_serializer(component_name="JobInput")
    class InputSerializer(serializers.Serializer[None]):
        dataset = serializers.IntegerField()
        version = serializers.IntegerField(
            required=False, help_text="the dataset version to train on (its number); the newest ready one if left out"
        )

        def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
            """The two above, and a field for each fit option a user may set (ml.config)."""
            return {**super().get_fields(), **{o.name: _option_field(o) for o in options_for("user")}}

    @extend_schema(operation_id="jobs_list", responses=paginated(JobListSerializer, "JobPage"))
    def get(self, request: AuthenticatedRequest) -> Response:
        jobs = job_list(user=request.user).select_related("trained_model").defer("report", "timings", "config")
        return paginated_response(jobs, request, JobListSerializer, self)

    @extend_schema(request=InputSerializer, responses={201: JobOutputSerializer})
    def post(self, request: AuthenticatedRequest) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        args = dict(data.validated_data)
        dataset = dataset_get(user=request.user, dataset_id=args.pop("dataset"))
        job = job_create(owner=request.user, dataset=dataset, **args)
        return Response(JobOutputSerializer(job).data, status=status.HTTP_201_CREATED)


class JobDetailApi(APIView):
    @extend_schema(responses=JobOutputSerializer)
    def get(self, request: AuthenticatedRequest, job_id: int) -> Response:
        return Response(JobOutputSerializer(job_get(user=request.user, job_id=job_id)).data)

    @extend_schema(responses={204: None})
    def delete(self, request: AuthenticatedRequest, job_id: int) -> Response:
        job_delete(job=job_get(user=request.user, job_id=job_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class JobCancelApi(APIView):
    @extend_schema(request=None, responses=JobOutputSerializer)
    def post(self, request: AuthenticatedRequest, job_id: int) -> Response:
        job = job_cancel(job=job_get(user=request.user, job_id=job_id))
        return Response(JobOutputSerializer(job).data)


class JobRetrainApi(APIView):
    """A new job with this job's options, on its dataset's newest version."""

    @extend_schema(request=None, responses={201: JobOutputSerializer})
    def post(self, request: AuthenticatedRequest, job_id: int) -> Response:
        job = job_retrain(job=job_get(user=request.user, job_id=job_id))
        return Response(JobOutputSerializer(job).data, status=status.HTTP_201_CREATED)
