"""History rows of fine-tune epochs name the held-out slice of the training split `heldout_*`
(`val_*` is the validation split, in a job's metrics): rows written before are renamed."""

from django.db import migrations

RENAMES = {"val_loss": "heldout_loss", "val_accuracy": "heldout_accuracy"}
EPOCH_PHASES = ("finetune", "search")


def _rename(apps, schema_editor, renames):
    JobHistory = apps.get_model("training", "JobHistory")
    changed = []
    for row in JobHistory.objects.filter(data__phase__in=EPOCH_PHASES).iterator(chunk_size=2000):
        if any(old in row.data for old in renames):
            row.data = {renames.get(k, k): v for k, v in row.data.items()}
            changed.append(row)
        if len(changed) >= 2000:
            JobHistory.objects.bulk_update(changed, ["data"])
            changed = []
    JobHistory.objects.bulk_update(changed, ["data"])


def forwards(apps, schema_editor):
    _rename(apps, schema_editor, RENAMES)


def backwards(apps, schema_editor):
    _rename(apps, schema_editor, {new: old for old, new in RENAMES.items()})


class Migration(migrations.Migration):
    dependencies = [("training", "0005_versions")]

    operations = [migrations.RunPython(forwards, backwards)]
