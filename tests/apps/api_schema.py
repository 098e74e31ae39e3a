"""A real API answer checked against the published OpenAPI schema (drf-spectacular's, made from the
declared types): `schema_errors(body, "JobOutput")` says where it departs, [] when it matches."""

from __future__ import annotations

from functools import cache
from typing import Any

import jsonschema
from drf_spectacular.generators import SchemaGenerator

from apps.common.dataclass_schema import json_schema


@cache
def _components() -> dict[str, Any]:
    spec = SchemaGenerator().get_schema(request=None, public=True)
    return {name: json_schema(schema) for name, schema in spec["components"]["schemas"].items()}


def schema_errors(body: object, component: str) -> list[str]:
    root = {"$ref": f"#/components/schemas/{component}", "components": {"schemas": _components()}}
    validator = jsonschema.Draft202012Validator(root)
    return sorted(f"{e.json_path}: {e.message}" for e in validator.iter_errors(body))
