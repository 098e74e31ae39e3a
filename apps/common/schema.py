"""The OpenAPI schema says what the API really answers: every error is `{error: ...}` JSON,
with the statuses each kind of operation can give (drf-spectacular postprocessing hook)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from drf_spectacular.utils import OpenApiParameter

if TYPE_CHECKING:
    from drf_spectacular.generators import SchemaGenerator
    from rest_framework.request import Request

ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string", "description": "what went wrong, in a sentence"}},
    "required": ["error"],
    "additionalProperties": True,  # details: the file at fault, a limit, per-field messages
}

# Any operation: malformed (400), no or bad credentials (401), not allowed (403), no such
# object (404), body over its limit (413), throttled (429).
COMMON = {
    "400": "Invalid request",
    "401": "Not signed in, or the token is wrong",
    "403": "Not allowed",
    "404": "Not found (other users' objects do not exist for you)",
    "413": "Request body or images over the limit",
    "429": "Too many requests; retry after the Retry-After header's seconds",
}
# Operations on objects with a lifecycle: conflicting state (409), gone (410), wrong body type (415),
# being written by another request (423).
BY_PATH = {
    "/api/v1/uploads/{upload_id}/": {
        "409": "Wrong offset",
        "410": "Abandoned",
        "415": "Wrong Content-Type",
        "423": "Another request is writing it",
    },
    "/api/v1/jobs/": {"409": "The dataset is not ready"},
    "/api/v1/jobs/{job_id}/cancel/": {"409": "Already finished"},
}


def tus_header(
    name: str,
    description: str,
    required: bool = True,
    kind: type[str] | type[int] = str,
    enum: Sequence[str] | None = None,
) -> OpenApiParameter:
    return OpenApiParameter(name, kind, OpenApiParameter.HEADER, required=required, description=description, enum=enum)


TUS_RESUMABLE = tus_header("Tus-Resumable", "the protocol version", enum=["1.0.0"])


def add_error_responses(
    result: dict[str, Any], generator: SchemaGenerator, request: Request | None, public: bool
) -> dict[str, Any]:
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "patch", "delete", "head", "options"):
                continue
            responses = operation.setdefault("responses", {})
            for code, description in {**COMMON, **BY_PATH.get(path, {})}.items():
                responses.setdefault(code, {"description": description, "content": ref})
    return result
