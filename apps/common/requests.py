"""Request types of the views only signed-in users reach, where `request.user` is a `User`; and
`whole_number`, how an id or a page number in a request is read.

For the type checker (django-stubs' pattern for authenticated views): at run time these are
Django's and DRF's own requests. DRF's views are signed-in only unless they say otherwise
(IsAuthenticated is the default permission); the pages say so with `login_required`.
"""

from django.contrib.auth.models import User
from django.http import HttpRequest
from rest_framework.request import Request


class AuthenticatedHttpRequest(HttpRequest):
    user: User


class AuthenticatedRequest(Request):
    user: User


MAX_ID = 2**31 - 1  # ids and page numbers above this fit no column (PostgreSQL: "integer out of range")


def whole_number(raw: object) -> int | None:
    """`raw` as a whole number from 0 to MAX_ID when it is written as one in ASCII digits, else None.
    (str.isdigit() alone admits "²" and 5,000-digit strings, on which int() raises.)"""
    text = str(raw)
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        return None
    value = int(text)
    return value if value <= MAX_ID else None
