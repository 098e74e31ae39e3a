"""Fit options are declared once (ml.config.OPTIONS): FitConfig, the CLI, the API and the web form
take the same options, with the same defaults, choices and bounds, and refuse the same values in
the same words. Nothing here needs the database: each surface is read up to where it hands its
options to FitConfig."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from dataclasses import fields
from html.parser import HTMLParser
from typing import Any

import pytest
from django.http import QueryDict
from django.template import Context, Template
from rest_framework import serializers

from apps.common.errors import UserError
from apps.training.api import JobListCreateApi
from apps.training.services import USER_OPTIONS
from apps.web.fit_form import posted_options
from ml.cli import _fit_config, _parser
from ml.config import OPTIONS, FitConfig, Option, options_for
from ml.errors import ConfigError
from tests.conftest import ROOT

USER = options_for("user")  # the API, the web form and the CLI
CLI = options_for("user", "cli")
BOUNDED = [o for o in CLI if o.low is not None]
USER_BOUNDED = [o for o in USER if o.low is not None]
NUMBERS = [o for o in USER if o.kind in (int, float)]
CHOICES = [o for o in CLI if o.choices is not None]
BACKBONES = [("efficientnet_lite1", True), ("resnet18", False)]  # as the dataset page's context has them
CLI_OWN = {"dataset", "out", "checkpoint", "cache", "json", "func"}  # the fit subcommand's other arguments
API_OWN = {"dataset", "version"}


def _ids(options: list[Option[Any]] | tuple[Option[Any], ...]) -> list[str]:
    return [o.name for o in options]


# --- each surface, up to FitConfig -----------------------------------------------------------------


def _cli(*argv: str) -> FitConfig:
    return _fit_config(_parser().parse_args(["fit", "data.zip", "--out", "out", *argv]))


def _cli_flag(option: Option[Any]) -> str:
    return "--" + option.name.replace("_", "-")


def _fit_subparser() -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["fit"]
    return parser


def _api_serializer(**data: Any) -> serializers.Serializer[None]:
    s = JobListCreateApi.InputSerializer(data={"dataset": 1, **data})
    assert s.is_valid(), s.errors  # types and choices only: the bounds are FitConfig's
    return s


def _api(**data: Any) -> FitConfig:
    options = {k: v for k, v in _api_serializer(**data).validated_data.items() if k not in API_OWN}
    return FitConfig(**{k: v for k, v in options.items() if v is not None})  # as job_create builds it


class _Form(HTMLParser):
    """The train form's option inputs as a browser reads them: attributes, and what a submit posts."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.inputs: dict[str, dict[str, str | None]] = {}
        self.options: dict[str, list[dict[str, str | None]]] = {}
        self._select: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("input", "select"):
            self.inputs[a["name"] or ""] = {"tag": tag, **a}
        if tag == "select":
            self._select = a["name"]
            self.options[a["name"] or ""] = []
        elif tag == "option" and self._select is not None:
            self.options[self._select].append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None

    def submitted(self, **changes: str) -> QueryDict:
        """What submitting the page's form posts (it carries `advanced`), with `changes` typed in."""
        post = QueryDict(mutable=True)
        post["advanced"] = "1"
        for name, a in self.inputs.items():
            if a["tag"] == "select":
                picked = [o for o in self.options[name] if "selected" in o] or self.options[name][:1]
                post[name] = picked[0]["value"] or ""
            elif a.get("type") == "checkbox":
                if "checked" in a:
                    post[name] = "on"
            else:
                post[name] = a.get("value") or ""
        for name, value in changes.items():
            post[name] = value
        return post


def _form() -> _Form:
    return _Form(
        Template("{% load fit_options %}{% fit_options backbones %}").render(Context({"backbones": BACKBONES}))
    )


def _web(**typed: str) -> FitConfig:
    return FitConfig(**posted_options(_form().submitted(**typed)))


# --- the same options -----------------------------------------------------------------------------


def test_fitconfig_is_the_table():
    assert [f.name for f in fields(FitConfig)] == _ids(OPTIONS)
    default = FitConfig()
    default.validate()
    for option in OPTIONS:
        value = getattr(default, option.name)
        assert value == option.default_value(), option.name
        assert (value is None and option.optional) or isinstance(value, option.kind), option.name


def test_every_surface_takes_the_same_options():
    assert set(vars(_parser().parse_args(["fit", "d.zip", "--out", "o"]))) - CLI_OWN == set(_ids(CLI))
    assert set(JobListCreateApi.InputSerializer().fields) - API_OWN == set(_ids(USER))
    assert set(_form().inputs) == set(_ids(USER))
    assert set(posted_options(_form().submitted())) == set(_ids(USER)) - {"budget"}  # left blank: not set
    assert USER_OPTIONS == tuple(_ids(USER))
    assert {o.who for o in OPTIONS} == {"user", "cli", "engine"}


# --- the same defaults ----------------------------------------------------------------------------


def test_left_alone_every_surface_gives_the_engines_defaults():
    assert _cli() == FitConfig()
    assert _api() == FitConfig()
    assert _web() == FitConfig()  # the page's form submitted as it is shown
    assert FitConfig(**posted_options(QueryDict(""))) == FitConfig()  # a post without the page's form


@pytest.mark.parametrize("option", USER, ids=_ids(USER))
def test_the_api_schema_and_the_form_show_the_default(option):
    field = JobListCreateApi.InputSerializer().fields[option.name]
    shown = _form().inputs[option.name]
    if option.optional:
        assert not field.required and shown["value"] == ""
    else:
        assert field.default == option.default_value()
    if option.kind is bool:
        assert ("checked" in shown) is option.default_value()
    elif option.choices is not None:
        assert [o["value"] for o in _form().options[option.name] if "selected" in o] == [option.default_value()]
    elif not option.optional:
        assert shown["value"] == str(option.default_value())
    assert option.describe() == field.help_text


# --- the same bounds ------------------------------------------------------------------------------


def _outside(option: Option[Any]) -> list[Any]:
    low, high = option.low, option.high
    assert low is not None
    if option.kind is int:
        return [int(low) - 1] + ([int(high) + 1] if high is not None else [])
    return [math.nextafter(low, -math.inf)] + ([math.nextafter(high, math.inf)] if high is not None else [])


def _inside(option: Option[Any]) -> list[Any]:
    return [option.kind(b) for b in (option.low, option.high) if b is not None]


def _surfaces(option: Option[Any], value: Any) -> dict[str, FitConfig]:
    configs = {"cli": _cli(_cli_flag(option), str(value))}
    if option.who == "user":
        configs["api"] = _api(**{option.name: value})
        configs["web"] = _web(**{option.name: str(value)})
    return configs


@pytest.mark.parametrize("option", BOUNDED, ids=_ids(BOUNDED))
def test_a_value_just_outside_the_bounds_is_refused_by_every_surface_in_the_same_words(option):
    for value in _outside(option):
        expected = option.refuse(value)
        assert expected is not None and option.name in expected
        for surface, config in _surfaces(option, value).items():
            with pytest.raises(ConfigError) as refused:
                config.validate()
            assert refused.value.message == expected, (surface, value)


@pytest.mark.parametrize("option", BOUNDED, ids=_ids(BOUNDED))
def test_the_bounds_themselves_are_accepted_by_every_surface(option):
    for value in _inside(option):
        for surface, config in _surfaces(option, value).items():
            config.validate()
            assert getattr(config, option.name) == value, surface


@pytest.mark.parametrize("option", USER_BOUNDED, ids=_ids(USER_BOUNDED))
def test_the_form_and_the_help_show_the_bounds(option):
    shown = _form().inputs[option.name]
    assert float(shown["min"] or "nan") == option.low
    assert float(shown["max"] or "nan") == option.high
    assert option.bounds() in option.describe()
    assert option.bounds() in (_fit_subparser()._option_string_actions[_cli_flag(option)].help or "")


# --- the same choices -----------------------------------------------------------------------------


@pytest.mark.parametrize("option", CHOICES, ids=_ids(CHOICES))
def test_every_surface_offers_the_same_choices(option):
    choices = list(option.choices())
    assert list(_fit_subparser()._option_string_actions[_cli_flag(option)].choices or ()) == choices
    with pytest.raises(SystemExit):
        _cli(_cli_flag(option), "no-such-choice")
    if option.who == "user":
        assert list(JobListCreateApi.InputSerializer().fields[option.name].choices) == choices
        assert [o["value"] for o in _form().options[option.name]] == choices
        assert not JobListCreateApi.InputSerializer(data={"dataset": 1, option.name: "no-such-choice"}).is_valid()
        with pytest.raises(ConfigError, match=f"Unknown {option.name} 'no-such-choice'. Valid choices: "):
            _web(**{option.name: "no-such-choice"}).validate()


def test_a_backbone_without_weights_here_is_shown_but_cannot_be_picked():
    shown = {o["value"]: o for o in _form().options["backbone"]}
    assert "disabled" in shown["resnet18"] and "disabled" not in shown["efficientnet_lite1"]


# --- the surfaces' own parsing ---------------------------------------------------------------------


@pytest.mark.parametrize("option", NUMBERS, ids=_ids(NUMBERS))
def test_the_web_form_says_which_field_is_no_number(option):
    with pytest.raises(UserError, match=f"^{option.name} must be a number"):
        posted_options(_form().submitted(**{option.name: "ten"}))


def test_checkboxes_left_out_of_the_pages_form_are_off_and_of_a_bare_post_the_default():
    post = _form().submitted()
    for option in (o for o in USER if o.kind is bool):
        post.pop(option.name, None)
        assert posted_options(post)[option.name] is False
        assert posted_options(QueryDict(""))[option.name] is option.default_value()


def test_the_table_reads_without_torch():
    code = "import sys, ml.config; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
