"""The browser pages. Thin: selectors and services do the work; live data comes from the JSON API."""

from __future__ import annotations

import functools
import json
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.contrib.auth.models import User
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_POST

from apps.accounts.models import ApiToken
from apps.accounts.quotas import usage
from apps.accounts.services import token_create
from apps.accounts.signup import Gate, signup_gate, user_signup
from apps.common.errors import UserError
from apps.common.requests import AuthenticatedHttpRequest, whole_number
from apps.common.storage import open_if_stored
from apps.common.throttles import throttle_posts
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.review import FINDER_FILTERS
from apps.datasets.selectors import dataset_get, dataset_index, dataset_list, version_list
from apps.datasets.services import dataset_delete, thumbnail_members, thumbnail_name
from apps.datasets.versions import dataset_has_image, image_thumbnail, version_head, version_index
from apps.serving.models import TrainedModel
from apps.serving.quantization import int8_not_served_here, int8_request, int8_waited_long
from apps.serving.selectors import batch_get, model_get, model_list
from apps.serving.services import model_delete
from apps.training.gallery import GALLERY_PLACEHOLDER, gallery_members, gallery_open
from apps.training.selectors import job_get, job_list
from apps.training.services import job_create, job_delete
from apps.web.fit_form import posted_options
from ml.quantize import MARGIN, ms_text
from ml.strategy import PLANS, SIMILARITY_THRESHOLD, SIZE_BOUNDARY
from ml.strategy import REGISTRY as PLAN_REGISTRY
from ml.weights import available_backbones


def home(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return render(request, "web/landing.html")
    user = request.user
    return render(
        request,
        "web/dashboard.html",
        {
            "datasets": dataset_list(user=user)[:50],
            "jobs": job_list(user=user).select_related("dataset")[:50],
            "models": model_list(user=user)[:50],
            "usage": usage(user),
            "quota": {
                "open_uploads": settings.GRAFT_QUOTA_OPEN_UPLOADS,
                "active_jobs": settings.GRAFT_QUOTA_ACTIVE_JOBS,
                "datasets": settings.GRAFT_QUOTA_DATASETS,
            },
        },
    )


@throttle_posts("sign_up")
def signup(request: HttpRequest) -> HttpResponse:
    """GRAFT_SIGNUP decides who may (apps.accounts.signup); an invitation's code comes in its link."""
    code = request.POST.get("invite") or request.GET.get("invite", "")
    form: UserCreationForm[User] = UserCreationForm(request.POST or None)
    try:
        gate = signup_gate(code=code)
        if request.method == "POST" and form.is_valid():
            user = user_signup(form=form, code=code)
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("web:home")
    except UserError as exc:
        if exc.status_code != 403:  # the form's own kind of error (a username taken meanwhile)
            form.add_error(None, exc.message)
            return render(request, "registration/signup.html", {"form": form, "invite": code})
        return render(request, "registration/signup_refused.html", {"message": exc.message}, status=exc.status_code)
    context = {
        "form": form,
        "invite": code if gate is Gate.INVITED else "",
        "first_account": gate is Gate.FIRST_ACCOUNT,
    }
    return render(request, "registration/signup.html", context)


@login_required
def tokens(request: AuthenticatedHttpRequest) -> HttpResponse:
    new_key = None
    if request.method == "POST":
        if "revoke" in request.POST:
            token_id = request.POST["revoke"]
            ApiToken.objects.filter(user=request.user, pk=whole_number(token_id) or -1).delete()
            messages.success(request, "Token revoked. Programs using it can no longer sign in.")
            return redirect("web:tokens")
        _, new_key = token_create(user=request.user, name=request.POST.get("name", "")[:100])
    return render(
        request, "web/tokens.html", {"tokens": ApiToken.objects.filter(user=request.user), "new_key": new_key}
    )


@login_required
def upload(request: AuthenticatedHttpRequest) -> HttpResponse:
    return render(request, "web/upload.html")


@login_required
def dataset_detail(request: AuthenticatedHttpRequest, dataset_id: int) -> HttpResponse:
    dataset = dataset_get(user=request.user, dataset_id=dataset_id)
    return render(request, "web/dataset.html", _dataset_context(dataset))


PAGE_THUMBS = 12  # per class, on the dataset's page (the review page shows every image)


def _page_thumbs(dataset: Dataset) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(class, [(thumbnail URL, member)])]: the first images of each class of the newest version,
    by content, so a relabelled image shows under its new class; a dataset made before versions
    shows the thumbnails stored at its ingestion."""
    head = version_head(dataset) if dataset.status == Dataset.Status.READY else None
    if head is not None and head.manifest:
        shown: dict[str, list[tuple[str, str]]] = {}
        for s in version_index(head).samples:
            row = shown.setdefault(s.label, [])
            if len(row) < PAGE_THUMBS:
                row.append((reverse("web:dataset-image", args=[dataset.pk, s.sha256]), s.member))
        return sorted(shown.items())
    thumbs = dataset.thumbnails
    if not thumbs and dataset.manifest:  # ingested before thumbnails were stored
        thumbs = thumbnail_members(dataset_index(dataset=dataset))
    url = reverse("web:thumb", args=[dataset.pk])
    return [(label, [(f"{url}?m={quote(m)}", m) for m in members]) for label, members in sorted(thumbs.items())]


def _dataset_context(dataset: Dataset, error: str = "") -> dict[str, Any]:
    backbones = available_backbones()
    assessment = dataset.assessment or {}
    return {
        "thumbs": _page_thumbs(dataset),
        "assessment": assessment,
        # The 2x2 matrix in reading order: cell and what runs there (ml.strategy.PLANS).
        "matrix": [(cell, PLAN_REGISTRY[plan].label) for cell, plan in PLANS.items()],
        "dataset": dataset,
        "backbones": sorted(backbones.items()),
        "boundary": SIZE_BOUNDARY,
        "similarity_threshold": SIMILARITY_THRESHOLD,
        "train_error": error,
        # The train form's version choice: the ready ones, newest first (the default).
        "ready_versions": list(
            version_list(dataset=dataset).filter(status=DatasetVersion.Status.READY).only("number", "note")[:200]
        ),
    }


@login_required
def dataset_review(request: AuthenticatedHttpRequest, dataset_id: int) -> HttpResponse:
    """The review gallery of one version (`?v=N`; the newest ready one by default). The page is a
    shell: images, findings and the change set go through the JSON API."""
    dataset = dataset_get(user=request.user, dataset_id=dataset_id)
    versions = list(version_list(dataset=dataset).defer("changes", "warnings"))
    ready = [v for v in versions if v.status == DatasetVersion.Status.READY]
    wanted = request.GET.get("v", "")
    version = next((v for v in ready if str(v.number) == wanted), None) if wanted else None
    if wanted and version is None:
        messages.error(
            request, f"Version {wanted[:12]} of '{dataset.name}' is not there or not ready; showing the newest."
        )
    version = version or (ready[0] if ready else None)
    if version is None:
        messages.error(request, f"'{dataset.name}' has no ready version to review yet.")
        return redirect("web:dataset", dataset_id=dataset.pk)
    return render(
        request,
        "web/review.html",
        {
            "dataset": dataset,
            "version": version,
            "versions": ready,
            "newest": ready[0],
            "finders": FINDER_FILTERS,
        },
    )


@login_required
@require_POST
def dataset_remove(request: AuthenticatedHttpRequest, dataset_id: int) -> HttpResponse:
    dataset = dataset_get(user=request.user, dataset_id=dataset_id)
    name = dataset.name
    try:
        dataset_delete(dataset=dataset)
    except UserError as exc:  # in use by a job or a batch
        messages.error(request, exc.message)
        return redirect("web:dataset", dataset_id=dataset.pk)
    messages.success(request, f"Dataset '{name}' deleted.")
    return redirect("web:home")


@login_required
@require_POST
def model_remove(request: AuthenticatedHttpRequest, model_id: int) -> HttpResponse:
    model = model_get(user=request.user, model_id=model_id)
    name = model.name
    model_delete(model=model)
    messages.success(request, f"Model '{name}' deleted; its prediction endpoint answers 404 from now on.")
    return redirect("web:home")


@login_required
@require_POST
def model_int8(request: AuthenticatedHttpRequest, model_id: int) -> HttpResponse:
    model = model_get(user=request.user, model_id=model_id)
    try:
        int8_request(model=model)
    except UserError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "Its int8 model is queued for a worker; it serves in fp32 meanwhile.")
    return redirect("web:model", model_id=model.pk)


def int8_summary(model: TrainedModel) -> dict[str, str] | None:
    """The int8 step's figures as the model page words them (None before it has run)."""
    c = model.int8
    if model.int8_status not in (TrainedModel.Int8.KEPT, TrainedModel.Int8.REFUSED) or "agreement" not in c:
        return None

    def pct(x: float | None) -> str:
        return "not measured" if x is None else f"{x:.1%}"

    def faster(fp32: float, int8: float) -> str:  # "as fast" below the gain the step's speed rule asks for
        return f"{fp32 / int8:.1f}× faster" if int8 and int8 <= fp32 * (1 - MARGIN) else "as fast"

    fp32, int8 = c["batch_1_ms_fp32"], c["batch_1_ms_int8"]
    speed, passes = f"{faster(fp32, int8)} per image", f"{ms_text(int8)} against {ms_text(fp32)} a pass"
    if c.get("batch_ms_int8") is not None:  # and at the server's batch under load (a step from before: batch 1 only)
        batch, fp32_n, int8_n = c["batch"], c["batch_ms_fp32"], c["batch_ms_int8"]
        speed += f" alone and {faster(fp32_n, int8_n)} in batches of {batch}"
        passes += f" alone, {ms_text(int8_n)} against {ms_text(fp32_n)} a batch of {batch}"
    return {
        "speed": speed,
        "batched": "yes" if c.get("batch_ms_int8") is not None else "",
        "ms": passes,
        "agreement": pct(c["agreement"]),
        "check_images": str(c["check_images"]),
        "val_agreement": pct(c["val_agreement"]),
        "val_int8": pct(c["val_accuracy_int8"]),
        "val_fp32": pct(c["val_accuracy_fp32"]),
        "val_images": str(c["val_images"]),
        "refit_agreement": "" if c.get("refit_agreement") is None else pct(c["refit_agreement"]),
        "no_faster": "yes" if c.get("held") and not c.get("kept") else "",
    }


@login_required
@require_POST
def job_remove(request: AuthenticatedHttpRequest, job_id: int) -> HttpResponse:
    job = job_get(user=request.user, job_id=job_id)
    try:
        job_delete(job=job)
    except UserError as exc:  # still queued or running
        messages.error(request, exc.message)
        return redirect("web:job", job_id=job.pk)
    messages.success(request, f"Training job {job_id} deleted.")
    return redirect("web:home")


@login_required
@require_POST
def train(request: AuthenticatedHttpRequest, dataset_id: int) -> HttpResponse:
    dataset = dataset_get(user=request.user, dataset_id=dataset_id)
    post = request.POST
    try:
        options = posted_options(post)  # ml.config's user options; their bounds are job_create's to check
    except UserError as exc:  # a field that is no number: the page again, saying which
        return render(request, "web/dataset.html", _dataset_context(dataset, exc.message))
    version = post.get("version", "")
    number = whole_number(version)
    if version and number is None:
        return render(request, "web/dataset.html", _dataset_context(dataset, "Choose a version from the list."))
    try:
        job = job_create(owner=request.user, dataset=dataset, version=number, **options)
    except UserError as exc:
        return render(request, "web/dataset.html", _dataset_context(dataset, exc.message), status=exc.status_code)
    return redirect("web:job", job_id=job.pk)


@login_required
@cache_control(private=True, max_age=3600)
def dataset_thumb(request: AuthenticatedHttpRequest, dataset_id: int) -> FileResponse:
    """A thumbnail the dataset's page shows, as stored at ingestion; nothing else.

    A web host never opens the archive to make one (on S3 that reads the whole object into
    memory); the misclassified gallery's thumbnails are stored with the model (`model_thumb`).
    """
    dataset = dataset_get(user=request.user, dataset_id=dataset_id)
    member = request.GET.get("m", "")
    if member not in _members(dataset):
        raise Http404("No such image on this dataset's page.")
    stream = open_if_stored(thumbnail_name(dataset, member))
    if stream is None:
        raise Http404("This image has no stored thumbnail.")
    return FileResponse(stream, content_type="image/jpeg")


@login_required
@cache_control(private=True, max_age=86400, immutable=True)
def dataset_image(request: AuthenticatedHttpRequest, dataset_id: int, sha256: str) -> FileResponse:
    """The thumbnail of one of the dataset's images, named by content (the review gallery's)."""
    dataset = dataset_get(user=request.user, dataset_id=dataset_id)
    if not dataset_has_image(dataset, sha256):
        raise Http404("This dataset has no such image.")
    stream = image_thumbnail(dataset, sha256)
    if stream is None:
        raise Http404("This image has no thumbnail.")
    return FileResponse(stream, content_type="image/jpeg")


def _members(dataset: Dataset) -> frozenset[str]:
    """The members whose thumbnails the dataset's page shows (`_dataset_context`)."""
    if dataset.thumbnails:
        return frozenset(m for shown in dataset.thumbnails.values() for m in shown)
    if not dataset.manifest:
        return frozenset()
    return _members_in_index(dataset.pk, dataset.manifest)


@functools.lru_cache(maxsize=32)
def _members_in_index(dataset_id: int, manifest: str) -> frozenset[str]:
    """Those of a dataset ingested before its thumbnails were listed (its index is immutable once ready)."""
    index = dataset_index(dataset=Dataset.objects.get(pk=dataset_id))
    return frozenset(m for shown in thumbnail_members(index).values() for m in shown)


@login_required
@cache_control(private=True, max_age=3600)
def model_thumb(request: AuthenticatedHttpRequest, model_id: int) -> HttpResponse | FileResponse:
    """A thumbnail of one of the model's misclassified validation images, stored by the worker when
    its job ended (apps.training.gallery); a placeholder for a model trained before that."""
    model = model_get(user=request.user, model_id=model_id)
    member = request.GET.get("m", "")
    if member not in gallery_members(model.metrics):
        raise Http404("No such image in this model's gallery.")
    stream = gallery_open(prefix=model.storage_prefix, member=member)
    if stream is None:
        return HttpResponse(GALLERY_PLACEHOLDER, content_type="image/svg+xml")
    return FileResponse(stream, content_type="image/jpeg")


@login_required
def job_detail(request: AuthenticatedHttpRequest, job_id: int) -> HttpResponse:
    job = job_get(user=request.user, job_id=job_id)
    # What the workers train on, for the waiting words ("a worker", "a GPU worker").
    return render(request, "web/job.html", {"job": job, "graft_device": settings.GRAFT_DEVICE})


@login_required
def model_detail(request: AuthenticatedHttpRequest, model_id: int) -> HttpResponse:
    model = model_get(user=request.user, model_id=model_id)
    # The datasets a batch prediction can run over: the user's ready ones, newest first.
    ready = dataset_list(user=request.user).filter(status=Dataset.Status.READY).only("pk", "name", "num_images")
    return render(
        request,
        "web/model.html",
        {
            "model": model,
            "metrics_json": json.dumps(model.metrics),
            "ready_datasets": ready[:200],
            "int8": int8_summary(model),
            "int8_waited_long": int8_waited_long(model),
            "int8_not_served": int8_not_served_here(model),
        },
    )


@login_required
def batch_detail(request: AuthenticatedHttpRequest, batch_id: int) -> HttpResponse:
    batch = batch_get(user=request.user, batch_id=batch_id)
    return render(request, "web/batch.html", {"batch": batch, "model": batch.model})
