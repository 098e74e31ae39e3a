"""`python manage.py invite`: print a sign-up link with a single-use, expiring invitation code.

For GRAFT_SIGNUP=invite (the default without DEBUG). Staff can also make them in the admin,
under Accounts › Invitations, where they are listed and can be revoked (deleted).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.accounts.signup import invitation_create, invitation_link
from apps.common.errors import UserError


class Command(BaseCommand):
    help = "Print a sign-up link carrying a single-use invitation code."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--note", default="", help="whom it is for (shown in the admin)")
        parser.add_argument(
            "--days", type=float, default=None, help=f"valid this long (default {settings.GRAFT_INVITATION_DAYS:g})"
        )
        parser.add_argument(
            "--url", default=None, help=f"where people reach Graft (default {settings.GRAFT_PUBLIC_URL})"
        )
        parser.add_argument("--by", default=None, metavar="USERNAME", help="the staff user it is from")

    def handle(
        self, *args: Any, note: str, days: float | None, url: str | None, by: str | None, **options: Any
    ) -> None:
        creator = None
        if by is not None:
            creator = User.objects.filter(username=by).first()
            if creator is None or not creator.is_staff:
                raise CommandError(f"{by!r} is not a staff user.")
        try:
            invitation, code = invitation_create(created_by=creator, note=note, days=days)
        except UserError as exc:
            raise CommandError(exc.message) from None
        if settings.GRAFT_SIGNUP == "closed":
            self.stderr.write("Note: sign-up is closed (GRAFT_SIGNUP=closed); this link works once it is 'invite'.")
        elif settings.GRAFT_SIGNUP == "open":
            self.stderr.write("Note: sign-up is open (GRAFT_SIGNUP=open); anyone can sign up, link or not.")
        self.stdout.write(f"Single-use sign-up link, valid until {invitation.expires_at:%Y-%m-%d %H:%M} UTC:")
        self.stdout.write(invitation_link(code, base_url=url))
