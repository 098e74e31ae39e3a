"""`{% load signup %}{% signup_link_shown as shown %}`: whether pages offer a "Create account" link."""

from __future__ import annotations

from django import template

from apps.accounts import signup

register = template.Library()


@register.simple_tag
def signup_link_shown() -> bool:
    return signup.signup_link_shown()
