from django.contrib import admin

from apps.training.models import Job, JobHistory


class JobHistoryInline(admin.TabularInline[JobHistory, Job]):
    model = JobHistory
    extra = 0
    readonly_fields = ("step", "phase", "data", "created_at")


@admin.register(Job)
class JobAdmin(admin.ModelAdmin[Job]):
    list_display = ("id", "owner", "dataset", "status", "phase", "progress", "error", "created_at", "heartbeat_at")
    list_filter = ("status",)
    search_fields = ("owner__username", "dataset__name", "error")
    readonly_fields = [f.name for f in Job._meta.fields]
    inlines = [JobHistoryInline]
