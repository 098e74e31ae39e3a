from __future__ import annotations

import secrets

from django.contrib.auth import authenticate
from django.contrib.auth.models import AbstractBaseUser

from apps.accounts.models import ApiToken
from apps.common.errors import UserError


def token_create(*, user: AbstractBaseUser, name: str = "") -> tuple[ApiToken, str]:
    """Create a token; return it with the plain key (never stored)."""
    key = secrets.token_hex(20)
    token = ApiToken.objects.create(user=user, name=name, key_hash=ApiToken.hash_key(key), prefix=key[:8])
    return token, key


def token_obtain(*, username: str, password: str, name: str = "") -> str:
    user = authenticate(username=username, password=password)
    if user is None or not user.is_active:
        raise UserError("Invalid username or password.", status_code=401)
    _, key = token_create(user=user, name=name or "API")
    return key
