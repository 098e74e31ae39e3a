from django.contrib import admin

from apps.serving.models import TrainedModel


@admin.register(TrainedModel)
class TrainedModelAdmin(admin.ModelAdmin[TrainedModel]):
    list_display = ("id", "name", "owner", "backbone", "job", "bundle_bytes", "created_at")
    search_fields = ("name", "owner__username")
    readonly_fields = [f.name for f in TrainedModel._meta.fields]
