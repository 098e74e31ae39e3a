from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import QueryDict, StreamingHttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_serializer, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.common.errors import UserError
from apps.common.pagination import paginated, paginated_response
from apps.common.requests import AuthenticatedRequest, whole_number
from apps.common.uploads import limit_upload_size
from apps.datasets.findings import findings_dismiss, findings_read, findings_request
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.review import FINDER_FILTERS, MAX_PAGE_SIZE, version_images
from apps.datasets.selectors import dataset_get, dataset_list, version_get, version_list
from apps.datasets.services import dataset_create, dataset_delete
from apps.datasets.versions import (
    export_name,
    version_add,
    version_change,
    version_delete,
    version_export,
    version_head,
)


class DatasetOutputSerializer(serializers.ModelSerializer[Dataset]):
    version = serializers.SerializerMethodField(help_text="its newest ready version's number (what training uses)")

    class Meta:
        model = Dataset
        fields = [
            "id",
            "name",
            "status",
            "version",
            "num_images",
            "classes",
            "warnings",
            "assessment",
            "error",
            "layout",
            "archive_bytes",
            "created_at",
        ]

    def get_version(self, dataset: Dataset) -> int | None:
        head = version_head(dataset)
        return head.number if head else None


class DatasetListSerializer(serializers.ModelSerializer[Dataset]):
    """A dataset in a list: what a table row shows (the detail has classes, warnings, assessment)."""

    num_classes = serializers.SerializerMethodField()

    class Meta:
        model = Dataset
        fields = ["id", "name", "status", "num_images", "num_classes", "error", "archive_bytes", "created_at"]

    def get_num_classes(self, dataset: Dataset) -> int:
        return len(dataset.classes)


class DatasetListCreateApi(APIView):
    @extend_schema_serializer(component_name="DatasetInput")
    class InputSerializer(serializers.Serializer[dict[str, Any]]):
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


# --- versions -----------------------------------------------------------------------------------


class VersionOutputSerializer(serializers.ModelSerializer[DatasetVersion]):
    # (`parent` and `label` are the JSON's names; on a DRF Field they are also attributes, hence the ignores.)
    parent = serializers.IntegerField(  # type: ignore[assignment]
        source="parent.number", allow_null=True, default=None, read_only=True
    )

    class Meta:
        model = DatasetVersion
        fields = [
            "number",
            "parent",
            "status",
            "note",
            "num_images",
            "classes",
            "summary",
            "changes",
            "warnings",
            "error",
            "archive_bytes",
            "content_hash",
            "findings_status",
            "findings_summary",
            "findings_error",
            "created_at",
        ]


class VersionListSerializer(VersionOutputSerializer):
    """A version in a list: what changed, counted (the detail lists the changes)."""

    class Meta(VersionOutputSerializer.Meta):
        fields = [f for f in VersionOutputSerializer.Meta.fields if f not in ("changes", "classes")]


class LabelIssueSerializer(serializers.Serializer[dict[str, Any]]):
    """ml.finders.LabelIssue, named by content in the app."""

    sha256 = serializers.CharField()
    member = serializers.CharField(help_text="its path in the archive it arrived in")
    label = serializers.CharField()  # type: ignore[assignment]
    suggested = serializers.CharField()
    score = serializers.FloatField(help_text="0..1, higher: more likely mislabelled")


class NearDuplicateSerializer(serializers.Serializer[dict[str, Any]]):
    """ml.finders.NearDuplicate."""

    sha256s = serializers.ListField(child=serializers.CharField(), min_length=2, max_length=2)
    members = serializers.ListField(child=serializers.CharField(), min_length=2, max_length=2)
    kind = serializers.ChoiceField(choices=["cross-class", "cross-split", "same-class"])
    similarity = serializers.FloatField()


class OutlierSerializer(serializers.Serializer[dict[str, Any]]):
    """ml.finders.Outlier."""

    sha256 = serializers.CharField()
    member = serializers.CharField()
    score = serializers.FloatField(help_text="distance to the nearest class over its typical distance (>1: farther)")


class FindingsSerializer(serializers.Serializer[dict[str, Any]]):
    """ml.finders.Findings.to_dict(), with each image's sha256."""

    status = serializers.ChoiceField(choices=DatasetVersion.FindingsStatus.choices)
    error = serializers.CharField(allow_blank=True)
    label_issues = LabelIssueSerializer(many=True)
    near_duplicates = NearDuplicateSerializer(many=True)
    outliers = OutlierSerializer(many=True)


class ImageSerializer(serializers.Serializer[dict[str, Any]]):
    sha256 = serializers.CharField()
    member = serializers.CharField()
    label = serializers.CharField()  # type: ignore[assignment]
    split = serializers.CharField()
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    thumbnail = serializers.CharField(help_text="URL of its JPEG thumbnail")
    label_issue = LabelIssueSerializer(allow_null=True)
    near_duplicates = NearDuplicateSerializer(many=True)
    outlier = OutlierSerializer(allow_null=True)
    dismissed = serializers.BooleanField(help_text="its findings were dismissed (the finder filters leave it out)")


class ImagePageSerializer(serializers.Serializer[dict[str, Any]]):
    count = serializers.IntegerField()
    page = serializers.IntegerField()
    pages = serializers.IntegerField()
    facets = serializers.DictField(
        child=serializers.IntegerField(), help_text="images each finder filter shows under this class and split"
    )
    results = ImageSerializer(many=True)


class VersionListCreateApi(APIView):
    """A dataset's versions, newest first; POST makes the next one, from a change set (JSON) or from
    a zip of images to add (multipart `file`)."""

    @extend_schema_serializer(component_name="ChangeSet")
    class ChangeSerializer(serializers.Serializer[dict[str, Any]]):
        parent = serializers.IntegerField(  # type: ignore[assignment]
            required=False, help_text="the version the changes were made on; 409 if a newer one exists"
        )
        relabel = serializers.DictField(child=serializers.CharField(), required=False, help_text="{sha256: class}")
        remove = serializers.ListField(child=serializers.CharField(), required=False, help_text="sha256s")
        note = serializers.CharField(required=False, allow_blank=True, max_length=300)

    @extend_schema_serializer(component_name="AddImages")
    class AddSerializer(serializers.Serializer[dict[str, Any]]):
        file = serializers.FileField(allow_empty_file=True, help_text="a zip: one folder of images per class")
        note = serializers.CharField(required=False, allow_blank=True, max_length=300)

    parser_classes = [JSONParser, MultiPartParser, FormParser]

    @extend_schema(operation_id="dataset_versions_list", responses=VersionListSerializer(many=True))
    def get(self, request: AuthenticatedRequest, dataset_id: int) -> Response:
        dataset = dataset_get(user=request.user, dataset_id=dataset_id)
        return Response(VersionListSerializer(version_list(dataset=dataset), many=True).data)

    @extend_schema(
        request={"application/json": ChangeSerializer, "multipart/form-data": AddSerializer},
        responses={201: VersionOutputSerializer, 202: VersionOutputSerializer},
    )
    def post(self, request: AuthenticatedRequest, dataset_id: int) -> Response:
        dataset = dataset_get(user=request.user, dataset_id=dataset_id)
        if request.content_type.startswith("multipart/") or "file" in request.FILES:
            limit_upload_size(request, settings.GRAFT_MAX_UPLOAD_BYTES)
            if "file" not in request.FILES:
                raise UserError("Attach the images' zip as a multipart field named 'file'.")
            add = self.AddSerializer(data=request.data)
            add.is_valid(raise_exception=True)
            version = version_add(dataset=dataset, **add.validated_data)
            return Response(VersionOutputSerializer(version).data, status=status.HTTP_202_ACCEPTED)
        change = self.ChangeSerializer(data=request.data)
        change.is_valid(raise_exception=True)
        version = version_change(dataset=dataset, **change.validated_data)
        return Response(VersionOutputSerializer(version).data, status=status.HTTP_201_CREATED)


class VersionDetailApi(APIView):
    @extend_schema(responses=VersionOutputSerializer)
    def get(self, request: AuthenticatedRequest, dataset_id: int, number: int) -> Response:
        version = version_get(user=request.user, dataset_id=dataset_id, number=number)
        return Response(VersionOutputSerializer(version).data)

    @extend_schema(responses={204: None})
    def delete(self, request: AuthenticatedRequest, dataset_id: int, number: int) -> Response:
        version_delete(version=version_get(user=request.user, dataset_id=dataset_id, number=number))
        return Response(status=status.HTTP_204_NO_CONTENT)


class VersionImagesApi(APIView):
    """The version's images a page at a time, with what the finders say of each; filters: `label`,
    `split`, `finder` (flagged, label_issues, near_duplicates, cross-class, cross-split, outliers).
    Flagged images come most likely first; the rest in the manifest's order."""

    @extend_schema(
        parameters=[
            OpenApiParameter("label", str),
            OpenApiParameter("split", str, enum=["train", "val", "test"]),
            OpenApiParameter("finder", str, enum=list(FINDER_FILTERS)),
            OpenApiParameter("dismissed", bool, description="finder filters include dismissed images"),
            OpenApiParameter("page", int),
            OpenApiParameter("page_size", int, description=f"up to {MAX_PAGE_SIZE}"),
        ],
        responses=ImagePageSerializer,
    )
    def get(self, request: AuthenticatedRequest, dataset_id: int, number: int) -> Response:
        version = version_get(user=request.user, dataset_id=dataset_id, number=number)
        q = request.query_params
        page = version_images(
            version,
            label=q.get("label", ""),
            split=q.get("split", ""),
            finder=q.get("finder", ""),
            page=_int_param(q, "page", 1),
            page_size=_int_param(q, "page_size", 60),
            with_dismissed=q.get("dismissed", "") in ("1", "true"),
        )
        for row in page["results"]:
            row["thumbnail"] = reverse("web:dataset-image", args=[dataset_id, row["sha256"]])
        return Response(page)


def _int_param(q: QueryDict, name: str, default: int) -> int:
    raw = q.get(name, "")
    if raw == "":
        return default
    value = whole_number(raw)
    if not value:
        raise UserError(f"'{name}' must be a whole number from 1.")
    return value


class VersionFindingsApi(APIView):
    """What the finders flag in the version; POST runs them again (after a failure, say)."""

    @extend_schema(responses=FindingsSerializer)
    def get(self, request: AuthenticatedRequest, dataset_id: int, number: int) -> Response:
        version = version_get(user=request.user, dataset_id=dataset_id, number=number)
        return Response({"status": version.findings_status, "error": version.findings_error, **findings_read(version)})

    @extend_schema(request=None, responses={202: VersionOutputSerializer})
    def post(self, request: AuthenticatedRequest, dataset_id: int, number: int) -> Response:
        version = version_get(user=request.user, dataset_id=dataset_id, number=number)
        version = findings_request(version=version)
        return Response(VersionOutputSerializer(version).data, status=status.HTTP_202_ACCEPTED)


class VersionExportApi(APIView):
    """The version as a zip in the upload format, with `train/` and `val/` folders: it uploads again
    as the same dataset."""

    @extend_schema(responses={(200, "application/zip"): OpenApiTypes.BINARY})
    def get(self, request: AuthenticatedRequest, dataset_id: int, number: int) -> StreamingHttpResponse:
        version = version_get(user=request.user, dataset_id=dataset_id, number=number)
        if version.status != DatasetVersion.Status.READY:
            raise UserError(f"Version {version.number} is not ready; export a ready version.", status_code=409)
        export = version_export(version)
        response = StreamingHttpResponse(export, content_type="application/zip")
        response["Content-Length"] = str(len(export))
        response["Content-Disposition"] = f'attachment; filename="{export_name(version)}"'
        return response


class DismissalsApi(APIView):
    """Dismiss what the finders say of some images (or restore it, `dismissed: false`), in every version."""

    @extend_schema_serializer(component_name="DismissalsInput")
    class InputSerializer(serializers.Serializer[dict[str, Any]]):
        # (No maxItems in the schema: a request that long is over the body-size limit first, a 413.)
        sha256s = serializers.ListField(child=serializers.CharField(max_length=64))
        dismissed = serializers.BooleanField(default=True)

    @extend_schema(
        request=InputSerializer,
        responses=inline_serializer("Dismissals", {"dismissed": serializers.IntegerField()}),
    )
    def post(self, request: AuthenticatedRequest, dataset_id: int) -> Response:
        dataset = dataset_get(user=request.user, dataset_id=dataset_id)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return Response({"dismissed": findings_dismiss(dataset=dataset, **data.validated_data)})
