from __future__ import annotations

import mimetypes
import time
from typing import Any, Literal, cast
from urllib.parse import urlencode

from django.conf import settings
from django.http import FileResponse, Http404, QueryDict
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiTypes,
    extend_schema,
    extend_schema_field,
    extend_schema_serializer,
    inline_serializer,
)
from rest_framework import serializers, status
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.common.dataclass_schema import openapi_schema
from apps.common.errors import UserError
from apps.common.pagination import paginated, paginated_response
from apps.common.requests import AuthenticatedRequest, whole_number
from apps.common.storage import open_if_stored, open_stream
from apps.common.uploads import limit_upload_size
from apps.datasets.models import Dataset
from apps.datasets.selectors import dataset_get
from apps.serving import predlog
from apps.serving.batches import batch_create, batch_delete, batch_items, batch_thumb_name
from apps.serving.compare import models_compare
from apps.serving.labelling import label_queue, label_records
from apps.serving.models import BatchPrediction, PredictionRecord, TrainedModel
from apps.serving.projects import (
    model_publish,
    model_rename,
    model_unpublish,
    project_get,
    project_list,
    project_models,
    project_published,
    project_serving_model,
)
from apps.serving.quantization import int8_not_served_here, int8_request
from apps.serving.selectors import batch_get, batch_list, model_get, model_list
from apps.serving.services import model_delete, model_predict
from ml.report import Int8Check

INT8_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


@extend_schema_field({"oneOf": [openapi_schema(Int8Check), INT8_ERROR], "nullable": True})
class Int8Field(serializers.JSONField):
    """The int8 step's figures (kept or refused), or why it failed; null before it has run."""

    def to_representation(self, value: Any) -> Any:
        return value if value != {} else None


class ModelOutputSerializer(serializers.ModelSerializer[TrainedModel]):
    project = serializers.IntegerField(source="dataset_id", allow_null=True, read_only=True)
    version = serializers.IntegerField(source="version.number", allow_null=True, default=None, read_only=True)
    int8 = Int8Field(read_only=True)
    served_precision = serializers.SerializerMethodField(
        help_text="What this server predicts with: int8 where the int8 version was kept and this server's CPU "
        "multiplies int8 as the worker that tested it did (or exactly), else fp32."
    )
    served_precision_note = serializers.SerializerMethodField(
        help_text="Why a kept int8 version is not served here, in a sentence; null where it is, or none was kept."
    )

    class Meta:
        model = TrainedModel
        fields = [
            "id",
            "name",
            "project",
            "version",
            "published",
            "job",
            "backbone",
            "classes",
            "metrics",
            "strategy",
            "bundle_bytes",
            "bundle_sha256",
            "prediction_log",
            "int8_status",
            "int8",
            "served_precision",
            "served_precision_note",
            "created_at",
        ]
        read_only_fields = [f for f in fields if f not in ("prediction_log", "name")]

    def get_served_precision(self, model: TrainedModel) -> Literal["int8", "fp32"]:
        kept = model.int8_status == TrainedModel.Int8.KEPT
        return "int8" if kept and int8_not_served_here(model) is None else "fp32"

    def get_served_precision_note(self, model: TrainedModel) -> str | None:
        return int8_not_served_here(model)


class ModelListSerializer(serializers.ModelSerializer[TrainedModel]):
    """A model in a list: name, backbone, accuracy (the detail has per-class metrics and the plan)."""

    num_classes = serializers.SerializerMethodField()
    val_accuracy = serializers.SerializerMethodField()

    class Meta:
        model = TrainedModel
        fields = ["id", "name", "job", "backbone", "num_classes", "val_accuracy", "bundle_bytes", "created_at"]

    def get_num_classes(self, model: TrainedModel) -> int:
        return len(model.classes)

    def get_val_accuracy(self, model: TrainedModel) -> float | None:
        accuracy: float | None = model.metrics.get("val_accuracy")
        return accuracy


class ModelListApi(APIView):
    @extend_schema(operation_id="models_list", responses=paginated(ModelListSerializer, "ModelPage"))
    def get(self, request: AuthenticatedRequest) -> Response:
        return paginated_response(model_list(user=request.user), request, ModelListSerializer, self)


class ModelDetailApi(APIView):
    @extend_schema_serializer(component_name="ModelUpdate")
    class UpdateSerializer(serializers.Serializer[dict[str, Any]]):
        name = serializers.CharField(required=False, max_length=200)
        prediction_log = serializers.ChoiceField(choices=TrainedModel.Log.choices, required=False)

    @extend_schema(responses=ModelOutputSerializer)
    def get(self, request: AuthenticatedRequest, model_id: int) -> Response:
        return Response(ModelOutputSerializer(model_get(user=request.user, model_id=model_id)).data)

    @extend_schema(responses={204: None})
    def delete(self, request: AuthenticatedRequest, model_id: int) -> Response:
        model_delete(model=model_get(user=request.user, model_id=model_id))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=UpdateSerializer, responses=ModelOutputSerializer)
    def patch(self, request: AuthenticatedRequest, model_id: int) -> Response:
        model = model_get(user=request.user, model_id=model_id)
        data = self.UpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        if not data.validated_data:
            raise UserError("Send 'name', 'prediction_log', or both.")
        if "name" in data.validated_data:
            model = model_rename(model=model, name=data.validated_data["name"])
        if "prediction_log" in data.validated_data:
            model = predlog.set_mode(model=model, mode=data.validated_data["prediction_log"])
        return Response(ModelOutputSerializer(model).data)


class ModelInt8Api(APIView):
    @extend_schema(request=None, responses={202: ModelOutputSerializer})
    def post(self, request: AuthenticatedRequest, model_id: int) -> Response:
        """Make the model's int8 variant: a worker quantizes and tests it, and the model serves it once
        it is kept; `int8_status` says where it stands (pending, running, kept, refused, failed). Asked
        while on its way, the model is returned as it is (asked again once pending for 10 minutes, it
        is queued again); made already (kept or refused), 409; with its owner's storage full, 413 (it is
        stored in the bundle, beside the fp32 model)."""
        model = int8_request(model=model_get(user=request.user, model_id=model_id))
        return Response(ModelOutputSerializer(model).data, status=status.HTTP_202_ACCEPTED)


class PredictionRecordSerializer(serializers.ModelSerializer[PredictionRecord]):
    image = serializers.SerializerMethodField()

    class Meta:
        model = PredictionRecord
        fields = ["id", "created_at", "latency_ms", "label", "score", "image"]

    def get_image(self, record: PredictionRecord) -> str | None:
        if not record.image:
            return None
        return reverse("api:model-prediction-image", kwargs={"model_id": record.model_id, "record_id": record.pk})


class ModelPredictionsApi(APIView):
    @extend_schema(
        operation_id="models_predictions_list",
        responses=inline_serializer(
            "PredictionLog",
            {
                "prediction_log": serializers.ChoiceField(choices=TrainedModel.Log.choices),
                "keep": serializers.IntegerField(),
                "records": PredictionRecordSerializer(many=True),
            },
        ),
    )
    def get(self, request: AuthenticatedRequest, model_id: int) -> Response:
        """The model's prediction log, newest first (at most GRAFT_PREDICTION_LOG_KEEP records)."""
        model = model_get(user=request.user, model_id=model_id)
        records = model.predictions.all()[: settings.GRAFT_PREDICTION_LOG_KEEP]
        return Response(
            {
                "prediction_log": model.prediction_log,
                "keep": settings.GRAFT_PREDICTION_LOG_KEEP,
                "records": PredictionRecordSerializer(records, many=True).data,
            }
        )


class ModelPredictionImageApi(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request: AuthenticatedRequest, model_id: int, record_id: int) -> FileResponse:
        model = model_get(user=request.user, model_id=model_id)
        record = get_object_or_404(model.predictions.exclude(image=""), pk=record_id)
        stream = open_if_stored(record.image)
        if stream is None:  # deleted just now (the log trimmed, or image keeping turned off)
            raise Http404("This prediction's image is no longer kept.")
        content_type = mimetypes.guess_type(record.image)[0] or "application/octet-stream"
        response = FileResponse(stream, content_type=content_type)
        response["Content-Security-Policy"] = "default-src 'none'; sandbox"  # a user's upload, never a page
        response["X-Content-Type-Options"] = "nosniff"
        return response


class ModelDownloadApi(APIView):
    @extend_schema(responses={(200, "application/zip"): OpenApiTypes.BINARY})
    def get(self, request: AuthenticatedRequest, model_id: int) -> FileResponse:
        model = model_get(user=request.user, model_id=model_id)
        response = FileResponse(
            open_stream(model.bundle),  # streamed from storage as the client reads it
            as_attachment=True,
            filename=f"graft-model-{model.pk}.zip",
            content_type="application/zip",
        )
        response["Content-Length"] = str(model.bundle_bytes)
        return response


PREDICT_REQUEST = {
    "multipart/form-data": {
        "type": "object",
        "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "k": {"type": "integer"},
        },
    }
}


class ModelPredictApi(APIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(request=PREDICT_REQUEST, responses=OpenApiTypes.OBJECT)
    def post(self, request: AuthenticatedRequest, model_id: int) -> Response:
        started = time.perf_counter()
        return _predict_response(request, model_get(user=request.user, model_id=model_id), started)


def _predict_response(request: AuthenticatedRequest, model: TrainedModel, started: float) -> Response:
    limit_upload_size(request, settings.GRAFT_MAX_PREDICT_BYTES)
    try:
        k = int(cast(QueryDict, request.data).get("k", 5))  # the form parsers give a QueryDict
    except (TypeError, ValueError):
        raise UserError("'k' must be a whole number.") from None
    if k < 1:
        raise UserError("'k' must be at least 1.")
    predictions, predictor = model_predict(model=model, images=request.FILES.getlist("image"), k=k, started=started)
    return Response(
        {
            "predictions": predictions,
            "model": {
                "id": model.pk,
                "name": model.name,
                "backbone": model.backbone,
                "classes": model.classes,
                "runtime": predictor.runtime,
                "precision": predictor.precision,  # int8 where it was kept and this CPU multiplies as its test did
            },
        }
    )


# --- projects -------------------------------------------------------------------------------------


class ProjectModelSerializer(serializers.ModelSerializer[TrainedModel]):
    version = serializers.IntegerField(source="version.number", allow_null=True, default=None, read_only=True)
    val_accuracy = serializers.SerializerMethodField()
    strategy = serializers.SerializerMethodField()

    class Meta:
        model = TrainedModel
        fields = ["id", "name", "version", "published", "published_at", "val_accuracy", "strategy", "job", "created_at"]

    def get_val_accuracy(self, model: TrainedModel) -> float | None:
        accuracy: float | None = model.metrics.get("val_accuracy")
        return accuracy

    def get_strategy(self, model: TrainedModel) -> str | None:
        name: str | None = model.strategy.get("name")
        return name


class ProjectSerializer(serializers.ModelSerializer[Dataset]):
    """A dataset's versions and the models trained on them (the project has the dataset's id)."""

    versions = serializers.SerializerMethodField()
    models = serializers.SerializerMethodField()
    published = serializers.SerializerMethodField()
    predict_url = serializers.SerializerMethodField()

    class Meta:
        model = Dataset
        fields = ["id", "name", "status", "versions", "models", "published", "predict_url", "created_at"]

    @extend_schema_field(serializers.ListField(child=serializers.DictField()))
    def get_versions(self, project: Dataset) -> list[dict[str, Any]]:
        return [
            {"number": v.number, "status": v.status, "num_images": v.num_images, "summary": v.summary,
             "note": v.note, "created_at": v.created_at}
            for v in project.versions.order_by("-number")
        ]  # fmt: skip

    @extend_schema_field(ProjectModelSerializer(many=True))
    def get_models(self, project: Dataset) -> list[dict[str, Any]]:
        return list(ProjectModelSerializer(project_models(project), many=True).data)

    def get_published(self, project: Dataset) -> int | None:
        model = project_published(project)
        return model.pk if model else None

    def get_predict_url(self, project: Dataset) -> str:
        return reverse("api:project-predict", args=[project.pk])


class ProjectListApi(APIView):
    @extend_schema(operation_id="projects_list", responses=paginated(ProjectSerializer, "ProjectPage"))
    def get(self, request: AuthenticatedRequest) -> Response:
        return paginated_response(project_list(user=request.user), request, ProjectSerializer, self)


class ProjectDetailApi(APIView):
    @extend_schema(responses=ProjectSerializer)
    def get(self, request: AuthenticatedRequest, project_id: int) -> Response:
        return Response(ProjectSerializer(project_get(user=request.user, project_id=project_id)).data)


class ProjectPublishApi(APIView):
    """Publish one of the project's models behind its stable URL (`model`: null unpublishes)."""

    @extend_schema_serializer(component_name="PublishInput")
    class InputSerializer(serializers.Serializer[dict[str, Any]]):
        model = serializers.IntegerField(allow_null=True)

    @extend_schema(request=InputSerializer, responses=ProjectSerializer)
    def post(self, request: AuthenticatedRequest, project_id: int) -> Response:
        project = project_get(user=request.user, project_id=project_id)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        model_id = data.validated_data["model"]
        if model_id is None:
            current = project_published(project)
            if current is not None:
                model_unpublish(model=current)
        else:
            model = model_get(user=request.user, model_id=model_id)
            if model.dataset_id != project.pk:
                raise UserError(f"Model '{model.name}' belongs to another project.", status_code=409)
            model_publish(model=model)
        return Response(ProjectSerializer(project).data)


class ProjectPredictApi(APIView):
    """The project's published model answers: the URL stays when a better model is published."""

    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(request=PREDICT_REQUEST, responses=OpenApiTypes.OBJECT)
    def post(self, request: AuthenticatedRequest, project_id: int) -> Response:
        started = time.perf_counter()
        project = project_get(user=request.user, project_id=project_id)
        return _predict_response(request, project_serving_model(project), started)


class BatchOutputSerializer(serializers.ModelSerializer[BatchPrediction]):
    progress = serializers.FloatField(read_only=True)
    results = serializers.SerializerMethodField()

    class Meta:
        model = BatchPrediction
        fields = [
            "id",
            "model",
            "dataset",
            "name",
            "status",
            "k",
            "total",
            "done",
            "failed",
            "progress",
            "results",
            "error",
            "created_at",
            "started_at",
            "finished_at",
        ]

    def get_results(self, batch: BatchPrediction) -> dict[str, str] | None:
        """Where to download the predictions (CSV and JSON), once the batch has succeeded."""
        if batch.status != BatchPrediction.Status.SUCCEEDED:
            return None
        return {fmt: reverse(f"api:batch-results-{fmt}", kwargs={"batch_id": batch.pk}) for fmt in ("csv", "json")}


class BatchListCreateApi(APIView):
    @extend_schema_serializer(component_name="BatchInput")
    class InputSerializer(serializers.Serializer[dict[str, Any]]):
        file = serializers.FileField(required=False, allow_empty_file=True)
        dataset = serializers.IntegerField(required=False, min_value=1)
        k = serializers.IntegerField(required=False, default=5)

    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(operation_id="models_batches_list", responses=paginated(BatchOutputSerializer, "BatchPage"))
    def get(self, request: AuthenticatedRequest, model_id: int) -> Response:
        model = model_get(user=request.user, model_id=model_id)
        return paginated_response(batch_list(user=request.user, model=model), request, BatchOutputSerializer, self)

    @extend_schema(
        request={"multipart/form-data": InputSerializer, "application/json": InputSerializer},
        responses={202: BatchOutputSerializer},
    )
    def post(self, request: AuthenticatedRequest, model_id: int) -> Response:
        model = model_get(user=request.user, model_id=model_id)
        limit_upload_size(request, settings.GRAFT_MAX_UPLOAD_BYTES)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        dataset_id = data.validated_data.get("dataset")
        batch = batch_create(
            owner=request.user,
            model=model,
            file=data.validated_data.get("file"),
            dataset=dataset_get(user=request.user, dataset_id=dataset_id) if dataset_id else None,
            k=data.validated_data["k"],
        )
        return Response(BatchOutputSerializer(batch).data, status=status.HTTP_202_ACCEPTED)


class BatchDetailApi(APIView):
    @extend_schema(responses=BatchOutputSerializer)
    def get(self, request: AuthenticatedRequest, batch_id: int) -> Response:
        return Response(BatchOutputSerializer(batch_get(user=request.user, batch_id=batch_id)).data)

    @extend_schema(responses={204: None})
    def delete(self, request: AuthenticatedRequest, batch_id: int) -> Response:
        batch_delete(batch=batch_get(user=request.user, batch_id=batch_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class BatchResultsApi(APIView):
    @extend_schema(responses={(200, "text/csv"): OpenApiTypes.BINARY, (200, "application/json"): OpenApiTypes.BINARY})
    def get(self, request: AuthenticatedRequest, batch_id: int, fmt: str) -> FileResponse:
        batch = batch_get(user=request.user, batch_id=batch_id)
        name = batch.results_csv if fmt == "csv" else batch.results_json
        if batch.status != BatchPrediction.Status.SUCCEEDED or not name:
            raise UserError(
                f"Batch {batch.pk} is {batch.status}; its predictions come when it succeeds.", status_code=409
            )
        stem = f"graft-batch-{batch.pk}-predictions"
        return FileResponse(
            open_stream(name),
            as_attachment=True,
            filename=f"{stem}.{fmt}",
            content_type="text/csv" if fmt == "csv" else "application/json",
        )


class ModelCompareApi(APIView):
    """Two of your models side by side (`?a=ID&b=ID`): metrics and their difference (b - a), per-class
    scores, confusion matrices, and the validation images both judged whose prediction changed."""

    @extend_schema(
        parameters=[OpenApiParameter("a", int, required=True), OpenApiParameter("b", int, required=True)],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: AuthenticatedRequest) -> Response:
        ids = []
        for key in ("a", "b"):
            value = whole_number(request.query_params.get(key, ""))
            if value is None:
                raise UserError(f"Give the two models to compare as ?a=ID&b=ID ('{key}' is missing or not an id).")
            ids.append(value)
        a, b = (model_get(user=request.user, model_id=i) for i in ids)
        return Response(models_compare(a, b))


class LabelQueueApi(APIView):
    """The project's kept prediction images waiting for a label, least certain first (`?page=`);
    POST labels some ({labels: {prediction id: class}, note}) into a new version of its dataset."""

    @extend_schema_serializer(component_name="LabelsInput")
    class InputSerializer(serializers.Serializer[dict[str, Any]]):
        labels = serializers.DictField(child=serializers.CharField(max_length=200), help_text="{prediction id: class}")
        note = serializers.CharField(required=False, allow_blank=True, max_length=300)

    @extend_schema(
        parameters=[OpenApiParameter("page", int), OpenApiParameter("page_size", int, description="up to 200")],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: AuthenticatedRequest, project_id: int) -> Response:
        project = project_get(user=request.user, project_id=project_id)
        queue = label_queue(project)
        page, size = _page_params(request)
        count = queue.count()
        rows = queue[(page - 1) * size : page * size]
        return Response(
            {
                "count": count,
                "page": page,
                "pages": max(1, -(-count // size)),
                "classes": [c["name"] for c in project.classes],
                "results": [
                    {
                        "id": r.pk,
                        "model": r.model_id,
                        "model_name": r.model.name,
                        "label": r.label,
                        "score": r.score,
                        "margin": r.margin,
                        "created_at": r.created_at,
                        "image": reverse("api:model-prediction-image", args=[r.model_id, r.pk]),
                    }
                    for r in rows
                ],
            }
        )

    @extend_schema(request=InputSerializer, responses={202: OpenApiTypes.OBJECT})
    def post(self, request: AuthenticatedRequest, project_id: int) -> Response:
        project = project_get(user=request.user, project_id=project_id)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        labels = {}
        for key, label in data.validated_data["labels"].items():
            record_id = whole_number(key)
            if record_id is None:
                raise UserError(f"'{key}' is not a prediction id.")
            labels[record_id] = label
        version = label_records(project=project, labels=labels, note=data.validated_data.get("note", ""))
        return Response(
            {"dataset": project.pk, "version": version.number, "status": version.status},
            status=status.HTTP_202_ACCEPTED,
        )


def _page_params(request: AuthenticatedRequest) -> tuple[int, int]:
    values = []
    for name, default, top in (("page", 1, None), ("page_size", 50, 200)):
        raw = request.query_params.get(name, "")
        value = whole_number(raw) if raw else default
        if not value:
            raise UserError(f"'{name}' must be a whole number from 1.")
        values.append(min(value, top) if top else value)
    return values[0], values[1]


class BatchItemsApi(APIView):
    """A finished batch's predictions a page at a time, least confident first, filterable by top
    label (`?label=`), with each label's count; `thumbnail` is a URL where the worker stored one."""

    @extend_schema(
        parameters=[
            OpenApiParameter("label", str),
            OpenApiParameter("page", int),
            OpenApiParameter("page_size", int, description="up to 200"),
        ],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: AuthenticatedRequest, batch_id: int) -> Response:
        batch = batch_get(user=request.user, batch_id=batch_id)
        page, size = _page_params(request)
        body = batch_items(batch, label=request.query_params.get("label", ""), page=page, page_size=size)
        for row in body["results"]:
            row["thumbnail"] = (
                f"{reverse('api:batch-thumb', args=[batch.pk])}?{urlencode({'f': row['file']})}"
                if row.pop("has_thumbnail")
                else None
            )
        return Response(body)


class BatchThumbApi(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("f", str, required=True)],
        responses={(200, "image/jpeg"): OpenApiTypes.BINARY},
    )
    def get(self, request: AuthenticatedRequest, batch_id: int) -> FileResponse:
        batch = batch_get(user=request.user, batch_id=batch_id)
        file = request.query_params.get("f", "")
        stream = open_if_stored(batch_thumb_name(batch, file)) if file in set(batch.thumbnails) else None
        if stream is None:
            raise Http404("This batch has no thumbnail of that file.")
        response = FileResponse(stream, content_type="image/jpeg")
        response["Cache-Control"] = "private, max-age=86400"
        return response
