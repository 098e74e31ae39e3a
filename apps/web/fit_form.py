"""The train form's fit options, both ways, from ml.config's table: the inputs the page shows
(bounds, defaults, help) and the options a posted form sets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from django.http import QueryDict

from apps.common.errors import UserError
from ml.config import Option, options_for

# Words a choice reads as in the form, where its value alone says too little.
CHOICE_TEXT = {("strategy", "auto"): "auto (from the measurements)"}


@dataclass(frozen=True)
class Choice:
    value: str
    text: str
    selected: bool
    disabled: bool = False


@dataclass(frozen=True)
class FormField:
    """One option's input: `widget` is "select", "number" or "checkbox"."""

    name: str
    id: str
    label: str
    help: str
    widget: str
    value: str = ""
    checked: bool = False
    min: str = ""
    max: str = ""
    step: str = ""
    choices: list[Choice] = field(default_factory=list)


def form_fields(available_backbones: Iterable[tuple[str, bool]]) -> list[FormField]:
    """The inputs of every option a user may set; a backbone whose weights this server lacks is shown
    but cannot be chosen."""
    missing = {name for name, ok in available_backbones if not ok}
    return [_form_field(o, missing) for o in options_for("user")]


def _form_field(option: Option[Any], missing_backbones: set[str]) -> FormField:
    default = option.default_value()
    shown = FormField(option.name, option.name.replace("_", "-"), option.label, option.describe(), "number")
    if option.choices is not None:
        choices = []
        for value in option.choices():
            missing = option.name == "backbone" and value in missing_backbones
            text = CHOICE_TEXT.get((option.name, value), value) + (" (weights not on this server)" if missing else "")
            choices.append(Choice(value, text, selected=value == default, disabled=missing))
        return replace(shown, widget="select", choices=choices)
    if option.kind is bool:
        return replace(shown, widget="checkbox", checked=bool(default))
    return replace(
        shown,
        value="" if default is None else str(default),
        min=_bound(option.low),
        max=_bound(option.high),
        step="1" if option.kind is int else "any",
    )


def _bound(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else str(x)


def posted_options(post: QueryDict) -> dict[str, Any]:
    """The options a posted train form sets: a blank field keeps the engine's default; a checkbox
    left out is unticked on the page's form (which carries `advanced`), the default otherwise.
    Bounds are FitConfig.validate's to check (via job_create); a field that is no number is refused here."""
    options: dict[str, Any] = {}
    for option in options_for("user"):
        raw = post.get(option.name, "")
        if option.kind is bool:
            ticked = option.name in post
            options[option.name] = ticked if ticked or "advanced" in post else option.default_value()
        elif raw and option.kind in (int, float):
            try:
                options[option.name] = option.kind(raw)
            except ValueError:
                raise UserError(f"{option.name} must be a number.") from None
        elif raw:
            options[option.name] = raw
    return options
