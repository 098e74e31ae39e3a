from __future__ import annotations

import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import authenticate
from django.contrib.auth.models import User
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.utils import timezone

from apps.accounts.lockout import lockout_reason
from apps.accounts.lockout import message as lockout_message
from apps.accounts.models import ApiToken
from apps.common.errors import UserError


def token_create(*, user: User, name: str = "") -> tuple[ApiToken, str]:
    """Create a token (it expires after GRAFT_TOKEN_DAYS); return it with the plain key (never
    stored). Past GRAFT_MAX_TOKENS_PER_USER, the user's least recently used tokens are revoked."""
    key = secrets.token_hex(20)
    token = ApiToken.objects.create(
        user=user,
        name=name.replace("\x00", "")[:100],  # a NUL is no text PostgreSQL stores (the form passes it on)
        key_hash=ApiToken.hash_key(key),
        prefix=key[:8],
        expires_at=timezone.now() + timedelta(days=settings.GRAFT_TOKEN_DAYS),
    )
    ApiToken.objects.filter(user=user, expires_at__lte=timezone.now()).delete()
    others = ApiToken.objects.filter(user=user).exclude(pk=token.pk)
    by_use = others.order_by(Coalesce("last_used_at", "created_at").desc())
    surplus = list(by_use.values_list("pk", flat=True)[settings.GRAFT_MAX_TOKENS_PER_USER - 1 :])
    ApiToken.objects.filter(pk__in=surplus).delete()
    return token, key


def token_obtain(*, request: HttpRequest, username: str, password: str, name: str = "") -> str:
    user = authenticate(request, username=username, password=password)
    if getattr(request, "axes_locked_out", False):
        raise UserError(lockout_message(lockout_reason(request, {"username": username})), status_code=429)
    if user is None or not user.is_active:
        raise UserError("Invalid username or password.", status_code=401)
    _, key = token_create(user=user, name=name or "API")
    return key
