from django.contrib import admin

from apps.datasets.models import Dataset


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin[Dataset]):
    list_display = ("id", "name", "owner", "status", "num_images", "error", "created_at")
    list_filter = ("status",)
    search_fields = ("name", "owner__username")
    readonly_fields = [f.name for f in Dataset._meta.fields]
