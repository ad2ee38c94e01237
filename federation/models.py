"""Federation domain models: fields, constraints and small derived properties only.

Writes go through federation.services, reads through federation.selectors.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class Consortium(models.Model):
    """A group of organisations that train models together under shared rules."""

    class QuorumMode(models.TextChoices):
        FRACTION = "fraction", "Fraction of member organisations"
        COUNT = "count", "N of the member organisations"

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    # Approval rules: every participating silo's steward approves (unanimity among data owners),
    # plus a quorum of member organisations: at least `org_quorum_value` of them (a fraction in
    # (0, 1] in fraction mode, a whole number in count mode).
    require_steward_unanimity = models.BooleanField(default=True)
    org_quorum_mode = models.CharField(
        max_length=10, choices=QuorumMode.choices, default=QuorumMode.FRACTION
    )
    org_quorum_value = models.FloatField(default=0.5)
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


class Role(models.TextChoices):
    """What a member may do in a consortium."""

    CONSORTIUM_ADMIN = "consortium_admin", "Consortium admin"
    ORG_ADMIN = "org_admin", "Organization admin"
    DATA_STEWARD = "data_steward", "Data steward"
    DATA_SCIENTIST = "data_scientist", "Data scientist"
    AUDITOR = "auditor", "Auditor"


class Membership(models.Model):
    """A user's role in an organisation (and so in its consortium). A user may hold several.

    Only an active membership gives its role. A pending one is an invitation (a consortium admin
    inviting an organisation's first admin) that counts for nothing until the invitee accepts it.
    A deactivated one gives nothing either; the row stays, so the plan page can still show which
    grant an old approval was made under. ``granted_by`` is who gave the role (None for rows made
    before grants were recorded, and for a consortium's first admin set up by the operator).
    """

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        PENDING = "pending", "Invited, not accepted yet"
        DEACTIVATED = "deactivated", "Deactivated"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=20, choices=Role.choices)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.ACTIVE)
    granted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    accepted_at = models.DateTimeField(null=True, blank=True)
    deactivated_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "organization", "role"], name="membership_unique_role"
            )
        ]

    def __str__(self) -> str:
        return f"{self.user} · {self.get_role_display()} · {self.organization}"


class Invitation(models.Model):
    """An invitation by e-mail to hold a role in an organisation, opened through a secret link.

    Only the SHA-256 of the link's token is stored (256 bits from ``secrets``). Opening the link
    lets the person set a password (a new account) or sign in, and accept: the membership is then
    granted as if by the inviter at that moment (federation.services.invitations), so the rules of
    separation of duties are checked again. ``user`` is set when the account already exists
    without a password (``manage.py create_consortium`` makes the first admin's account): the link
    then sets that account's password.
    """

    consortium = models.ForeignKey(Consortium, on_delete=models.CASCADE, related_name="invitations")
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="invitations"
    )
    email = models.EmailField()
    role = models.CharField(max_length=20, choices=Role.choices)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    membership = models.ForeignKey(
        Membership, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"invitation of {self.email} as {self.role} of {self.organization_id}"

    @property
    def state(self) -> str:
        """open, accepted, revoked or expired."""
        if self.accepted_at is not None:
            return "accepted"
        if self.revoked_at is not None:
            return "revoked"
        if timezone.now() >= self.expires_at:
            return "expired"
        return "open"


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
    # The installed model kinds its agent last announced in hello ({"name", "version",
    # "sha256"}, fedcore.model_kinds.check_announcement): what a plan may name (docs/tasks.md).
    model_kinds = models.JSONField(default=list, blank=True)
    # Privacy budget set by the consortium: the most (epsilon, delta) this silo's data may spend
    # over its whole history. None: no budget (unlimited).
    epsilon_budget = models.FloatField(null=True, blank=True)
    delta_budget = models.FloatField(null=True, blank=True)
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
    """A training proposal; its content lives in numbered versions, each hashed."""

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
    description = models.TextField(blank=True)
    proposed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    # The newest version (kept here so lists need no per-row subquery).
    current_version = models.ForeignKey(
        "PlanVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    rejection_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name


class PlanVersion(models.Model):
    """One immutable version of a plan; approvals belong to its hash."""

    plan = models.ForeignKey(TrainingPlan, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    spec = models.JSONField()
    spec_hash = models.CharField(max_length=64, db_index=True)
    silos = models.ManyToManyField(Silo, related_name="plan_versions", blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["plan", "number"], name="plan_version_unique_number")
        ]
        ordering = ["plan", "number"]

    def __str__(self) -> str:
        return f"{self.plan.name} v{self.number}"


class Approval(models.Model):
    """A member's decision on one plan version, acting for one organisation."""

    class Decision(models.TextChoices):
        APPROVE = "approve", "Approve"
        REJECT = "reject", "Reject"

    version = models.ForeignKey(PlanVersion, on_delete=models.CASCADE, related_name="approvals")
    plan_hash = models.CharField(max_length=64)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    role = models.CharField(max_length=20, choices=Role.choices)
    decision = models.CharField(max_length=10, choices=Decision.choices)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # The steward's own signature over the plan hash (fedcore.approvals), checked when stored and
    # again by every site that pins the key; null for an approval the sites cannot verify.
    signature = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["version", "user", "organization"], name="approval_once_per_member"
            )
        ]


class Run(models.Model):
    """One execution of an approved plan version."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        STATS = "stats", "Computing federated statistics"
        RUNNING = "running", "Running"
        EVALUATING = "evaluating", "Evaluating the final model"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        STOPPED = "stopped", "Stopped"

    ACTIVE = (Status.PENDING, Status.STATS, Status.RUNNING, Status.EVALUATING)

    plan = models.ForeignKey(TrainingPlan, on_delete=models.CASCADE, related_name="runs")
    version = models.ForeignKey(PlanVersion, on_delete=models.CASCADE, related_name="runs")
    plan_hash = models.CharField(max_length=64)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    rounds = models.PositiveIntegerField()
    preprocessing = models.JSONField(null=True, blank=True)
    stats_deadline = models.DateTimeField(null=True, blank=True)
    # Since when the run waits for enough silos to come online (None when it is not waiting).
    waiting_since = models.DateTimeField(null=True, blank=True)
    # The final evaluation phase's deadline (federation.services.evaluation).
    evaluation_deadline = models.DateTimeField(null=True, blank=True)
    # The final model's pooled figures on the union of the sites' held-out rows, the per-silo
    # figures and the final fairness report (federation.services.evaluation.pooled_evaluation);
    # None until the evaluation phase ends.
    evaluation = models.JSONField(null=True, blank=True)
    # An analysis plan's run (federation.services.analysis): its steps, the current one, the
    # merges so far, the step's deadline, and once released its result.
    analysis = models.JSONField(null=True, blank=True)
    # The bias mitigation the server computed for this run (federation.services.mitigation):
    # {"kind", "example_weights" (ExampleWeights.to_json), "counts"}; a constraint also keeps its
    # multipliers (theta, lambdas), updated each round; null without one.
    mitigation = models.JSONField(null=True, blank=True)
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


class SiloRefusal(models.Model):
    """A silo's agent refused a run's request (its signed grant does not verify there, or the
    site's policy says no): the silo is not selected again in that run until its agent says
    otherwise (a new ``hello`` or a ``ready`` message; docs/operations.md, "Refusing sites").

    One row per run and silo while the exclusion holds; it is deleted when it is lifted (the
    audit log keeps every refusal and every lift)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="refusals")
    silo = models.ForeignKey(Silo, on_delete=models.CASCADE, related_name="refusals")
    code = models.CharField(max_length=50)
    reason = models.TextField(blank=True)
    round_number = models.PositiveIntegerField(null=True, blank=True)  # None: the stats request
    since = models.DateTimeField(default=timezone.now)
    last_at = models.DateTimeField(default=timezone.now)
    count = models.PositiveIntegerField(default=1)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "silo"], name="one_refusal_per_silo_and_run")
        ]


class SiloStatistics(models.Model):
    """A silo's local statistics for a run's federated preprocessing pass (sums, counts, sets)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="silo_statistics")
    silo = models.ForeignKey(Silo, on_delete=models.CASCADE, related_name="+")
    stats = models.JSONField()
    # Rows per (group, label) of the training split, for a plan whose fairness.mitigation kind
    # is reweighing or constraint (fedcore.fairness_mitigation.label_counts); null otherwise.
    label_counts = models.JSONField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "silo"], name="stats_once_per_silo_and_run")
        ]


class SiloEvaluation(models.Model):
    """A silo asked to evaluate a run's final model, and its report once received.

    Created (``report`` None) for every silo the evaluation phase asks; ``report`` holds the
    checked score histogram (``fedcore.evaluation``) and, for plans with a fairness section,
    the group counts. The phase waits for the asked silos only."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="silo_evaluations")
    silo = models.ForeignKey(Silo, on_delete=models.CASCADE, related_name="+")
    model_version = models.PositiveIntegerField()
    report = models.JSONField(null=True, blank=True)
    asked_at = models.DateTimeField(default=timezone.now)
    received_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "silo"], name="evaluation_once_per_silo_and_run")
        ]


class SiloAnalysis(models.Model):
    """A silo asked for one step of an analysis run, and its answer once received
    (``fedcore.analytics.steps.site_answer``)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="silo_analyses")
    silo = models.ForeignKey(Silo, on_delete=models.CASCADE, related_name="+")
    step = models.CharField(max_length=20)
    answer = models.JSONField(null=True, blank=True)
    asked_at = models.DateTimeField(default=timezone.now)
    received_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["run", "silo", "step"], name="analysis_step_once_per_silo_and_run"
            )
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
    # What the aggregation strategy saw: anomaly flags (update-norm outliers, norm-bound
    # rejections) and its statistics (delta norms, selected clients, ...).
    anomalies = models.JSONField(default=list, blank=True)
    aggregation_stats = models.JSONField(default=dict, blank=True)
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
    # Multi-class and regression plans: the received global model's part of the pooled metrics
    # on the silo's held-out rows (fedcore.task_metrics), summed into the round's exact figures.
    task_part = models.JSONField(null=True, blank=True)
    # Plans with a fairness section: the per-group confusion counts of the incoming global model
    # on the silo's held-out split, by sensitive attribute, as received (docs/fairness.md).
    fairness = models.JSONField(null=True, blank=True)
    # What travelled: the payload bytes as received (compressed or not; size_bytes is the stored
    # dense blob) and the plan's compression method ("" = dense weights). docs/architecture.md.
    wire_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    compression = models.CharField(max_length=16, blank=True, default="")
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


class UploadedModel(models.Model):
    """A model no run trained, uploaded to a consortium in the model zoo's format
    (``fedcore.uploaded_model``) for evaluation plans to evaluate: its spec, the schema and
    fitted preprocessing it reads, and its safetensors weights in the blob store."""

    consortium = models.ForeignKey(
        Consortium, on_delete=models.CASCADE, related_name="uploaded_models"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    model = models.JSONField()
    schema = models.JSONField()
    preprocessing = models.JSONField()
    checksum = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField()
    blob_key = models.CharField(max_length=300)
    # name -> [dtype, shape], as a ModelVersion keeps it.
    signature = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["consortium", "-created_at"]

    def __str__(self) -> str:
        return f"uploaded model {self.pk} ({self.name})"


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


class PrivacyLedgerEntry(models.Model):
    """One application of a DP mechanism to a silo's data; append-only.

    ``epsilon_total`` is the silo's epsilon over its whole history after this entry: the
    accountant's (RDP) composition of every sampled Gaussian entry's (noise multiplier, sample
    rate, steps) at the silo's ledger delta, never a naive sum of per-entry epsilons, plus the
    sum of the pure epsilon-DP entries' ``epsilon_pure`` (basic composition on top).

    A ``fairness`` entry is pure epsilon-DP (discrete Laplace counts): ``epsilon_pure`` is what it
    spent, ``noise_multiplier`` the Laplace scale 1/epsilon of one count, ``sample_rate`` 1 and
    ``steps`` the number of count tables released; it is not part of the RDP composition. A
    ``statistics`` entry likewise: the noised numeric statistics of a run's statistics pass
    (Laplace), ``steps`` 1. An ``analysis`` entry: an analysis plan's count table a site released
    with discrete Laplace noise (pure, ``epsilon_pure`` the plan's epsilon, ``steps`` 1); an
    ``analysis_gaussian`` entry the same with discrete Gaussian noise, composed by the RDP
    accountant as one unsampled Gaussian step of noise multiplier sigma (sensitivity 1).
    """

    class Mechanism(models.TextChoices):
        SAMPLE = "sample", "Sample-level DP (DP-SGD at the site)"
        CLIENT = "client", "Client-level DP (DP-FedAvg at aggregation)"
        FAIRNESS = "fairness", "Noisy fairness counts"
        STATISTICS = "statistics", "Noised statistics pass (numeric columns)"
        ANALYSIS = "analysis", "Noised analysis table (discrete Laplace)"
        ANALYSIS_GAUSSIAN = "analysis_gaussian", "Noised analysis table (discrete Gaussian)"

    silo = models.ForeignKey(Silo, on_delete=models.CASCADE, related_name="ledger")
    run = models.ForeignKey(
        "Run", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    round_number = models.PositiveIntegerField(null=True, blank=True)
    mechanism = models.CharField(max_length=20, choices=Mechanism.choices)
    noise_multiplier = models.FloatField()
    sample_rate = models.FloatField()
    steps = models.PositiveIntegerField()
    delta = models.FloatField()
    epsilon_reported = models.FloatField(null=True, blank=True)
    epsilon_pure = models.FloatField(null=True, blank=True)
    epsilon_total = models.FloatField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["silo", "created_at", "pk"]


class FairnessReport(models.Model):
    """The group fairness of a round's incoming global model (version k-1 for round k).

    ``report`` is built at aggregation from the contributing silos' per-group confusion counts
    (``federation.services.fairness``): per sensitive attribute the merged counts, fairlearn's
    metrics (``fedcore.fairness.fairness_report``), representation per silo and the plan's
    threshold flags; plus the silos' performance spread.
    """

    round = models.OneToOneField(Round, on_delete=models.CASCADE, related_name="fairness_report")
    report = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"fairness of model v{self.round.number - 1} (round {self.round.number})"


class SecAggAttempt(models.Model):
    """The coordinator of one secure round attempt, in the database so every process reaches it.

    Any process that handles a message of the attempt (an ASGI process's consumer, a Celery
    worker's timer or sweep) locks the round's row, then this one (``SELECT ... FOR UPDATE``),
    rebuilds the ``fedcore.secagg.SecAggServer`` from ``state`` and ``vector``, advances it and
    writes it back in the same transaction (``federation.secagg_rounds``). What is stored is what
    the protocol shows the server anyway (docs/architecture.md, "Secure rounds"): public keys,
    the neighbour graph, share ciphertexts sealed for their recipients, rosters, revealed
    unmasking shares, and in ``vector`` the running sum of masked vectors (uint32 ring) --
    never one site's vector -- then, once unmasked, the aggregate sum. The row is deleted when
    the round is aggregated or fails.
    """

    round = models.OneToOneField(
        Round, on_delete=models.CASCADE, primary_key=True, related_name="secagg"
    )
    # Public parameters: the SecAggConfig, stage timeouts, client id -> silo id, the encoding
    # mode, the fairness count layout.
    params = models.JSONField()
    state = models.JSONField(default=dict)  # SecAggServer.snapshot()'s dict
    vector = models.BinaryField(null=True, blank=True)  # masked running sum, then the aggregate
    gone = models.JSONField(default=list)  # client ids known to have dropped out
    error = models.TextField(blank=True)
    notified = models.BooleanField(default=False)  # the orchestrator was asked to look
    counts = models.JSONField(null=True, blank=True)  # merged fairness counts, once unmasked
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"secure aggregation of {self.round}"


class AnalysisSecAgg(models.Model):
    """The SecAgg coordinator of one step of an analysis run under secure aggregation: the
    sibling of ``SecAggAttempt`` (which belongs to a training round), keyed to (run, step,
    attempt); the round id bound into every key is ``"analysis:<run>:<step>:<attempt>"``.

    It stores what ``SecAggAttempt`` stores (public parameters and keys, sealed share
    ciphertexts, rosters, revealed unmasking shares, the running masked sum, then the unmasked
    sum), never one site's vector or summary (``federation.secagg_analysis``). The row is
    deleted once the step's merge is taken, or when the run ends.
    """

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="analysis_secagg")
    step = models.CharField(max_length=20)
    attempt = models.PositiveIntegerField(default=1)
    # Public parameters: the SecAggConfig, stage timeout, client id -> silo id, the layout.
    params = models.JSONField()
    state = models.JSONField(default=dict)  # SecAggServer.snapshot()'s dict
    vector = models.BinaryField(null=True, blank=True)  # masked running sum, then the sum
    gone = models.JSONField(default=list)  # client ids known to have dropped out
    error = models.TextField(blank=True)
    notified = models.BooleanField(default=False)  # the orchestrator was asked to look
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["run", "step", "attempt"], name="analysis_secagg_once_per_step_attempt"
            )
        ]

    def __str__(self) -> str:
        return f"secure aggregation of step {self.step} of run {self.run_id}"


class AuditEvent(models.Model):
    """One entry of the append-only, hash-chained audit log.

    ``hash`` is the SHA-256 of the canonical JSON of every other field, ``prev_hash`` included, so
    changing, deleting or reordering any event breaks the chain from that event on
    (``manage.py verify_audit``). Events keep plain ids, not foreign keys: deleting a consortium
    must never delete its history.
    """

    index = models.PositiveBigIntegerField(unique=True)
    created_at = models.DateTimeField()
    actor = models.CharField(max_length=200)
    action = models.CharField(max_length=100, db_index=True)
    consortium_id = models.PositiveBigIntegerField(null=True, blank=True, db_index=True)
    object_type = models.CharField(max_length=50, blank=True)
    object_id = models.CharField(max_length=100, blank=True)
    data = models.JSONField(default=dict)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["index"]

    def __str__(self) -> str:
        return f"#{self.index} {self.action} by {self.actor}"


class ApiToken(models.Model):
    """A user's API token, stored as its SHA-256 only: the token itself is shown once, when it is
    created (DRF's authtoken kept it in clear, so a database reader could act as any user)."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12)  # the token's first characters, to tell them apart
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… of user {self.user_id}"

    @property
    def expired(self) -> bool:
        """Whether the token is past its expiry."""
        return timezone.now() >= self.expires_at


class StewardPasskey(models.Model):
    """A passkey (WebAuthn credential) a steward registered in the dashboard to sign approvals.

    Only its public key is kept (``webauthn:<alg>:<base64 SPKI>``, fedcore.webauthn); sites pin
    that text in site.toml. The server never holds anything that can sign with it.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="passkeys"
    )
    name = models.CharField(max_length=100, blank=True)
    credential_id = models.CharField(max_length=1400, unique=True)  # base64url
    public_key = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"passkey {self.name or self.pk} of user {self.user_id}"
