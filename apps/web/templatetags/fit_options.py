"""`{% fit_options backbones %}`: the train form's option inputs, as ml.config declares them (apps.web.fit_form)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django import template

from apps.web.fit_form import form_fields

register = template.Library()


@register.inclusion_tag("web/_fit_options.html")
def fit_options(backbones: Iterable[tuple[str, bool]]) -> dict[str, Any]:
    """`backbones`: (name, whether its weights are on this server), as the dataset page's context has them."""
    return {"fields": form_fields(backbones)}
