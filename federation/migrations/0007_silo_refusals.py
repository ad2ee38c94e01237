import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('federation', '0006_api_tokens'),
    ]

    operations = [
        migrations.CreateModel(
            name='SiloRefusal',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('code', models.CharField(max_length=50)),
                ('reason', models.TextField(blank=True)),
                ('round_number', models.PositiveIntegerField(blank=True, null=True)),
                ('since', models.DateTimeField(default=django.utils.timezone.now)),
                ('last_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('count', models.PositiveIntegerField(default=1)),
                ('run', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='refusals', to='federation.run')),
                ('silo', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='refusals', to='federation.silo')),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('run', 'silo'), name='one_refusal_per_silo_and_run')],
            },
        ),
    ]
