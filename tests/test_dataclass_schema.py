"""apps.common.dataclass_schema: OpenAPI schemas from frozen dataclasses, and JSON validated against them."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import pytest

from apps.common.dataclass_schema import json_schema, openapi_schema, validate_json


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer.

    More text that is not the description."""

    width: int = dataclasses.field(metadata={"help": "units"})
    activation: Literal["relu", "gelu"] = "relu"


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    layers: list[Layer]
    weights: dict[str, float]
    extra: Any
    rate: float | None = None
    kind: Literal["mlp"] = "mlp"
    flags: tuple[bool, ...] = ()
    seeds: Sequence[int] = dataclasses.field(default_factory=list)
    pair: tuple[int, str] = (0, "")
    head: Layer | None = None
    mode: int | str = 0

    __json_extra__: ClassVar[dict[str, object]] = {"version": int}


@dataclasses.dataclass(frozen=True)
class Node:
    value: int
    children: tuple[Node, ...] = ()


def test_scalars_unions_and_containers() -> None:
    assert openapi_schema(int) == {"type": "integer"}
    assert openapi_schema(float) == {"type": "number"}
    assert openapi_schema(str) == {"type": "string"}
    assert openapi_schema(bool) == {"type": "boolean"}
    assert openapi_schema(Any) == {}
    assert openapi_schema(typing.Optional[int]) == {"type": "integer", "nullable": True}  # noqa: UP045
    assert openapi_schema(Literal[1, 2]) == {"type": "integer", "enum": [1, 2]}
    assert openapi_schema(Sequence[str]) == {"type": "array", "items": {"type": "string"}}
    assert openapi_schema(dict[str, list[int]]) == {
        "type": "object",
        "additionalProperties": {"type": "array", "items": {"type": "integer"}},
    }
    with pytest.raises(TypeError):
        openapi_schema(complex)


def test_dataclass_schema() -> None:
    layer = {
        "type": "object",
        "description": "One layer.",
        "properties": {
            "width": {"type": "integer", "description": "units"},
            "activation": {"type": "string", "enum": ["relu", "gelu"]},
        },
        "required": ["width"],
        "additionalProperties": False,
    }
    assert openapi_schema(Layer) == layer
    assert openapi_schema(Config) == {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "layers": {"type": "array", "items": layer},
            "weights": {"type": "object", "additionalProperties": {"type": "number"}},
            "extra": {},
            "rate": {"type": "number", "nullable": True},
            "kind": {"type": "string", "enum": ["mlp"]},
            "flags": {"type": "array", "items": {"type": "boolean"}},
            "seeds": {"type": "array", "items": {"type": "integer"}},
            "pair": {
                "type": "array",
                "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                "minItems": 2,
                "maxItems": 2,
            },
            "head": {**layer, "nullable": True},
            "mode": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "version": {"type": "integer"},
        },
        "required": ["name", "layers", "weights", "extra"],
        "additionalProperties": False,
    }


def test_self_reference_terminates() -> None:
    schema = openapi_schema(Node)
    assert schema["properties"]["children"]["items"] == {"type": "object"}


def test_nullable_becomes_json_schema_null() -> None:
    assert json_schema({"type": "integer", "nullable": True}) == {"type": ["integer", "null"]}
    assert json_schema({"type": "object", "properties": {"nullable": {"type": "string"}}}) == {
        "type": "object",
        "properties": {"nullable": {"type": "string"}},
    }
    for tp in (int | str | None, Literal["a", "b"] | None, Literal["a", None]):  # anyOf / enum: null added as anyOf
        assert validate_json(None, openapi_schema(tp)) == [], tp
        assert validate_json("a", openapi_schema(tp)) == [], tp
        assert validate_json(1.5, openapi_schema(tp)) != [], tp
    assert validate_json(None, openapi_schema(Any | None)) == []


CONFIG = Config(name="a", layers=[Layer(width=4)], weights={"x": 0.5}, extra={"anything": [1]}, head=Layer(2))


def _json() -> dict[str, Any]:
    data = dataclasses.asdict(CONFIG)
    data["flags"], data["pair"] = list(data["flags"]), list(data["pair"])  # as JSON would have them
    return data


def test_validate_accepts_asdict() -> None:
    schema = openapi_schema(Config)
    assert validate_json(_json(), schema) == []
    assert validate_json({**_json(), "version": 3, "mode": "x", "rate": 0.1}, schema) == []


def test_validate_accepts_null_where_nullable() -> None:
    schema = openapi_schema(Config)
    assert validate_json({**_json(), "rate": None, "head": None}, schema) == []
    assert validate_json({**_json(), "name": None}, schema) != []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(name=3), "$.name: 3 is not of type 'string'"),
        (lambda d: d["layers"][0].update(width="4"), "$.layers[0].width: '4' is not of type 'integer'"),
        (lambda d: d["layers"][0].pop("width"), "$.layers[0]: 'width' is a required property"),
        (lambda d: d.pop("weights"), "$: 'weights' is a required property"),
        (lambda d: d.update(bogus=1), "$: Additional properties are not allowed ('bogus' was unexpected)"),
        (lambda d: d.update(kind="cnn"), "$.kind: 'cnn' is not one of ['mlp']"),
        (lambda d: d["weights"].update(y="heavy"), "$.weights.y: 'heavy' is not of type 'number'"),
        (lambda d: d.update(pair=[1, "a", 2]), "$.pair: [1, 'a', 2] is too long"),
    ],
)
def test_validate_rejects(change: Any, expected: str) -> None:
    data = _json()
    change(data)
    assert validate_json(data, openapi_schema(Config)) == [expected]
