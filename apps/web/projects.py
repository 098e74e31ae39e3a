"""The project pages: the dashboard of projects, a project's timeline, two models compared, and
the label queue. Thin: apps.serving.projects, .compare and .labelling do the work; the label
queue's page is a shell over the JSON API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.paginator import Paginator
from django.db.models import Prefetch, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.views.decorators.http import require_POST

from apps.accounts.quotas import usage
from apps.common.errors import UserError
from apps.common.requests import AuthenticatedHttpRequest, whole_number
from apps.datasets.models import Dataset, DatasetVersion
from apps.serving.compare import models_compare
from apps.serving.labelling import label_queue
from apps.serving.models import TrainedModel
from apps.serving.projects import model_publish, model_unpublish, project_get, project_list, project_published
from apps.serving.selectors import model_get, model_list
from apps.serving.services import model_delete
from apps.training.models import Job
from apps.training.selectors import job_list
from apps.training.services import job_retrain

ACTIVE = (Job.Status.QUEUED, Job.Status.RUNNING)
DASHBOARD_VERSIONS = 3  # per project on the dashboard; the project page shows them all
DASHBOARD_PROJECTS, DASHBOARD_JOBS, DASHBOARD_MODELS = 50, 8, 6  # the newest; "All" pages list the rest
ALL_PAGE = 50  # rows a page on the "All" pages


@dataclass
class VersionRow:
    """One version of a project with what was trained on it, newest first."""

    version: DatasetVersion | None  # None: models trained before versions were kept
    models: list[TrainedModel] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)  # queued or running on it


def _versions() -> Prefetch[str, QuerySet[DatasetVersion]]:
    heavy = ("changes", "warnings", "classes", "findings_summary", "manifest", "archive")
    return Prefetch("versions", queryset=DatasetVersion.objects.defer(*heavy).order_by("-number"))


def _models() -> Prefetch[str, QuerySet[TrainedModel]]:
    return Prefetch(
        "trained_models", queryset=TrainedModel.objects.select_related("job").order_by("-created_at", "-pk")
    )


def _active_jobs() -> Prefetch[str, QuerySet[Job], str]:
    return Prefetch("jobs", queryset=Job.objects.filter(status__in=ACTIVE).order_by("-created_at"), to_attr="active")


def _timeline(project: Dataset) -> list[VersionRow]:
    """Versions newest first, each with its models (newest first, each with the accuracy change
    from the model trained before it) and the jobs training on it now."""
    models = list(project.trained_models.all())  # prefetched, newest first
    for i, m in enumerate(models):
        older = models[i + 1] if i + 1 < len(models) else None
        accuracy = m.metrics.get("val_accuracy")
        before = older.metrics.get("val_accuracy") if older else None
        change = accuracy - before if isinstance(accuracy, int | float) and isinstance(before, int | float) else None
        m.accuracy_text = _figure(accuracy, percent=True)  # type: ignore[attr-defined]
        m.delta_text = _delta(change, percent=True)  # type: ignore[attr-defined]
    versions = list(project.versions.all())
    for v in versions:
        v.change_text = _change_text(v)  # type: ignore[attr-defined]
    rows = {v.pk: VersionRow(v) for v in versions}
    loose = VersionRow(None)
    for m in models:
        rows.get(m.version_id or -1, loose).models.append(m)
    for j in getattr(project, "active", []):
        rows.get(j.version_id or -1, loose).jobs.append(j)
    return [*rows.values(), *([loose] if loose.models or loose.jobs else [])]


def _change_text(v: DatasetVersion) -> str:
    if v.number == 1:
        return "upload"
    summary = v.summary or {}
    parts = [f"{summary[k]} {k}" for k in ("added", "relabelled", "removed") if summary.get(k)]
    return ", ".join(parts) or "no changes"


def _projects(user: User) -> QuerySet[Dataset]:
    return project_list(user=user).prefetch_related(_versions(), _models(), _active_jobs()).order_by("-created_at")


def dashboard(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return render(request, "web/landing.html")
    user = request.user
    projects = []
    for p in _projects(user)[:DASHBOARD_PROJECTS]:
        timeline = _timeline(p)
        models = [m for row in timeline for m in row.models]
        projects.append(
            {
                "project": p,
                "timeline": timeline[:DASHBOARD_VERSIONS],
                "more_versions": max(0, len([r for r in timeline if r.version]) - DASHBOARD_VERSIONS),
                "num_models": len(models),
                "published": next((m for m in models if m.published), None),
                "training": sum(len(r.jobs) for r in timeline),
            }
        )
    return render(
        request,
        "web/dashboard.html",
        {
            "projects": projects,
            "jobs": job_list(user=user).select_related("dataset")[:DASHBOARD_JOBS],
            "models": model_list(user=user).select_related("dataset")[:DASHBOARD_MODELS],
            "counts": {
                "projects": project_list(user=user).count(),
                "jobs": job_list(user=user).count(),
                "models": model_list(user=user).count(),
            },
            "shown": {"projects": DASHBOARD_PROJECTS, "jobs": DASHBOARD_JOBS, "models": DASHBOARD_MODELS},
            "usage": usage(user),
            "quota": {
                "open_uploads": settings.GRAFT_QUOTA_OPEN_UPLOADS,
                "active_jobs": settings.GRAFT_QUOTA_ACTIVE_JOBS,
                "datasets": settings.GRAFT_QUOTA_DATASETS,
            },
        },
    )


@login_required
def project_detail(request: AuthenticatedHttpRequest, project_id: int) -> HttpResponse:
    project = project_get(user=request.user, project_id=project_id)
    project = _projects(request.user).get(pk=project.pk)
    timeline = _timeline(project)
    models = [m for row in timeline for m in row.models]
    compare = request.GET.get("compare", "")
    return render(
        request,
        "web/project.html",
        {
            "project": project,
            "timeline": timeline,
            "num_models": len(models),
            "published": next((m for m in models if m.published), None),
            "newest_version": next((r.version for r in timeline if r.version), None),
            "waiting": label_queue(project).count(),
            "predict_url": request.build_absolute_uri(reverse("api:project-predict", args=[project.pk])),
            "compare_with": whole_number(compare),
        },
    )


def _project_model(request: AuthenticatedHttpRequest, project: Dataset, raw: str) -> TrainedModel:
    model = model_get(user=request.user, model_id=whole_number(raw) or -1)
    if model.dataset_id != project.pk:
        raise UserError(f"Model '{model.name}' belongs to another project.", status_code=409)
    return model


@login_required
@require_POST
def project_publish(request: AuthenticatedHttpRequest, project_id: int) -> HttpResponse:
    """`model`: the one to publish; empty unpublishes the project's published model."""
    project = project_get(user=request.user, project_id=project_id)
    try:
        if request.POST.get("model"):
            model = model_publish(model=_project_model(request, project, request.POST["model"]))
            messages.success(request, f"'{model.name}' now answers at the project's prediction URL.")
        else:
            current = project_published(project)
            if current is not None:
                model_unpublish(model=current)
            messages.success(
                request, "Unpublished: the project's prediction URL answers 404 until you publish a model."
            )
    except UserError as exc:
        messages.error(request, exc.message)
    return redirect("web:project", project_id=project.pk)


@login_required
@require_POST
def project_model_remove(request: AuthenticatedHttpRequest, project_id: int, model_id: int) -> HttpResponse:
    project = project_get(user=request.user, project_id=project_id)
    try:
        model = _project_model(request, project, str(model_id))
    except UserError as exc:
        messages.error(request, exc.message)
        return redirect("web:project", project_id=project.pk)
    name, was_published = model.name, model.published
    model_delete(model=model)
    after = " The project's URL answers 404 until you publish another." if was_published else ""
    messages.success(request, f"Model '{name}' deleted, with its bundle and prediction log.{after}")
    return redirect("web:project", project_id=project.pk)


@login_required
@require_POST
def project_retrain(request: AuthenticatedHttpRequest, project_id: int) -> HttpResponse:
    """Train again with a model's options (those of the job it came from) on the newest version."""
    project = project_get(user=request.user, project_id=project_id)
    try:
        model = _project_model(request, project, request.POST.get("model", ""))
        if model.job is None:
            raise UserError(
                f"The training job of '{model.name}' was deleted, so its options are gone; "
                "train from the dataset's page instead."
            )
        job = job_retrain(job=model.job)
    except UserError as exc:
        messages.error(request, exc.message)
        return redirect("web:project", project_id=project.pk)
    return redirect("web:job", job_id=job.pk)


@login_required
def project_label(request: AuthenticatedHttpRequest, project_id: int) -> HttpResponse:
    project = project_get(user=request.user, project_id=project_id)
    newest = project_list(user=request.user).filter(pk=project.pk).prefetch_related(_models()).get()
    models = list(newest.trained_models.all())
    # Retrain after labelling: with the published model's options, else the newest model's.
    retrain = next((m for m in models if m.published and m.job_id), None) or next((m for m in models if m.job_id), None)
    return render(
        request,
        "web/label.html",
        {"project": project, "classes": [c["name"] for c in project.classes], "retrain_model": retrain},
    )


# --- compare --------------------------------------------------------------------------------------

# (key, label, higher is better, shown as a percent)
METRICS = (
    ("val_accuracy", "Validation accuracy", True, True),
    ("macro_f1", "Macro-F1", True, True),
    ("val_loss", "Validation loss", False, False),
    ("ece", "Calibration error", False, True),
)


def _figure(value: Any, percent: bool) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _delta(value: Any, percent: bool, higher_better: bool = True) -> dict[str, str]:
    """A difference with its sign, and whether it is better (green) or worse (red)."""
    if not isinstance(value, int | float):
        return {"text": "", "tone": ""}
    shown = 100 * value if percent else value
    text = f"{shown:+.1f} pts" if percent else f"{shown:+.3f}"
    if abs(shown) < (0.05 if percent else 0.0005):
        return {"text": "±0" if percent else "±0.000", "tone": "same"}
    better = (value > 0) == higher_better
    return {"text": text.replace("-", "−"), "tone": "better" if better else "worse"}


def _heatmap(classes: list[str], matrix: list[list[int]] | None) -> dict[str, Any] | None:
    """The confusion matrix as the job page draws it: diagonal green, errors red, by row share."""
    if not matrix:
        return None
    rows = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        cells = []
        for j, n in enumerate(row):
            share = n / total
            alpha = 0.15 + 0.75 * share if (i == j or share) else 0
            colour = "47,158,110" if i == j else "217,87,61"
            style = f"background: rgba({colour},{alpha:.2f});" + (" color: #fff;" if share > 0.55 else "")
            true, guess = classes[i] if i < len(classes) else "?", classes[j] if j < len(classes) else "?"
            cells.append({"n": n, "style": style, "title": f"{n} of {total} '{true}' images predicted '{guess}'"})
        rows.append({"label": classes[i] if i < len(classes) else "?", "cells": cells})
    return {"classes": classes, "rows": rows}


def _changed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        with_image = r.get("model_with_image")
        r["thumb"] = f"{reverse('web:model-thumb', args=[with_image])}?m={_quote(r['file'])}" if with_image else None
    return rows


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


@login_required
def models_compare_page(request: AuthenticatedHttpRequest) -> HttpResponse:
    ids = [whole_number(request.GET.get("a", "")), whole_number(request.GET.get("b", ""))]
    if None in ids:
        messages.error(request, "Pick two models to compare: tick two on a project's page.")
        return redirect("web:home")
    a, b = (model_get(user=request.user, model_id=i or -1) for i in ids)
    try:
        body = models_compare(a, b)
    except UserError as exc:
        messages.error(request, exc.message)
        return redirect("web:project", project_id=a.dataset_id) if a.dataset_id else redirect("web:home")
    deltas = body["deltas"]
    metrics = [
        {
            "label": label,
            "a": _figure(a.metrics.get(key), percent),
            "b": _figure(b.metrics.get(key), percent),
            "delta": _delta(deltas.get(key), percent, higher),
        }
        for key, label, higher, percent in METRICS
    ]
    per_class = [
        {
            **row,
            "a_f1_text": _figure(row.get("a_f1"), True),
            "b_f1_text": _figure(row.get("b_f1"), True),
            "a_recall_text": _figure(row.get("a_recall"), True),
            "b_recall_text": _figure(row.get("b_recall"), True),
            "delta": _delta(row.get("delta_f1"), True),
        }
        for row in body["per_class"]
    ]
    return render(
        request,
        "web/compare.html",
        {
            "a": a,
            "b": b,
            "accuracy_delta": _delta(deltas.get("val_accuracy"), True),
            "metrics": metrics,
            "per_class": per_class,
            "confusion_a": _heatmap(body["confusion"]["a"]["classes"], body["confusion"]["a"]["matrix"]),
            "confusion_b": _heatmap(body["confusion"]["b"]["classes"], body["confusion"]["b"]["matrix"]),
            "compared_images": body["compared_images"],
            "fixed": _changed(body["fixed"]),
            "broken": _changed(body["broken"]),
            "still_wrong": _changed(body["still_wrong"]),
            "same_project": a.dataset_id is not None and a.dataset_id == b.dataset_id,
        },
    )


ALL_KINDS = {
    "projects": ("Projects", "No projects yet."),
    "models": ("Models", "No models yet."),
    "jobs": ("Training jobs", "No training jobs yet."),
}


@login_required
def all_items(request: AuthenticatedHttpRequest, kind: str) -> HttpResponse:
    """Everything of one kind, newest first, a page at a time: what the dashboard's short lists
    leave out stays reachable (to open, compare or delete)."""
    if kind not in ALL_KINDS:
        raise Http404("No such list.")
    user = request.user
    rows: QuerySet[Any] = {
        "projects": project_list(user=user).order_by("-created_at"),
        "models": model_list(user=user).select_related("dataset").order_by("-created_at"),
        "jobs": job_list(user=user).select_related("dataset").order_by("-created_at"),
    }[kind]
    page = Paginator(rows, ALL_PAGE).get_page(request.GET.get("page"))  # a page past the last: the last
    title, empty = ALL_KINDS[kind]
    return render(request, "web/all.html", {"kind": kind, "title": title, "empty": empty, "page": page})


urlpatterns = [
    path("all/<str:kind>/", all_items, name="all"),
    path("projects/<int:project_id>/", project_detail, name="project"),
    path("projects/<int:project_id>/publish/", project_publish, name="project-publish"),
    path("projects/<int:project_id>/retrain/", project_retrain, name="project-retrain"),
    path("projects/<int:project_id>/label/", project_label, name="project-label"),
    path("projects/<int:project_id>/models/<int:model_id>/delete/", project_model_remove, name="project-model-delete"),
    path("models/compare/", models_compare_page, name="compare"),
]
