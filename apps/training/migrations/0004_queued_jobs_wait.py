from django.db import migrations


def queued_jobs_wait(apps, schema_editor):
    """A queued job waits for a worker with no heartbeat (apps.common.work); jobs re-queued before
    that rule kept their last one."""
    apps.get_model("training", "Job").objects.filter(status="queued").update(heartbeat_at=None)


class Migration(migrations.Migration):
    dependencies = [("training", "0003_job_checkpoint_and_worker")]

    operations = [migrations.RunPython(queued_jobs_wait, migrations.RunPython.noop)]
