# Steward approvals a site can verify (issue 13 part 2): the steward's signature over the plan hash
# is stored with the approval and carried in every grant.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("federation", "0006_api_tokens"),
    ]

    operations = [
        migrations.AddField(
            model_name="approval",
            name="signature",
            field=models.JSONField(blank=True, null=True),
        ),
    ]
