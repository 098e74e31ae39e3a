from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest
from django.urls import reverse

from apps.accounts.models import ApiToken, Invitation
from apps.accounts.signup import invitation_create


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at")
    search_fields = ("user__username", "name", "prefix")
    readonly_fields = ("key_hash", "prefix", "created_at", "last_used_at")


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin[Invitation]):
    """Add one to get a sign-up link (shown once); delete one to revoke it."""

    list_display = ("prefix", "note", "created_by", "created_at", "expires_at", "used_at", "used_by")
    search_fields = ("note", "prefix", "used_by__username")
    fields = ("note", "prefix", "created_by", "created_at", "expires_at", "used_at", "used_by")
    readonly_fields = ("prefix", "created_by", "created_at", "expires_at", "used_at", "used_by")

    def has_change_permission(self, request: HttpRequest, obj: Invitation | None = None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def save_model(
        self, request: HttpRequest, obj: Invitation, form: forms.ModelForm[Invitation], change: bool
    ) -> None:
        if change:
            return
        invitation, code = invitation_create(created_by=request.user, note=obj.note)  # type: ignore[arg-type]
        obj.pk, obj.prefix, obj.expires_at = invitation.pk, invitation.prefix, invitation.expires_at
        link = request.build_absolute_uri(reverse("web:signup")) + f"?invite={code}"
        messages.success(
            request,
            f"Invitation link, shown only now (single use, valid until "
            f"{invitation.expires_at:%Y-%m-%d %H:%M} UTC): {link}",
        )
