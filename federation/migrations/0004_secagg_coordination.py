import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("federation", "0003_update_wire_bytes"),
    ]

    operations = [
        migrations.CreateModel(
            name="SecAggAttempt",
            fields=[
                (
                    "round",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        primary_key=True,
                        related_name="secagg",
                        serialize=False,
                        to="federation.round",
                    ),
                ),
                ("params", models.JSONField()),
                ("state", models.JSONField(default=dict)),
                ("vector", models.BinaryField(blank=True, null=True)),
                ("gone", models.JSONField(default=list)),
                ("error", models.TextField(blank=True)),
                ("notified", models.BooleanField(default=False)),
                ("counts", models.JSONField(blank=True, null=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
            ],
        ),
    ]
