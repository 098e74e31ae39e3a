"""The deployment manifests: Kubernetes objects valid against the API's own schemas (offline),
and compose and Kubernetes wired to the same processes and environment."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _objects() -> list[dict]:
    return [d for f in _kustomization()["resources"] for d in yaml.safe_load_all((K8S / f).read_text()) if d]


def _by_kind(kind: str, name: str) -> dict:
    return next(o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name)


def _env_names(generator: str) -> set[str]:
    literals = next(g for g in _kustomization()[generator] if g["name"])["literals"]
    return {item.split("=", 1)[0] for item in literals}


@pytest.mark.parametrize("obj", _objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_each_kubernetes_object_is_valid_against_the_api_schema(obj):
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_web_pods_have_readiness_on_dependencies_and_liveness_on_the_process():
    container = _by_kind("Deployment", "graft-web")["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready/"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live/"


def test_gpu_workers_ask_for_a_gpu_and_recycle_their_child_after_each_job():
    container = _by_kind("Deployment", "graft-gpu-worker")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    command = " ".join(container["command"])
    assert "-Q gpu" in command and "--max-tasks-per-child 1" in command and "--concurrency 1" in command


def test_one_beat_and_a_migration_job_that_creates_the_bucket():
    worker = _by_kind("Deployment", "graft-worker")
    assert worker["spec"]["replicas"] == 1 and " -B " in " ".join(
        worker["spec"]["template"]["spec"]["containers"][0]["command"]
    )
    job = " ".join(_by_kind("Job", "graft-migrate")["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "migrate" in job and "ensure_bucket" in job


def test_kubernetes_and_compose_set_the_same_variables_and_the_settings_read_them_all():
    k8s = _env_names("configMapGenerator") | _env_names("secretGenerator")
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yml").read_text())
    env = set(compose["x-graft"]["environment"])
    assert k8s == env
    settings_source = (ROOT / "apps" / "settings.py").read_text()
    read = set(re.findall(r'env\.\w+\("([A-Z0-9_]+)"', settings_source)) | {"DATABASE_URL"}
    assert env <= read, env - read


def test_compose_runs_two_web_hosts_a_gpu_worker_per_gpu_and_an_s3_server():
    services = yaml.safe_load((ROOT / "deploy" / "compose.yml").read_text())["services"]
    assert {"db", "redis", "s3", "migrate", "web-1", "web-2", "worker", "gpu-0", "nginx"} <= set(services)
    gpu = services["gpu-0"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]
    assert "--max-tasks-per-child 1" in gpu["command"] and "-n gpu0@" in gpu["command"]
    assert " -B " in services["worker"]["command"]


def test_the_readme_production_settings_pass_djangos_deploy_checks_without_a_warning(tmp_path):
    """`manage.py check --deploy` with the environment 'Running on many machines' sets."""
    import os
    import secrets
    import subprocess
    import sys

    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "DJANGO_SETTINGS_MODULE": "apps.settings",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "GRAFT_DATA_DIR": str(tmp_path),
        "DATABASE_URL": "postgres://graft:pw@db:5432/graft",
        "CELERY_BROKER_URL": "redis://redis:6379/0",
        "AWS_STORAGE_BUCKET_NAME": "graft",
        "AWS_S3_ENDPOINT_URL": "http://s3:8333",
        "GRAFT_HTTPS": "true",
        "ALLOWED_HOSTS": "graft.example.org",
        "CSRF_TRUSTED_ORIGINS": "https://graft.example.org",
    }
    out = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "no issues" in out.stdout, out.stdout + out.stderr
