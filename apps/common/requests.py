"""Request types of the views only signed-in users reach, where `request.user` is a `User`.

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
