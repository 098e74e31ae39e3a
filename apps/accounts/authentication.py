from __future__ import annotations

from django.contrib.auth.models import User
from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from apps.accounts.models import ApiToken


class ApiTokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>` against hashed `ApiToken` rows."""

    def authenticate(self, request: Request) -> tuple[User, ApiToken] | None:
        # OAuth habits send `Bearer`; DRF would ignore the header and answer "credentials were not
        # provided", which sends people looking for a missing header rather than a wrong word.
        scheme = authentication.get_authorization_header(request).split(b" ", 1)[0].lower()
        if scheme == b"bearer":
            raise exceptions.AuthenticationFailed(
                "Graft API tokens are sent as `Authorization: Token <key>`, not `Bearer <key>`."
            )
        return super().authenticate(request)

    def authenticate_credentials(self, key: str) -> tuple[User, ApiToken]:
        token = ApiToken.objects.select_related("user").filter(key_hash=ApiToken.hash_key(key)).first()
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked API token.")
        now = timezone.now()
        if token.expires_at is not None and token.expires_at <= now:
            raise exceptions.AuthenticationFailed(
                f"This API token expired on {token.expires_at:%Y-%m-%d}; create a new one on the Tokens page "
                "or at /api/v1/auth/token/."
            )
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token
