from __future__ import annotations

from typing import cast

from django.conf import settings
from django.http import FileResponse, QueryDict
from drf_spectacular.utils import OpenApiTypes, extend_schema
from rest_framework import serializers
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.common.errors import UserError
from apps.common.pagination import paginated, paginated_response
from apps.common.requests import AuthenticatedRequest
from apps.common.storage import open_stream
from apps.common.uploads import limit_upload_size
from apps.serving.cache import get_predictor
from apps.serving.models import TrainedModel
from apps.serving.selectors import model_get, model_list
from apps.serving.services import model_predict


class ModelOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = TrainedModel
        fields = [
            "id",
            "name",
            "job",
            "backbone",
            "classes",
            "metrics",
            "strategy",
            "bundle_bytes",
            "bundle_sha256",
            "created_at",
        ]


class ModelListSerializer(serializers.ModelSerializer):
    """A model in a list: name, backbone, accuracy (the detail has per-class metrics and the plan)."""

    num_classes = serializers.SerializerMethodField()
    val_accuracy = serializers.SerializerMethodField()

    class Meta:
        model = TrainedModel
        fields = ["id", "name", "job", "backbone", "num_classes", "val_accuracy", "bundle_bytes", "created_at"]

    def get_num_classes(self, model: TrainedModel) -> int:
        return len(model.classes)

    def get_val_accuracy(self, model: TrainedModel) -> float | None:
        return model.metrics.get("val_accuracy")


class ModelListApi(APIView):
    @extend_schema(operation_id="models_list", responses=paginated(ModelListSerializer, "ModelPage"))
    def get(self, request: AuthenticatedRequest) -> Response:
        return paginated_response(model_list(user=request.user), request, ModelListSerializer, self)


class ModelDetailApi(APIView):
    @extend_schema(responses=ModelOutputSerializer)
    def get(self, request: AuthenticatedRequest, model_id: int) -> Response:
        return Response(ModelOutputSerializer(model_get(user=request.user, model_id=model_id)).data)


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


class ModelPredictApi(APIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        request={
            "multipart/form-data": {
                "type": "object",
                "properties": {
                    "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "k": {"type": "integer"},
                },
            }
        },
        responses=OpenApiTypes.OBJECT,
    )
    def post(self, request: AuthenticatedRequest, model_id: int) -> Response:
        model = model_get(user=request.user, model_id=model_id)
        limit_upload_size(request, settings.GRAFT_MAX_PREDICT_BYTES)
        try:
            k = int(cast(QueryDict, request.data).get("k", 5))  # the form parsers give a QueryDict
        except (TypeError, ValueError):
            raise UserError("'k' must be a whole number.") from None
        if k < 1:
            raise UserError("'k' must be at least 1.")
        predictions = model_predict(model=model, images=request.FILES.getlist("image"), k=k)
        return Response(
            {
                "predictions": predictions,
                "model": {
                    "id": model.pk,
                    "name": model.name,
                    "backbone": model.backbone,
                    "classes": model.classes,
                    "runtime": get_predictor(model).runtime,  # loaded by the prediction: a cache hit
                },
            }
        )
