"""Federation domain models: fields, constraints and small derived properties only.

Writes go through federation.services, reads through federation.selectors.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Consortium(models.Model):
    """A group of organisations that train models together under shared rules."""

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name


class Organization(models.Model):
    """A member of a consortium: a hospital, a bank, a research lab."""

    class Kind(models.TextChoices):
        HOSPITAL = "hospital", "Hospital"
        BANK = "bank", "Bank"
        RESEARCH_LAB = "research_lab", "Research lab"
        OTHER = "other", "Other"

    consortium = models.ForeignKey(
        Consortium, on_delete=models.CASCADE, related_name="organizations"
    )
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.OTHER)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["consortium", "name"], name="org_unique_name_per_consortium"
            )
        ]

    def __str__(self) -> str:
        return self.name


class Silo(models.Model):
    """A data silo at one organisation, reached through its site agent."""

    class Admission(models.TextChoices):
        PENDING = "pending", "Pending"
        ADMITTED = "admitted", "Admitted"
        REJECTED = "rejected", "Rejected"

    consortium = models.ForeignKey(Consortium, on_delete=models.CASCADE, related_name="silos")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="silos")
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    schema = models.JSONField(default=dict, help_text="DatasetSchema.to_dict() of the local data")
    row_count = models.PositiveIntegerField(default=0)
    location = models.CharField(max_length=500, blank=True)
    admission = models.CharField(
        max_length=20, choices=Admission.choices, default=Admission.PENDING
    )
    # Only the SHA-256 of the agent token is stored: tokens are 256-bit random strings, so a
    # fast hash is enough (no dictionary to attack), and lookups stay O(1).
    token_hash = models.CharField(max_length=64, unique=True, null=True, blank=True)
    # The channel name of the agent's current connection; None when no agent is connected.
    connection_id = models.CharField(max_length=200, null=True, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    agent_version = models.CharField(max_length=50, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["consortium", "name"], name="silo_unique_name_per_consortium"
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def connected(self) -> bool:
        """Whether an agent connection is registered for this silo."""
        return self.connection_id is not None


class TrainingPlan(models.Model):
    """One version of a training plan; its canonical JSON is hashed."""

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        SUBMITTED = "submitted", "Submitted"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        WITHDRAWN = "withdrawn", "Withdrawn"
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        STOPPED = "stopped", "Stopped"

    consortium = models.ForeignKey(Consortium, on_delete=models.CASCADE, related_name="plans")
    name = models.CharField(max_length=200)
    version = models.PositiveIntegerField(default=1)
    spec = models.JSONField()
    spec_hash = models.CharField(max_length=64, db_index=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    silos = models.ManyToManyField(Silo, related_name="plans", blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["consortium", "name", "version"], name="plan_unique_version"
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


class Run(models.Model):
    """One execution of an approved plan version."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        STATS = "stats", "Computing federated statistics"
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        STOPPED = "stopped", "Stopped"

    ACTIVE = (Status.PENDING, Status.STATS, Status.RUNNING)

    plan = models.ForeignKey(TrainingPlan, on_delete=models.CASCADE, related_name="runs")
    plan_hash = models.CharField(max_length=64)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    rounds = models.PositiveIntegerField()
    preprocessing = models.JSONField(null=True, blank=True)
    stats_deadline = models.DateTimeField(null=True, blank=True)
    # Since when the run waits for enough silos to come online (None when it is not waiting).
    waiting_since = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"run {self.pk} of {self.plan}"

    @property
    def active(self) -> bool:
        """Whether the run still progresses."""
        return self.status in self.ACTIVE


class SiloStatistics(models.Model):
    """A silo's local statistics for a run's federated preprocessing pass (sums, counts, sets)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="silo_statistics")
    silo = models.ForeignKey(Silo, on_delete=models.CASCADE, related_name="+")
    stats = models.JSONField()
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "silo"], name="stats_once_per_silo_and_run")
        ]


class Round(models.Model):
    """One federated round: selected silos train on the previous global model."""

    class Status(models.TextChoices):
        COLLECTING = "collecting", "Collecting updates"
        AGGREGATING = "aggregating", "Aggregating"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="round_set")
    number = models.PositiveIntegerField()
    attempt = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.COLLECTING)
    selected = models.ManyToManyField(Silo, related_name="rounds_selected")
    deadline = models.DateTimeField()
    started_at = models.DateTimeField(default=timezone.now)
    aggregation_started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["run", "number", "attempt"], name="round_unique_attempt"
            )
        ]
        ordering = ["run", "number", "attempt"]

    def __str__(self) -> str:
        return f"round {self.number} of run {self.run_id}"

    @property
    def duration_seconds(self) -> float | None:
        """Wall time from opening to completion."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class Update(models.Model):
    """An accepted model update from one silo in one round, stored as a blob."""

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="updates")
    silo = models.ForeignKey(Silo, on_delete=models.CASCADE, related_name="updates")
    num_examples = models.PositiveIntegerField()
    nonce = models.CharField(max_length=64)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField()
    blob_key = models.CharField(max_length=300)
    metrics = models.JSONField(default=dict)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["round", "silo"], name="one_update_per_silo_and_round"),
            models.UniqueConstraint(fields=["silo", "nonce"], name="update_nonce_never_reused"),
        ]


class ModelVersion(models.Model):
    """A global model: version 0 is the initial model, version k the result of round k."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="model_versions")
    number = models.PositiveIntegerField()
    round = models.OneToOneField(
        Round, on_delete=models.SET_NULL, null=True, blank=True, related_name="model_version"
    )
    checksum = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField()
    blob_key = models.CharField(max_length=300)
    # name -> [dtype, shape]: updates are checked against it without decoding the blob.
    signature = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "number"], name="model_version_unique_number")
        ]
        ordering = ["run", "number"]

    def __str__(self) -> str:
        return f"model v{self.number} of run {self.run_id}"


class RoundMetric(models.Model):
    """A metric of one round: per silo (silo set) or for the round as a whole (silo null).

    scope "global" is the incoming global model evaluated on the silo's held-out split at the
    start of the round; scope "local" is the silo's locally trained model on the same split.
    """

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="metrics")
    silo = models.ForeignKey(
        Silo, on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    scope = models.CharField(max_length=20)
    name = models.CharField(max_length=50)
    value = models.FloatField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["round", "silo", "scope", "name"],
                name="round_metric_unique",
                nulls_distinct=False,
            )
        ]
