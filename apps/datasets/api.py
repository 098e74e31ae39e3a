from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.common.errors import UserError
from apps.common.pagination import paginated, paginated_response
from apps.common.requests import AuthenticatedRequest
from apps.common.uploads import limit_upload_size
from apps.datasets.models import Dataset
from apps.datasets.selectors import dataset_get, dataset_list
from apps.datasets.services import dataset_create, dataset_delete


class DatasetOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = Dataset
        fields = [
            "id",
            "name",
            "status",
            "num_images",
            "classes",
            "warnings",
            "assessment",
            "error",
            "layout",
            "archive_bytes",
            "created_at",
        ]


class DatasetListSerializer(serializers.ModelSerializer):
    """A dataset in a list: what a table row shows (the detail has classes, warnings, assessment)."""

    num_classes = serializers.SerializerMethodField()

    class Meta:
        model = Dataset
        fields = ["id", "name", "status", "num_images", "num_classes", "error", "archive_bytes", "created_at"]

    def get_num_classes(self, dataset: Dataset) -> int:
        return len(dataset.classes)


class DatasetListCreateApi(APIView):
    @extend_schema_serializer(component_name="DatasetInput")
    class InputSerializer(serializers.Serializer):
        file = serializers.FileField(allow_empty_file=True)
        name = serializers.CharField(required=False, allow_blank=True, max_length=200)

    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(operation_id="datasets_list", responses=paginated(DatasetListSerializer, "DatasetPage"))
    def get(self, request: AuthenticatedRequest) -> Response:
        datasets = dataset_list(user=request.user).defer("warnings", "assessment", "thumbnails")
        return paginated_response(datasets, request, DatasetListSerializer, self)

    @extend_schema(request={"multipart/form-data": InputSerializer}, responses={201: DatasetOutputSerializer})
    def post(self, request: AuthenticatedRequest) -> Response:
        limit_upload_size(request, settings.GRAFT_MAX_UPLOAD_BYTES)
        if "file" not in request.FILES:
            raise UserError("Attach the dataset zip as a multipart field named 'file'.")
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        dataset = dataset_create(owner=request.user, **data.validated_data)
        return Response(DatasetOutputSerializer(dataset).data, status=status.HTTP_201_CREATED)


class DatasetDetailApi(APIView):
    @extend_schema(responses=DatasetOutputSerializer)
    def get(self, request: AuthenticatedRequest, dataset_id: int) -> Response:
        return Response(DatasetOutputSerializer(dataset_get(user=request.user, dataset_id=dataset_id)).data)

    @extend_schema(responses={204: None})
    def delete(self, request: AuthenticatedRequest, dataset_id: int) -> Response:
        dataset_delete(dataset=dataset_get(user=request.user, dataset_id=dataset_id))
        return Response(status=status.HTTP_204_NO_CONTENT)
