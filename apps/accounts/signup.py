"""Who may create an account: the GRAFT_SIGNUP mode (open, invite, closed), single-use expiring
invitations, and the first account of an empty server, which needs no invitation (so a fresh
`make run` can be used at once under `invite`, the default without DEBUG)."""

from __future__ import annotations

import enum
import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.forms import UserCreationForm
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import Invitation
from apps.common.errors import UserError

_FIRST_ACCOUNT_LOCK = 0x67726166  # a PostgreSQL advisory lock key ("graf")


class Gate(enum.Enum):
    """Why a sign-up may go ahead."""

    OPEN = "open"
    FIRST_ACCOUNT = "first account"
    INVITED = "invited"


def signup_mode() -> str:
    return settings.GRAFT_SIGNUP


def signup_link_shown() -> bool:
    """Whether pages offer a "Create account" link: not when signing up needs an invitation link
    (or cannot be done at all), unless this is the first account."""
    mode = signup_mode()
    return mode == "open" or (mode == "invite" and not User.objects.exists())


def invitation_create(
    *, created_by: User | None = None, note: str = "", days: float | None = None
) -> tuple[Invitation, str]:
    """An invitation valid for `days` (GRAFT_INVITATION_DAYS), with its plain code (never stored)."""
    code = secrets.token_urlsafe(24)
    lifetime = timedelta(days=settings.GRAFT_INVITATION_DAYS if days is None else days)
    if lifetime <= timedelta(0):
        raise UserError("An invitation must be valid for some time; give a positive number of days.")
    invitation = Invitation.objects.create(
        code_hash=Invitation.hash_code(code),
        prefix=code[:6],
        note=note[:200],
        created_by=created_by,
        expires_at=timezone.now() + lifetime,
    )
    return invitation, code


def invitation_link(code: str, *, base_url: str | None = None) -> str:
    """The sign-up link carrying `code`, under `base_url` (GRAFT_PUBLIC_URL)."""
    base = (base_url or settings.GRAFT_PUBLIC_URL).rstrip("/")
    return f"{base}{reverse('web:signup')}?invite={code}"


def signup_gate(*, code: str = "") -> Gate:
    """May someone sign up now, with this invitation code (may be empty)? A UserError (403) with
    a sentence for them if not. Checked again, atomically, by `user_signup`."""
    mode = signup_mode()
    if mode == "closed":
        raise UserError(
            "Sign-up is closed on this server. An administrator creates accounts; ask them for one.",
            status_code=403,
        )
    if mode == "open":
        return Gate.OPEN
    if not User.objects.exists():
        return Gate.FIRST_ACCOUNT
    _invitation_valid(code)
    return Gate.INVITED


def user_signup(*, form: UserCreationForm[User], code: str = "") -> User:
    """Create the account of a valid sign-up form, spending the invitation when one is needed.
    Two sign-ups with one invitation, or two first accounts at once, make one account."""
    with transaction.atomic():
        gate = signup_gate(code=code)
        if gate is Gate.FIRST_ACCOUNT:
            _lock_first_account()
            gate = signup_gate(code=code)  # another first account may have been made meanwhile
        try:
            user = form.save()
        except IntegrityError:  # the same username, signed up since the form was checked
            raise UserError("A user with that username already exists.", status_code=400) from None
        if gate is Gate.INVITED:
            now = timezone.now()
            claimed = Invitation.objects.filter(
                code_hash=Invitation.hash_code(code), used_at__isnull=True, expires_at__gt=now
            ).update(used_at=now, used_by=user)
            if claimed != 1:  # spent or expired since the gate: the error rolls the account back
                _invitation_valid(code)
                raise UserError("This invitation has already been used.", status_code=403)
    return user


def _invitation_valid(code: str) -> Invitation:
    invitation = Invitation.objects.filter(code_hash=Invitation.hash_code(code)).first() if code else None
    if invitation is None:
        raise UserError(
            "Sign-up on this server is by invitation. Ask an administrator for an invitation link"
            + (" (this link's code is not one of them)." if code else "."),
            status_code=403,
        )
    if invitation.used_at is not None:
        raise UserError(
            "This invitation has already been used; each one creates a single account. "
            "Sign in, or ask an administrator for a new invitation.",
            status_code=403,
        )
    if invitation.expires_at <= timezone.now():
        raise UserError(
            f"This invitation expired on {_when(invitation.expires_at)}; ask an administrator for a new one.",
            status_code=403,
        )
    return invitation


def _lock_first_account() -> None:
    """Serialize first-account sign-ups until the transaction ends. SQLite needs nothing: its
    transactions here take the write lock when they begin (settings: transaction_mode IMMEDIATE)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_FIRST_ACCOUNT_LOCK])


def _when(moment: datetime) -> str:
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M} {settings.TIME_ZONE}"
