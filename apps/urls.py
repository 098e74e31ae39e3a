from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.accounts.api import TokenObtainApi
from apps.common import health
from apps.datasets.api import (
    DatasetDetailApi,
    DatasetListCreateApi,
    DismissalsApi,
    VersionDetailApi,
    VersionExportApi,
    VersionFindingsApi,
    VersionImagesApi,
    VersionListCreateApi,
)
from apps.datasets.tus import TusUploadApi, TusUploadListApi
from apps.serving.api import (
    BatchDetailApi,
    BatchItemsApi,
    BatchListCreateApi,
    BatchResultsApi,
    BatchThumbApi,
    LabelQueueApi,
    ModelCompareApi,
    ModelDetailApi,
    ModelDownloadApi,
    ModelInt8Api,
    ModelListApi,
    ModelPredictApi,
    ModelPredictionImageApi,
    ModelPredictionsApi,
    ProjectDetailApi,
    ProjectListApi,
    ProjectPredictApi,
    ProjectPublishApi,
)
from apps.training.api import JobCancelApi, JobDetailApi, JobListCreateApi, JobRetrainApi

api = [
    path("auth/token/", TokenObtainApi.as_view(), name="token"),
    path("datasets/", DatasetListCreateApi.as_view(), name="datasets"),
    path("uploads/", TusUploadListApi.as_view(), name="uploads"),
    path("uploads/<uuid:upload_id>/", TusUploadApi.as_view(), name="upload"),
    path("datasets/<int:dataset_id>/", DatasetDetailApi.as_view(), name="dataset"),
    path("datasets/<int:dataset_id>/dismissals/", DismissalsApi.as_view(), name="dataset-dismissals"),
    path("datasets/<int:dataset_id>/versions/", VersionListCreateApi.as_view(), name="dataset-versions"),
    path("datasets/<int:dataset_id>/versions/<int:number>/", VersionDetailApi.as_view(), name="dataset-version"),
    path(
        "datasets/<int:dataset_id>/versions/<int:number>/images/",
        VersionImagesApi.as_view(),
        name="dataset-version-images",
    ),
    path(
        "datasets/<int:dataset_id>/versions/<int:number>/findings/",
        VersionFindingsApi.as_view(),
        name="dataset-version-findings",
    ),
    path(
        "datasets/<int:dataset_id>/versions/<int:number>/export/",
        VersionExportApi.as_view(),
        name="dataset-version-export",
    ),
    path("jobs/", JobListCreateApi.as_view(), name="jobs"),
    path("jobs/<int:job_id>/", JobDetailApi.as_view(), name="job"),
    path("jobs/<int:job_id>/cancel/", JobCancelApi.as_view(), name="job-cancel"),
    path("models/", ModelListApi.as_view(), name="models"),
    path("models/compare/", ModelCompareApi.as_view(), name="models-compare"),
    path("models/<int:model_id>/", ModelDetailApi.as_view(), name="model"),
    path("models/<int:model_id>/download/", ModelDownloadApi.as_view(), name="model-download"),
    path("models/<int:model_id>/predict/", ModelPredictApi.as_view(), name="model-predict"),
    path("models/<int:model_id>/int8/", ModelInt8Api.as_view(), name="model-int8"),
    path("models/<int:model_id>/predictions/", ModelPredictionsApi.as_view(), name="model-predictions"),
    path(
        "models/<int:model_id>/predictions/<int:record_id>/image/",
        ModelPredictionImageApi.as_view(),
        name="model-prediction-image",
    ),
    path("projects/", ProjectListApi.as_view(), name="projects"),
    path("projects/<int:project_id>/", ProjectDetailApi.as_view(), name="project"),
    path("projects/<int:project_id>/publish/", ProjectPublishApi.as_view(), name="project-publish"),
    path("projects/<int:project_id>/predict/", ProjectPredictApi.as_view(), name="project-predict"),
    path("projects/<int:project_id>/label-queue/", LabelQueueApi.as_view(), name="project-label-queue"),
    path("jobs/<int:job_id>/retrain/", JobRetrainApi.as_view(), name="job-retrain"),
    path("models/<int:model_id>/batch/", BatchListCreateApi.as_view(), name="model-batches"),
    path("batches/<int:batch_id>/", BatchDetailApi.as_view(), name="batch"),
    path("batches/<int:batch_id>/items/", BatchItemsApi.as_view(), name="batch-items"),
    path("batches/<int:batch_id>/thumb/", BatchThumbApi.as_view(), name="batch-thumb"),
    path("batches/<int:batch_id>/predictions.csv", BatchResultsApi.as_view(), {"fmt": "csv"}, name="batch-results-csv"),
    path(
        "batches/<int:batch_id>/predictions.json", BatchResultsApi.as_view(), {"fmt": "json"}, name="batch-results-json"
    ),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
]

urlpatterns = [
    path("health/live/", health.live, name="health-live"),
    path("health/ready/", health.ready, name="health-ready"),
    path("", include("apps.web.urls")),
    *([path("admin/", admin.site.urls)] if settings.GRAFT_ADMIN else []),  # off in production unless asked for
    path("api/v1/", include((api, "api"))),
]

handler400 = "apps.common.errors.json_400_or_html"
handler404 = "apps.common.errors.json_404_or_html"
handler500 = "apps.common.errors.json_500_or_html"
