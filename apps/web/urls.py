from django.contrib.auth import views as auth_views
from django.urls import include, path

from apps.common.throttles import throttle_posts
from apps.web import projects, views

app_name = "web"

urlpatterns = [
    path("", projects.dashboard, name="home"),
    path("", include(projects.urlpatterns)),
    path("accounts/signup/", views.signup, name="signup"),
    path(
        "accounts/login/",
        throttle_posts("sign_in")(auth_views.LoginView.as_view(redirect_authenticated_user=True)),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("tokens/", views.tokens, name="tokens"),
    path("upload/", views.upload, name="upload"),
    path("datasets/<int:dataset_id>/", views.dataset_detail, name="dataset"),
    path("datasets/<int:dataset_id>/review/", views.dataset_review, name="review"),
    path("datasets/<int:dataset_id>/delete/", views.dataset_remove, name="dataset-delete"),
    path("datasets/<int:dataset_id>/train/", views.train, name="train"),
    path("datasets/<int:dataset_id>/thumb/", views.dataset_thumb, name="thumb"),
    path("datasets/<int:dataset_id>/images/<str:sha256>.jpg", views.dataset_image, name="dataset-image"),
    path("jobs/<int:job_id>/", views.job_detail, name="job"),
    path("jobs/<int:job_id>/delete/", views.job_remove, name="job-delete"),
    path("models/<int:model_id>/", views.model_detail, name="model"),
    path("models/<int:model_id>/delete/", views.model_remove, name="model-delete"),
    path("models/<int:model_id>/int8/", views.model_int8, name="model-int8"),
    path("models/<int:model_id>/thumb/", views.model_thumb, name="model-thumb"),
    path("batches/<int:batch_id>/", views.batch_detail, name="batch"),
]
