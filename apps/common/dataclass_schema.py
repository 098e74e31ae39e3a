"""OpenAPI 3.0 schemas from typed (frozen) dataclasses, for drf-spectacular's `extend_schema_field`,
and validation of JSON values against them (through `jsonschema`, which drf-spectacular requires)."""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import jsonschema  # type: ignore[import-untyped]

_SCALARS: dict[object, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}
_ARRAYS = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Set)
_OBJECTS = (dict, collections.abc.Mapping)


def openapi_schema(tp: object) -> dict[str, Any]:
    """The OpenAPI 3.0 schema of a resolved type hint (`typing.get_type_hints`); TypeError if unsupported."""
    return _schema(tp, frozenset())


def _schema(tp: object, seen: frozenset[type]) -> dict[str, Any]:
    if tp is Any:
        return {}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_schema(tp, seen)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        values = [v for v in args if v is not None]
        kinds = {_SCALARS.get(type(v)) for v in values}
        schema: dict[str, Any] = {"enum": values}
        if len(kinds) == 1 and None not in kinds:
            schema = {"type": kinds.pop(), **schema}
        return {**schema, "nullable": True} if None in args else schema
    if origin is Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        one = _schema(rest[0], seen) if len(rest) == 1 else {"anyOf": [_schema(a, seen) for a in rest]}
        return {**one, "nullable": True} if len(rest) < len(args) else one
    if tp in _ARRAYS or origin in _ARRAYS:
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[X, Y]
            items = [_schema(a, seen) for a in args]
            unique = [s for i, s in enumerate(items) if s not in items[:i]]
            item = unique[0] if len(unique) == 1 else {"anyOf": unique} if unique else {}
            return {"type": "array", "items": item, "minItems": len(items), "maxItems": len(items)}
        return {"type": "array", "items": _schema(args[0], seen) if args else {}}
    if tp in _OBJECTS or origin in _OBJECTS:
        values_schema = _schema(args[1], seen) if len(args) == 2 else {}
        return {"type": "object", "additionalProperties": values_schema}
    raise TypeError(f"no OpenAPI schema for {tp!r}")


def _dataclass_schema(cls: type, seen: frozenset[type]) -> dict[str, Any]:
    if cls in seen:  # self-referential: stop at "some object"
        return {"type": "object"}
    seen = seen | {cls}
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        properties[f.name] = _schema(hints[f.name], seen)
        if "help" in f.metadata:
            properties[f.name] = {**properties[f.name], "description": str(f.metadata["help"])}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    for name, extra in getattr(cls, "__json_extra__", {}).items():
        properties[name] = _schema(extra, seen)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(cls.__name__ + "("):  # not the signature dataclass() writes when there's none
        schema["description"] = doc.splitlines()[0].strip()
    return schema


def validate_json(instance: object, schema: dict[str, Any]) -> list[str]:
    """Errors ("$.path: message") of a JSON value against an OpenAPI 3.0 schema; [] when valid."""
    validator = jsonschema.Draft202012Validator(json_schema(schema))
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{e.json_path}: {e.message}" for e in errors]


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI 3.0 schema as JSON Schema: `nullable: true` becomes a "null" type (or an anyOf with it)."""
    out = dict(schema)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = json_schema(out[key])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in out:
            out[key] = [json_schema(s) for s in out[key]]
    if "properties" in out:
        out["properties"] = {name: json_schema(s) for name, s in out["properties"].items()}
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str) and "enum" not in out:
            out["type"] = [out["type"], "null"]
        elif set(out) - {"description"}:  # {} (any value) already admits null
            out = {"anyOf": [out, {"type": "null"}]}
    return out
