"""The deployment manifests: Kubernetes objects valid against the API's own schemas (offline),
and compose and Kubernetes wired to the same processes and environment."""

from __future__ import annotations

import re
from pathlib import Path

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
    """The variables a generator sets: its literals, or the names in its env file's example."""
    entry = next(g for g in _kustomization()[generator] if g["name"])
    lines = entry.get("literals") or [
        line for f in entry["envs"] for line in _env_file(K8S / f"{f}.example") if not line.startswith("#")
    ]
    return {item.split("=", 1)[0] for item in lines}


def _env_file(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


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


# --- What an operator can trust (issue 19): the build context, users, secrets, nginx, admin ------

# Paths a developer's checkout holds that must never reach the image, and ones the image needs.
LEFT_OUT = [
    "var/secret_key",
    "var/graft.sqlite3",
    "var/graft.sqlite3-wal",
    "var/media/datasets/1/archive.zip",
    "var/broker/queue/msg",
    "var/work/serving/1-abc/model.onnx",
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/django/__init__.py",
    ".git/HEAD",
    ".git/objects/ab/cdef",
    ".env",
    "deploy/k8s/secrets.env",
    "graft.sqlite3",
    "media/datasets/1/archive.zip",
    "apps/__pycache__/settings.cpython-311.pyc",
    "ml/__pycache__/bundle.cpython-311.pyc",
    "apps/serving/graft.sqlite3",
    "apps/.env",
    "frontend/var/secret_key",
    "tests/apps/test_health.py",
    ".schemathesis/default/x.json",
    ".pytest_cache/v/cache/lastfailed",
    ".mypy_cache/3.11/apps/settings.data.json",
    ".ruff_cache/0.6/123",
    "test-artifacts/trace.zip",
    "Makefile",
]


def _dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    """Docker's own reading of a .dockerignore (moby/patternmatcher): comments and blank lines
    skipped, each pattern cleaned and anchored at the context root, `!` for exceptions."""
    import posixpath

    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if keep else line).lstrip("/")
        rules.append((keep, re.compile(_docker_regex(pattern))))
    return rules


def _docker_regex(pattern: str) -> str:
    """`**` any number of folders (even none), `*` and `?` within one name, `[...]` as is."""
    out, i = "^", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return out + "$"


def _left_out(rules: list[tuple[bool, re.Pattern]], path: str) -> bool:
    """Docker's MatchesOrParentMatches: a rule applies to a path or to any folder above it; the
    last rule that applies decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    left_out = False
    for keep, regex in rules:
        if any(regex.match(c) for c in candidates):
            left_out = not keep
    return left_out


def test_the_dockerignore_reader_follows_dockers_documented_examples():
    rules = _dockerignore_rules("# comment\n*/temp*\n*/*/temp*\ntemp?\n**/*.go\n*.md\n!README*.md\nREADME-secret.md\n")
    assert _left_out(rules, "somedir/temporary.txt") and _left_out(rules, "somedir/subdir/temporary.txt")
    assert _left_out(rules, "tempa") and not _left_out(rules, "temp") and not _left_out(rules, "temporary.txt")
    assert _left_out(rules, "a/b/c/main.go") and _left_out(rules, "main.go")
    assert _left_out(rules, "CHANGES.md") and not _left_out(rules, "README.md") and _left_out(rules, "README-secret.md")
    # Anchored at the root, unlike .gitignore: "var" does not leave out apps/var.
    assert _left_out(_dockerignore_rules("var\n"), "var/x") and not _left_out(
        _dockerignore_rules("var\n"), "apps/var/x"
    )


def test_the_build_context_leaves_out_var_the_venv_git_and_secrets_and_keeps_the_code():
    rules = _dockerignore_rules((ROOT / ".dockerignore").read_text())
    kept = [path for path in LEFT_OUT if not _left_out(rules, path)]
    assert not kept, f"these would be sent to the builder: {kept}"
    needed = ["manage.py", "requirements.txt"] + [
        str(f.relative_to(ROOT))
        for folder in ("apps", "ml", "frontend")
        for f in (ROOT / folder).rglob("*")
        if f.is_file() and "__pycache__" not in f.parts
    ]
    missing = [path for path in needed if _left_out(rules, path)]
    assert not missing, f"the image needs these: {missing}"


def _image_user() -> int:
    """The numeric UID the image's processes run as: the last USER of the last stage."""
    lines = (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
    stage = lines[max(i for i, line in enumerate(lines) if line.upper().startswith("FROM ")) :]
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", "\n".join(stage), re.M))
    users = [line.split(None, 1)[1] for line in stage if line.upper().startswith("USER ")]
    assert users, "the image runs as root: no USER"
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    assert user.isdigit(), f"USER {user}: name the UID, so that Kubernetes can check runAsNonRoot"
    return int(user)


def test_the_image_runs_as_a_fixed_unprivileged_user():
    assert _image_user() >= 1000
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    # The code stays root's (the app cannot rewrite itself); the scratch folder is the user's.
    assert "--chown" not in dockerfile and "-o graft -g graft" in dockerfile and "GRAFT_DATA_DIR=/scratch" in dockerfile


def _pod_specs() -> list[tuple[str, dict]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
        for o in _objects()
        if "template" in o.get("spec", {})
    ]


@pytest.mark.parametrize("name,pod", _pod_specs(), ids=[name for name, _ in _pod_specs()])
def test_every_pod_runs_as_the_images_user_without_privileges_on_a_read_only_root(name, pod):
    ctx = pod.get("securityContext", {})
    assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser") == _image_user(), name
    assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, name
    assert pod.get("automountServiceAccountToken") is False, name
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, (name, container["name"])
        assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add")
        assert sc.get("readOnlyRootFilesystem") is True and not sc.get("privileged"), (name, container["name"])
        assert sc.get("runAsUser", _image_user()) != 0
        # A read-only root: the process writes to its scratch (GRAFT_DATA_DIR) and to /tmp only.
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert {"/scratch", "/tmp"} <= set(mounts) and set(mounts.values()) <= volumes, (name, mounts)


SECRET_VARIABLES = {"SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"}


def test_compose_requires_every_secret_and_has_no_working_placeholder():
    text = (ROOT / "deploy" / "compose.yml").read_text()
    for name, operator in re.findall(r"\$\{(\w+)(:?[-?+])?", text):
        if name in SECRET_VARIABLES:
            assert operator == ":?", f"${{{name}}} must be required (${{{name}:?message}}), not defaulted"
    compose = yaml.safe_load(text)
    values = yaml.safe_dump(compose)  # what compose reads, without the comments
    assert not re.search(r"change-?me|graft-secret|PASSWORD: graft\b|graft:graft@", values, re.I)
    env = compose["x-graft"]["environment"]
    assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"]
    assert "${REDIS_PASSWORD:?" in env["CELERY_BROKER_URL"] and "${REDIS_PASSWORD:?" in env["CACHE_URL"]
    redis = compose["services"]["redis"]
    assert redis["command"][:2] == ["redis-server", "--requirepass"] and "REDIS_PASSWORD:?" in redis["command"][2]
    # Containers of the app: the image's user, no capabilities, no privilege gained.
    assert compose["x-graft"]["cap_drop"] == ["ALL"] and "no-new-privileges:true" in compose["x-graft"]["security_opt"]


def test_compose_gives_seaweedfs_one_s3_identity_from_the_environment():
    """With identities configured SeaweedFS refuses anonymous and wrongly signed requests (403):
    the identity holds the same keys the app signs with."""
    import json

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yml").read_text())
    s3 = compose["services"]["s3"]
    target = s3["configs"][0]["target"]
    assert f"-s3.config={target}" in s3["command"] and s3["configs"][0]["source"] == "s3-identities"
    content = compose["configs"]["s3-identities"]["content"]
    rendered = json.loads(re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"<{m.group(1)}>", content))
    (identity,) = rendered["identities"]
    assert identity["credentials"] == [{"accessKey": "<S3_ACCESS_KEY>", "secretKey": "<S3_SECRET_KEY>"}]
    env = compose["x-graft"]["environment"]
    assert env["AWS_ACCESS_KEY_ID"].startswith("${S3_ACCESS_KEY:?")
    assert env["AWS_SECRET_ACCESS_KEY"].startswith("${S3_SECRET_KEY:?")
    assert "anonymous" not in content.lower()


def test_the_kubernetes_secrets_come_from_a_file_that_is_never_committed():
    entry = next(g for g in _kustomization()["secretGenerator"] if g["name"] == "graft-secrets")
    assert "literals" not in entry and entry["envs"] == ["secrets.env"]
    assert "secrets.env" in (K8S / ".gitignore").read_text().split()


def _load_settings(tmp_path, **env: str):
    """Load apps.settings in a fresh interpreter, as a production process would."""
    import os
    import subprocess
    import sys

    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GRAFT_DATA_DIR": str(tmp_path)}
    code = "import django; from django.conf import settings; print(settings.SECRET_KEY and 'loaded')"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "apps.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


GOOD_KEY = "Xq3v9-LkZp0r7TtYw2NcB8sHd4JmGfUe6aR1oIiPyQxV5"


@pytest.mark.parametrize(
    "env,named",
    [
        ({"SECRET_KEY": "change-me"}, "SECRET_KEY"),
        ({"SECRET_KEY": "a-random-but-short-key-123"}, "SECRET_KEY"),
        ({"SECRET_KEY": "changeme-changeme-changeme-changeme-changeme"}, "SECRET_KEY"),
        ({"SECRET_KEY": "django-insecure-" + GOOD_KEY}, "SECRET_KEY"),
        ({"DATABASE_URL": "postgres://graft:change-me@postgres:5432/graft"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgres://graft:graft@db:5432/graft"}, "DATABASE_URL"),
        ({"CELERY_BROKER_URL": "redis://:change-me@redis:6379/0"}, "CELERY_BROKER_URL"),
        ({"CACHE_URL": "redis://:changeme@redis:6379/1"}, "CACHE_URL"),
        ({"AWS_SECRET_ACCESS_KEY": "graft-secret"}, "AWS_SECRET_ACCESS_KEY"),
        ({"AWS_SECRET_ACCESS_KEY": "change-me"}, "AWS_SECRET_ACCESS_KEY"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_production_settings_refuse_placeholder_secrets(tmp_path, env, named):
    out = _load_settings(tmp_path, **{"SECRET_KEY": GOOD_KEY, **env})
    assert out.returncode != 0 and "ImproperlyConfigured" in out.stderr, out.stdout + out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert named in message
    secret = next(iter(env.values()))
    assert secret not in message or re.fullmatch("change-?me", secret)  # named, never printed


def test_the_kubernetes_example_secrets_are_refused_as_they_are(tmp_path):
    example = dict(line.split("=", 1) for line in _env_file(K8S / "secrets.env.example") if not line.startswith("#"))
    out = _load_settings(tmp_path, **example)
    assert out.returncode != 0 and "ImproperlyConfigured" in out.stderr, out.stdout + out.stderr


def test_real_secrets_load_and_development_keeps_its_placeholders(tmp_path):
    good = _load_settings(
        tmp_path,
        SECRET_KEY=GOOD_KEY,
        DATABASE_URL="postgres://graft:9f8e7d6c5b4a39281706f5e4d3c2b1a0@db:5432/graft",
        CELERY_BROKER_URL="redis://:0a1b2c3d4e5f60718293a4b5c6d7e8f9@redis:6379/0",
        AWS_SECRET_ACCESS_KEY="wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
    )
    assert good.returncode == 0 and "loaded" in good.stdout, good.stderr
    dev = _load_settings(tmp_path, DEBUG="true", SECRET_KEY="change-me")
    assert dev.returncode == 0 and "loaded" in dev.stdout, dev.stderr


@pytest.mark.parametrize(
    "env,mounted",
    [({}, False), ({"GRAFT_ADMIN": "true"}, True), ({"DEBUG": "true"}, True)],
    ids=["production", "asked-for", "debug"],
)
def test_the_admin_is_mounted_only_when_a_setting_says_so(tmp_path, env, mounted):
    import os
    import subprocess
    import sys

    code = (
        "import django; django.setup()\n"
        "from django.urls import Resolver404, resolve\n"
        "try:\n    resolve('/admin/login/'); print('mounted')\n"
        "except Resolver404:\n    print('absent')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "GRAFT_DATA_DIR": str(tmp_path),
            "DJANGO_SETTINGS_MODULE": "apps.settings",
            "SECRET_KEY": GOOD_KEY,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == ("mounted" if mounted else "absent")


# --- nginx: per-path limits equal to the app's, small bodies buffered, JSON 413 on /api/ ---------

UPLOAD_PATHS = [
    "/api/v1/datasets/",
    "/api/v1/uploads/3f2c9a6e-1b7d-4c55-9a8e-0d5b7c1e2f40/",
    "/api/v1/models/7/batch/",
    "/api/v1/datasets/3/versions/",
]
OTHER_PATHS = [
    "/accounts/login/",
    "/accounts/signup/",
    "/api/v1/auth/token/",
    "/api/v1/uploads/",
    "/api/v1/jobs/",
    "/api/v1/models/7/predict/",
    "/api/v1/projects/7/predict/",
    "/datasets/3/train/",
]


def _nginx_server() -> tuple[dict[str, list[str]], list[tuple[str, str, dict[str, list[str]]]]]:
    """deploy/nginx.conf's server block: its own directives, and (modifier, path, directives) per location."""
    text = re.sub(r"#[^\n]*", "", (ROOT / "deploy" / "nginx.conf").read_text())
    server = text[text.index("server {") :]
    locations = []
    for m in re.finditer(r"location\s+(=|~|\^~)?\s*(\S+)\s*\{([^}]*)\}", server):
        locations.append((m.group(1) or "", m.group(2), _directives(m.group(3))))
    own = re.sub(r"location\s+[^{]*\{[^}]*\}", "", server[server.index("{") + 1 :])
    return _directives(own), locations


def _directives(body: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for statement in body.split(";"):
        words = statement.split()
        if words:
            out.setdefault(words[0], []).append(" ".join(words[1:]))
    return out


def _nginx_location(path: str, locations) -> dict[str, list[str]]:
    """nginx's choice: an exact match; else the longest prefix, unless a regex (in order) matches."""
    for modifier, where, directives in locations:
        if modifier == "=" and where == path:
            return directives
    prefixes = [
        (len(w), d) for m, w, d in locations if m in ("", "^~") and path.startswith(w) and not w.startswith("@")
    ]
    for modifier, where, directives in locations:
        if modifier == "~" and re.search(where, path):
            return directives
    return max(prefixes, key=lambda p: p[0])[1]


def _nginx_size(value: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].lower() in units else int(value)


@pytest.mark.parametrize("path", UPLOAD_PATHS + OTHER_PATHS)
def test_nginx_limits_each_path_to_the_apps_own_limit_and_streams_only_uploads(path):
    from apps.common.limits import body_limit

    server, locations = _nginx_server()
    directives = _nginx_location(path, locations)
    limit = (directives.get("client_max_body_size") or server["client_max_body_size"])[-1]
    assert _nginx_size(limit) == body_limit(path), f"{path}: nginx {limit}, the app {body_limit(path)}"
    buffering = (directives.get("proxy_request_buffering") or server.get("proxy_request_buffering") or ["on"])[-1]
    assert buffering == ("off" if path in UPLOAD_PATHS else "on"), path
    if path.startswith("/api/"):
        assert directives.get("error_page") == ["413 = @api_too_large"], path


def test_nginx_drops_stalled_bodies_and_answers_json_413_with_the_apps_limits():
    from apps.common.limits import body_limit, human_bytes

    server, locations = _nginx_server()
    assert _nginx_size(server["client_body_buffer_size"][0]) >= body_limit("/accounts/login/")
    assert server["client_body_timeout"][0].endswith("s") and int(server["client_body_timeout"][0][:-1]) <= 60
    named = next(d for _, where, d in locations if where == "@api_too_large")
    assert named["default_type"] == ["application/json"] and named["return"][0].startswith("413 ")
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    table = dict(re.findall(r"^\s*(default|~\S+)\s+(\d+);", text, re.M))
    words = dict(re.findall(r'^\s*(default|\d+)\s+"([^"]+)";', text, re.M))
    for path in UPLOAD_PATHS + OTHER_PATHS:
        key = next((k for k in table if k != "default" and re.search(k[1:], path)), "default")
        assert int(table[key]) == body_limit(path), path
        assert words.get(table[key], words["default"]) == human_bytes(body_limit(path)), path


@pytest.fixture
def nginx_in_front(tmp_path):
    """deploy/nginx.conf run by a real nginx (where one is installed) in front of a stub web host
    that records which requests reach it. Yields (base URL, paths the stub saw)."""
    import http.server
    import os
    import shutil
    import socket
    import subprocess
    import threading
    import time

    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        pytest.skip("nginx is not installed here (apt-get install nginx-light)")
    seen: list[str] = []

    class WebHost(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PATCH = _answer

        def log_message(self, *args) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WebHost)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    site = site.replace("server web-1:8000;", f"server 127.0.0.1:{upstream.server_port};").replace(
        "server web-2:8000;", ""
    )
    (tmp_path / "site.conf").write_text(site.replace("listen 80;", f"listen 127.0.0.1:{port};"))
    (tmp_path / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; worker_processes 1;\n"
        + "events {}\n"
        + f"http {{ access_log off; client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;"
        + f" include {tmp_path}/site.conf; }}\n"
    )
    proc = subprocess.Popen(
        [nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path), "-e", str(tmp_path / "error.log")],
        stderr=subprocess.PIPE,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"nginx did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", seen
    proc.terminate()
    proc.wait(10)
    upstream.shutdown()


def test_a_real_nginx_answers_json_413s_with_the_apps_limits_and_holds_slow_small_bodies(nginx_in_front):
    import socket
    import time

    import requests

    from apps.common.limits import body_limit, human_bytes

    base, seen = nginx_in_front
    for path in [p for p in UPLOAD_PATHS + OTHER_PATHS if p.startswith("/api/")]:
        limit = body_limit(path)
        # Only the header: nginx refuses on Content-Length alone, before a byte of the body.
        r = requests.post(base + path, headers={"Content-Length": str(limit + 1)}, data=b"", timeout=10)
        assert r.status_code == 413 and r.headers["Content-Type"] == "application/json", (path, r.text[:200])
        assert r.json() == {
            "error": f"The request body is larger than the limit of {human_bytes(limit)} for this path.",
            "limit_bytes": limit,
        }
    assert requests.post(base + "/accounts/login/", data=b"x" * (body_limit("/accounts/login/") + 1)).status_code == 413
    assert not seen

    host, port = base.removeprefix("http://").split(":")

    def start_slow_body(path: str) -> socket.socket:
        s = socket.create_connection((host, int(port)))
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() + b"a" * 10)
        return s

    slow = [start_slow_body("/api/v1/auth/token/"), start_slow_body("/api/v1/datasets/")]
    time.sleep(1)
    # The sign-in's body is still arriving: no web host thread waits for it. The upload streams.
    assert seen == ["/api/v1/datasets/"]
    for s in slow:
        s.close()


# --- make test: what scripts/test.sh starts, it stops -------------------------------------------

STUB_SERVICES = """
import socket, sys, time
held = []
for port in (5432, 6379):  # PostgreSQL and Redis "up", so that only the S3 server gets started
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    held.append(s)
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.slow  # about 20 s: SeaweedFS starts, and is given 5 s to stop
def test_make_test_stops_the_seaweedfs_it_started(tmp_path):
    """scripts/test.sh in a network namespace of its own (nothing on 8333 there, so it starts a
    weed server), running `pytest --version`: once it has ended, no weed server of its is left."""
    import os
    import shutil
    import subprocess

    weed = ROOT / ".venv" / "bin" / "weed"
    if not weed.exists() or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs .venv/bin/weed, unshare and ip")
    if subprocess.run(["unshare", "-rnm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unprivileged network and mount namespaces are not available here")
    # A /tmp of its own as well: weed puts its gRPC sockets in /tmp whatever TMPDIR says, under names
    # that depend only on the ports, and removes them when it stops: on the shared /tmp that removed
    # the sockets of the suite's own SeaweedFS (same default ports), which then failed every request.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    script = (
        f"mount --bind {private_tmp} /tmp\n"
        "ip link set lo up\n"
        f"{shutil.which('python3') or 'python3'} -c '{STUB_SERVICES}' 120 & stub=$!\n"
        "sleep 0.5\n"
        'scripts/test.sh --version; echo "test.sh exited $?"\n'
        "kill $stub\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "CI": ""}
    out = subprocess.run(
        ["unshare", "-rnm", "bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    try:
        assert "starting SeaweedFS" in out.stdout and "test.sh exited 0" in out.stdout, out.stdout + out.stderr
        left = subprocess.run(["pgrep", "-f", f"weed server.*{tmp_path}"], capture_output=True, text=True).stdout
        assert not left.split(), f"weed servers left running: {left}"
    finally:
        for pid in subprocess.run(
            ["pgrep", "-f", f"weed server.*{tmp_path}"], capture_output=True, text=True
        ).stdout.split():
            os.kill(int(pid), 9)
