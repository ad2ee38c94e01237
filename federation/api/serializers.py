"""Serializers of the REST API: module level, one unique name each (the OpenAPI component names).

Output serializers are read-only views of models. Input serializers derive from
``StrictSerializer``: an unknown key is a 400 naming it, never silently ignored. Fields that name
other objects only resolve objects the requesting user can see (``federation.permissions``); a
foreign id is refused exactly like a missing one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Model, QuerySet
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fedcore.plan import openapi_schema
from federation import fairness_outcome, governance, permissions, selectors
from federation.models import (
    ApiToken,
    Approval,
    AuditEvent,
    Consortium,
    Invitation,
    Membership,
    ModelVersion,
    Organization,
    PlanVersion,
    PrivacyLedgerEntry,
    Role,
    Round,
    Run,
    Silo,
    TrainingPlan,
    UploadedModel,
)

User = get_user_model()

# Largest id or count accepted in a body: the signed 64-bit range every database can hold.
MAX_INT = 2**63 - 1
# At most this many ids in one list field (a plan's silos), each resolved in one query.
MAX_IDS = 1000

# --- input helpers ------------------------------------------------------------------------------


class StrictSerializer(serializers.Serializer):
    """Refuses keys it does not declare: each unknown key is reported as a field error."""

    def to_internal_value(self, data: Any) -> Any:
        unknown: dict[str, list[str]] = {}
        if isinstance(data, Mapping):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = {str(key): ["Unknown field."] for key in data if key not in writable}
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if unknown and isinstance(exc.detail, dict):
                raise serializers.ValidationError({**exc.detail, **unknown}) from exc
            raise
        if unknown:
            raise serializers.ValidationError(unknown)
        return value


class TextField(serializers.CharField):
    """A string, and only a string (DRF's CharField turns 5 into "5")."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class WholeNumberField(serializers.IntegerField):
    """A JSON integer (DRF's IntegerField also takes "5", 5.0 and true)."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class RealNumberField(serializers.FloatField):
    """A JSON number (DRF's FloatField also takes "0.5" and true)."""

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class FlagField(serializers.BooleanField):
    """A JSON boolean (DRF's BooleanField also takes "yes", 1 and "on")."""

    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


def _user(field: serializers.Field) -> Any:
    request = field.context.get("request")
    return getattr(request, "user", None)


class VisiblePrimaryKeyField(serializers.PrimaryKeyRelatedField):
    """An id of an object the requesting user can see (missing and foreign ids look alike)."""

    def __init__(self, *, scope: Callable[[Any], QuerySet[Any]], model: type[Model], **kwargs):
        self.scope = scope
        # The model's empty queryset only tells the schema generator what the id refers to.
        super().__init__(queryset=model.objects.none(), **kwargs)

    def get_queryset(self) -> QuerySet[Any]:
        return self.scope(_user(self))


@extend_schema_field({"type": "array", "items": {"type": "integer"}, "maxItems": MAX_IDS})
class VisibleIdListField(serializers.Field):
    """A list of ids of objects the user can see, resolved in one query (order kept, deduped)."""

    default_error_messages = {
        "not_a_list": "Expected a list of ids.",
        "too_many": f"At most {MAX_IDS} ids.",
        "invalid": "Ids must be integers: {bad}.",
        "missing": "No such objects: {ids}.",
    }

    def __init__(self, *, scope: Callable[[Any], QuerySet[Any]], **kwargs: Any) -> None:
        self.scope = scope
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[Any]:
        if not isinstance(data, list):
            self.fail("not_a_list")
        if len(data) > MAX_IDS:
            self.fail("too_many")
        bad = [
            repr(item)
            for item in data
            if isinstance(item, bool) or not isinstance(item, int) or not 0 < item <= MAX_INT
        ]
        if bad:
            self.fail("invalid", bad=", ".join(bad[:5]))
        ids = list(dict.fromkeys(data))
        found = {obj.pk: obj for obj in self.scope(_user(self)).filter(pk__in=ids)}
        missing = [str(pk) for pk in ids if pk not in found]
        if missing:
            self.fail("missing", ids=", ".join(missing[:20]))
        return [found[pk] for pk in ids]

    def to_representation(self, value: Any) -> list[int]:
        return [obj.pk for obj in value]


@extend_schema_field({"type": "object", "additionalProperties": True})
class JSONObjectField(serializers.JSONField):
    """A JSON object (not a list or scalar), without NUL characters (PostgreSQL refuses them)."""

    default_error_messages = {
        "not_an_object": "Expected a JSON object.",
        "nul": "NUL characters are not allowed.",
    }

    def to_internal_value(self, data: Any) -> Any:
        value = super().to_internal_value(data)
        if not isinstance(value, dict):
            self.fail("not_an_object")
        if "\\u0000" in json.dumps(value):
            self.fail("nul")
        return value


# --- errors (documented in the schema for every operation) --------------------------------------


class ErrorDetailSerializer(serializers.Serializer):
    """{"detail": message}: 401, 403, 404, 409, 413, 415."""

    detail = serializers.CharField()


# --- people and consortia ------------------------------------------------------------------------


class UserSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = User
        fields = ["id", "username"]
        read_only_fields = fields


class MembershipSerializer(serializers.ModelSerializer):
    user = UserSummarySerializer(read_only=True)
    organization_name = serializers.CharField(source="organization.name", read_only=True)
    consortium = serializers.IntegerField(source="organization.consortium_id", read_only=True)
    consortium_name = serializers.CharField(source="organization.consortium.name", read_only=True)
    granted_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )

    class Meta:
        model = Membership
        fields = [
            "id",
            "user",
            "organization",
            "organization_name",
            "consortium",
            "consortium_name",
            "role",
            "status",
            "granted_by",
            "accepted_at",
            "deactivated_at",
            "created_at",
        ]
        read_only_fields = fields


class MeSerializer(serializers.ModelSerializer):
    # Plain text: an unset address is "", which is not format "email".
    email = serializers.CharField(read_only=True)
    memberships = MembershipSerializer(many=True, read_only=True)

    class Meta:
        model = User
        fields = ["id", "username", "email", "first_name", "last_name", "memberships"]
        read_only_fields = fields


class ConsortiumSerializer(serializers.ModelSerializer):
    class Meta:
        model = Consortium
        fields = ["id", "name", "description", "created_at"]
        read_only_fields = fields


class ConsortiumRulesSerializer(serializers.ModelSerializer):
    class Meta:
        model = Consortium
        fields = ["require_steward_unanimity", "org_quorum_mode", "org_quorum_value"]
        read_only_fields = fields


class ConsortiumDetailSerializer(serializers.ModelSerializer):
    rules = ConsortiumRulesSerializer(source="*", read_only=True)

    class Meta:
        model = Consortium
        fields = ["id", "name", "description", "created_at", "rules"]
        read_only_fields = fields


class OrganizationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Organization
        fields = ["id", "consortium", "name", "kind"]
        read_only_fields = fields


class ConsortiumOrganizationField(serializers.PrimaryKeyRelatedField):
    """An organisation of the consortium named by the URL (the view puts it in the context)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(queryset=Organization.objects.none(), **kwargs)

    def get_queryset(self) -> QuerySet[Organization]:
        return Organization.objects.filter(consortium=self.context["consortium"])


class MembershipAddSerializer(StrictSerializer):
    user = TextField(max_length=150, help_text="The username")
    organization = ConsortiumOrganizationField()
    role = serializers.ChoiceField(choices=Role.choices)


class MembershipRoleSerializer(StrictSerializer):
    role = serializers.ChoiceField(choices=Role.choices, help_text="The member's new role")


class OrganizationCreateSerializer(StrictSerializer):
    name = TextField(max_length=200)
    kind = serializers.ChoiceField(
        choices=Organization.Kind.choices, required=False, default=Organization.Kind.OTHER
    )


class InvitationCreateSerializer(StrictSerializer):
    email = TextField(max_length=254, help_text="The invitee's e-mail address")
    organization = ConsortiumOrganizationField()
    role = serializers.ChoiceField(choices=Role.choices)
    days = WholeNumberField(
        required=False,
        min_value=1,
        help_text="Days until the link expires (QUORUM_INVITATION_DAYS, 7, by default)",
    )


class InvitationSerializer(serializers.ModelSerializer):
    """An e-mail invitation (never its token: only its hash is kept)."""

    organization_name = serializers.CharField(source="organization.name", read_only=True)
    invited_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )
    state = serializers.ChoiceField(
        choices=["open", "accepted", "revoked", "expired"], read_only=True
    )

    class Meta:
        model = Invitation
        fields = [
            "id",
            "consortium",
            "organization",
            "organization_name",
            "email",
            "role",
            "state",
            "invited_by",
            "membership",
            "created_at",
            "expires_at",
            "accepted_at",
            "revoked_at",
        ]
        read_only_fields = fields


class InvitationCreatedSerializer(InvitationSerializer):
    """A new invitation with its link, shown only in this answer (the server keeps a hash)."""

    link = serializers.CharField(read_only=True)
    email_sent = serializers.BooleanField(read_only=True)
    email_error = serializers.CharField(read_only=True)

    class Meta(InvitationSerializer.Meta):
        fields = [*InvitationSerializer.Meta.fields, "link", "email_sent", "email_error"]
        read_only_fields = fields


# --- silos ----------------------------------------------------------------------------------------


class SiloSerializer(serializers.ModelSerializer):
    """A silo as lists show it (never its token hash)."""

    organization_name = serializers.CharField(source="organization.name", read_only=True)
    online = serializers.SerializerMethodField()
    has_token = serializers.SerializerMethodField()

    class Meta:
        model = Silo
        fields = [
            "id",
            "consortium",
            "organization",
            "organization_name",
            "name",
            "description",
            "row_count",
            "location",
            "admission",
            "has_token",
            "online",
            "last_heartbeat",
            "agent_version",
            "epsilon_budget",
            "delta_budget",
            "created_at",
        ]
        read_only_fields = fields

    def get_online(self, silo: Silo) -> bool:
        return selectors.silo_is_online(silo)

    def get_has_token(self, silo: Silo) -> bool:
        return silo.token_hash is not None


class AnnouncedKindSerializer(serializers.Serializer):
    """An installed model kind a silo's agent announced (name, version, distribution digest)."""

    name = serializers.CharField(read_only=True)
    version = serializers.CharField(read_only=True)
    sha256 = serializers.CharField(read_only=True)


class SiloDetailSerializer(SiloSerializer):
    """A silo with its data schema and the installed model kinds its agent last announced (what
    a plan may name as ``{"kind": "installed", ...}``, docs/tasks.md)."""

    schema = serializers.JSONField(read_only=True)
    model_kinds = AnnouncedKindSerializer(many=True, read_only=True)

    class Meta(SiloSerializer.Meta):
        fields = [*SiloSerializer.Meta.fields, "schema", "model_kinds"]
        read_only_fields = fields


class SiloRegisterSerializer(StrictSerializer):
    organization = VisiblePrimaryKeyField(
        model=Organization,
        scope=lambda user: Organization.objects.filter(
            consortium_id__in=permissions.consortium_ids_of(user)
        ),
    )
    name = TextField(max_length=100)
    description = TextField(required=False, allow_blank=True, default="")
    schema = JSONObjectField()
    row_count = WholeNumberField(min_value=0, max_value=2**31 - 1)
    location = TextField(max_length=500, required=False, allow_blank=True, default="")


class SiloRejectSerializer(StrictSerializer):
    reason = TextField(max_length=2000)


class SiloBudgetSerializer(StrictSerializer):
    """A silo's privacy budget: null epsilon means no budget, null delta the plan's delta."""

    epsilon = RealNumberField(allow_null=True, min_value=0.0)
    delta = RealNumberField(allow_null=True, min_value=0.0, max_value=1.0)


class LedgerEntrySerializer(serializers.ModelSerializer):
    """One mechanism applied to a silo's data, with the silo's composed epsilon after it."""

    class Meta:
        model = PrivacyLedgerEntry
        fields = [
            "id",
            "run",
            "round_number",
            "mechanism",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "delta",
            "epsilon_reported",
            "epsilon_pure",  # pure epsilon-DP entries (noisy fairness counts): added to the total
            "epsilon_total",
            "created_at",
        ]
        read_only_fields = fields


class SiloBudgetReportSerializer(serializers.Serializer):
    """Budget, spend (composed by the accountant) and what remains."""

    epsilon_budget = serializers.FloatField(allow_null=True)
    delta_budget = serializers.FloatField(allow_null=True)
    epsilon_spent = serializers.FloatField()
    epsilon_remaining = serializers.FloatField(allow_null=True)
    entries = LedgerEntrySerializer(many=True)


class AgentTokenSerializer(serializers.Serializer):
    """The agent token: returned once, never stored in clear."""

    token = serializers.CharField(read_only=True)


# --- plans ----------------------------------------------------------------------------------------


class PlanVersionSerializer(serializers.ModelSerializer):
    """A plan version without its spec (lists)."""

    silos = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = PlanVersion
        fields = ["number", "spec_hash", "silos", "created_by", "created_at"]
        read_only_fields = fields


class PlanVersionDetailSerializer(PlanVersionSerializer):
    spec = serializers.JSONField(read_only=True)

    class Meta(PlanVersionSerializer.Meta):
        fields = [*PlanVersionSerializer.Meta.fields, "spec"]
        read_only_fields = fields


class ApprovalRulePartSerializer(serializers.Serializer):
    """One part of the approval rule (federation.governance.RulePart) and its progress."""

    name = serializers.ChoiceField(choices=["stewards", "organizations"], read_only=True)
    rule = serializers.CharField(read_only=True, help_text="whose approvals count for this part")
    needed = serializers.IntegerField(read_only=True)
    counted = serializers.IntegerField(
        read_only=True, help_text="approvals counted toward `needed`; never more than it"
    )
    approved = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="silos (stewards) or organisations (organizations) approved, all of them",
    )
    missing = serializers.ListField(child=serializers.CharField(), read_only=True)
    met = serializers.BooleanField(read_only=True)
    progress = serializers.CharField(
        read_only=True, help_text='"1 of 3 needed", or "met (4 approved, 3 needed)"'
    )


class ApprovalStateSerializer(serializers.Serializer):
    """federation.governance.ApprovalState of the current version: the rule in one sentence,
    each part with its progress, and the flat fields earlier clients read."""

    plan_hash = serializers.CharField(read_only=True)
    stewards_missing = serializers.ListField(child=serializers.CharField(), read_only=True)
    organizations_approved = serializers.ListField(child=serializers.CharField(), read_only=True)
    organizations_needed = serializers.IntegerField(read_only=True)
    rejected_by = serializers.ListField(child=serializers.CharField(), read_only=True)
    not_counted = serializers.ListField(child=serializers.CharField(), read_only=True)
    satisfied = serializers.BooleanField(read_only=True)
    rule = serializers.CharField(read_only=True)
    parts = ApprovalRulePartSerializer(many=True, read_only=True)


class PlanSerializer(serializers.ModelSerializer):
    """A plan as lists show it."""

    proposed_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    version = serializers.IntegerField(
        source="current_version.number", read_only=True, allow_null=True
    )
    plan_hash = serializers.CharField(
        source="current_version.spec_hash", read_only=True, allow_null=True
    )

    class Meta:
        model = TrainingPlan
        fields = [
            "id",
            "consortium",
            "name",
            "description",
            "status",
            "proposed_by",
            "version",
            "plan_hash",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class PlanDetailSerializer(PlanSerializer):
    """A plan with its current version and the approval state of that version."""

    current_version = PlanVersionDetailSerializer(read_only=True, allow_null=True)
    approval_state = serializers.SerializerMethodField()

    class Meta(PlanSerializer.Meta):
        fields = [
            *PlanSerializer.Meta.fields,
            "rejection_reason",
            "current_version",
            "approval_state",
        ]
        read_only_fields = fields

    @extend_schema_field(ApprovalStateSerializer(allow_null=True))
    def get_approval_state(self, plan: TrainingPlan) -> dict[str, Any] | None:
        if plan.current_version is None:
            return None
        return ApprovalStateSerializer(governance.approval_state(plan.current_version)).data


@extend_schema_field(openapi_schema())
class PlanSpecField(JSONObjectField):
    """A plan spec: its schema is the plan language's (fedcore.plan, docs/plan-spec.md)."""


class PlanProposeSerializer(StrictSerializer):
    consortium = VisiblePrimaryKeyField(model=Consortium, scope=permissions.consortia_of)
    name = TextField(max_length=200)
    description = TextField(required=False, allow_blank=True, default="")
    spec = PlanSpecField()
    silos = VisibleIdListField(scope=permissions.silos_visible_to)
    submit = FlagField(required=False, default=True)


class PlanEditSerializer(StrictSerializer):
    spec = PlanSpecField()
    silos = VisibleIdListField(scope=permissions.silos_visible_to)
    description = TextField(required=False, allow_blank=True)


class PlanDecisionSerializer(StrictSerializer):
    """An approval: the hash the member reviewed, and (if they act for several) the organisation."""

    plan_hash = TextField(max_length=64)
    organization = VisiblePrimaryKeyField(
        model=Organization,
        scope=lambda user: Organization.objects.filter(
            consortium_id__in=permissions.consortium_ids_of(user)
        ),
        required=False,
        allow_null=True,
        default=None,
    )


class PlanApprovalSerializer(PlanDecisionSerializer):
    """An approval, optionally with the steward's signature over it (fedcore.approvals): an
    object ``{kind, key, signed_at, signature}`` from ``quorum-agent steward-key sign``; the
    sites that pin the key train only on approvals signed so."""

    signature = serializers.JSONField(required=False, allow_null=True, default=None)


class PlanRejectionSerializer(PlanDecisionSerializer):
    reason = TextField(max_length=2000)


class ApprovalSerializer(serializers.ModelSerializer):
    version = serializers.IntegerField(source="version.number", read_only=True)
    user = serializers.SlugRelatedField(slug_field="username", read_only=True)
    organization_name = serializers.CharField(source="organization.name", read_only=True)

    class Meta:
        model = Approval
        fields = [
            "id",
            "version",
            "plan_hash",
            "user",
            "organization",
            "organization_name",
            "role",
            "decision",
            "reason",
            "created_at",
            "signature",
        ]
        read_only_fields = fields


class PlanDiffQuerySerializer(serializers.Serializer):
    """?from=&to= of a plan diff (``from`` is a Python keyword, hence get_fields). Other query
    parameters are ignored, as on every GET."""

    def get_fields(self) -> dict[str, serializers.Field]:
        return {
            "from": serializers.IntegerField(min_value=1, max_value=MAX_INT),
            "to": serializers.IntegerField(min_value=1, max_value=MAX_INT),
        }


class PlanChangeSerializer(serializers.Serializer):
    """One difference between two versions: a spec path, or "silos" (with silo names)."""

    path = serializers.CharField(read_only=True)
    old = serializers.JSONField(read_only=True, allow_null=True)
    new = serializers.JSONField(read_only=True, allow_null=True)
    added = serializers.ListField(child=serializers.CharField(), read_only=True, allow_null=True)
    removed = serializers.ListField(child=serializers.CharField(), read_only=True, allow_null=True)


class PlanDiffSerializer(serializers.Serializer):
    from_version = serializers.IntegerField(read_only=True)
    to_version = serializers.IntegerField(read_only=True)
    from_hash = serializers.CharField(read_only=True)
    to_hash = serializers.CharField(read_only=True)
    changes = PlanChangeSerializer(many=True, read_only=True)


# --- runs -----------------------------------------------------------------------------------------


class RunSerializer(serializers.ModelSerializer):
    """A run as lists show it."""

    plan_name = serializers.CharField(source="plan.name", read_only=True)
    consortium = serializers.IntegerField(source="plan.consortium_id", read_only=True)
    version = serializers.IntegerField(source="version.number", read_only=True)
    started_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Run
        fields = [
            "id",
            "plan",
            "plan_name",
            "consortium",
            "version",
            "plan_hash",
            "status",
            "rounds",
            "started_by",
            "error",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class RoundSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = Round
        fields = ["number", "attempt", "status", "started_at", "finished_at"]
        read_only_fields = fields


class RunRefusalSerializer(serializers.Serializer):
    """A silo out of the run's selection: its agent refused the run (federation.services.refusals)."""

    silo = serializers.IntegerField(source="silo_id", read_only=True)
    silo_name = serializers.CharField(source="silo.name", read_only=True)
    code = serializers.CharField(read_only=True)
    reason = serializers.CharField(read_only=True)
    round = serializers.IntegerField(source="round_number", read_only=True, allow_null=True)
    since = serializers.DateTimeField(read_only=True)
    last_at = serializers.DateTimeField(read_only=True)
    count = serializers.IntegerField(read_only=True)


class CalibrationBinSerializer(serializers.Serializer):
    """One probability bin of the pooled calibration curve (null mean and rate: no row)."""

    bin = serializers.IntegerField(read_only=True)
    lower = serializers.FloatField(read_only=True)
    upper = serializers.FloatField(read_only=True)
    count = serializers.IntegerField(read_only=True)
    positives = serializers.IntegerField(read_only=True)
    mean_predicted = serializers.FloatField(read_only=True, allow_null=True)
    observed_rate = serializers.FloatField(read_only=True, allow_null=True)


class CalibrationCurveSerializer(serializers.Serializer):
    """The calibration curve pooled from the sites' per-bin sums (fedcore.calibration): exact
    for its bins on the union of the evaluated rows."""

    grid = serializers.CharField(read_only=True)
    bins = serializers.IntegerField(read_only=True)
    rows = CalibrationBinSerializer(many=True, read_only=True)
    n = serializers.IntegerField(read_only=True)
    expected_calibration_error = serializers.FloatField(read_only=True, allow_null=True)
    method = serializers.CharField(read_only=True)


class EvaluatedVersionSerializer(serializers.Serializer):
    """What an evaluation plan evaluated: a run's registered model version (run,
    model_version), or an uploaded model (uploaded, name, uploaded_by; run and model_version
    null); its weights' SHA-256 either way."""

    run = serializers.IntegerField(read_only=True, allow_null=True)
    model_version = serializers.IntegerField(read_only=True, allow_null=True)
    uploaded = serializers.IntegerField(read_only=True, required=False)
    name = serializers.CharField(read_only=True, required=False)
    uploaded_by = serializers.CharField(read_only=True, required=False, allow_null=True)
    sha256 = serializers.CharField(read_only=True)


class FinalEvaluationSerializer(serializers.Serializer):
    """The final model on the union of the silos' held-out rows (federation.services.evaluation):
    ``metrics`` = auc, auc_error_bound, accuracy, loss, n, positives, negatives, bins."""

    model_version = serializers.IntegerField(read_only=True)
    asked = serializers.ListField(child=serializers.CharField(), read_only=True)
    evaluated = serializers.ListField(child=serializers.CharField(), read_only=True)
    missing = serializers.ListField(child=serializers.CharField(), read_only=True)
    metrics = serializers.DictField(read_only=True, allow_null=True)
    by_silo = serializers.DictField(child=serializers.DictField(), read_only=True)
    method = serializers.CharField(read_only=True)
    note = serializers.CharField(read_only=True)
    fairness = serializers.DictField(read_only=True, allow_null=True)
    fairness_note = serializers.CharField(read_only=True, allow_null=True)
    # A postprocess plan's group thresholds of the final model (federation.services.mitigation):
    # absent for other plans; null with thresholds_note saying why none could be chosen.
    thresholds = serializers.DictField(read_only=True, allow_null=True, required=False)
    thresholds_note = serializers.CharField(read_only=True, allow_null=True, required=False)
    # With thresholds: their decisions on the pooled held-out rows (what is deployed;
    # federation.fairness_outcome.thresholded_report): demographic_parity_difference,
    # equalized_odds_difference, accuracy, limits, flags, in_sample (true: the thresholds were
    # chosen on these rows, rows "held_out") and note. "fairness" stays the raw model's at 0.5.
    # Null with thresholded_fairness_note saying why; absent for other plans and older runs.
    thresholded_fairness = serializers.DictField(read_only=True, allow_null=True, required=False)
    thresholded_fairness_note = serializers.CharField(
        read_only=True, allow_null=True, required=False
    )
    # null with calibration_note when a site sent no calibration sums (absent: an older run)
    calibration = CalibrationCurveSerializer(read_only=True, allow_null=True, required=False)
    calibration_note = serializers.CharField(read_only=True, allow_null=True, required=False)
    # an evaluation plan's run ("plan_kind": "evaluation"): the version evaluated and which
    # rows every site evaluated ("held_out" or "all", and in words); absent for training runs
    plan_kind = serializers.CharField(read_only=True, required=False)
    source = EvaluatedVersionSerializer(read_only=True, required=False)
    rows = serializers.CharField(read_only=True, required=False)
    rows_note = serializers.CharField(read_only=True, required=False)
    finished_at = serializers.CharField(read_only=True)
    # The plan's task (docs/tasks.md); absent for binary runs evaluated before tasks existed.
    # Multi-class: metrics and by_silo hold accuracy, macro_f1, weighted_f1, per_class,
    # confusion, auc_ovr; regression: rmse, mae, r2, mean_error. task_fairness: per sensitive
    # attribute the group report of fedcore.task_fairness (fairness stays the binary report).
    task = serializers.CharField(read_only=True, required=False)
    task_fairness = serializers.DictField(read_only=True, allow_null=True, required=False)


class FairnessFlagSerializer(serializers.Serializer):
    metric = serializers.CharField(read_only=True)
    label = serializers.CharField(read_only=True)
    value = serializers.FloatField(read_only=True)
    limit = serializers.FloatField(read_only=True)


class FairnessWarningSerializer(serializers.Serializer):
    """The run ended, but its final model's deployed decisions exceed a fairness limit of the
    plan (federation.fairness_outcome.final_fairness_warning): ``decisions`` "thresholded" for
    a postprocess run with thresholds (their decisions on the pooled held-out rows), else
    "raw" (the model at 0.5)."""

    code = serializers.CharField(read_only=True)
    model_version = serializers.IntegerField(read_only=True)
    attribute = serializers.CharField(read_only=True)
    decisions = serializers.CharField(read_only=True)
    flags = FairnessFlagSerializer(many=True, read_only=True)
    message = serializers.CharField(read_only=True)


class FairnessInfoSerializer(serializers.Serializer):
    """No warning: the raw model (at 0.5) exceeds a fairness limit of the plan, but the
    postprocess thresholds deployed with it bring its decisions within every limit
    (federation.fairness_outcome.final_fairness_info). ``flags``: the raw model's;
    ``thresholded``: the same metrics after thresholds; ``in_sample`` as in
    ``final_evaluation.thresholded_fairness``."""

    code = serializers.CharField(read_only=True)
    model_version = serializers.IntegerField(read_only=True)
    attribute = serializers.CharField(read_only=True)
    flags = FairnessFlagSerializer(many=True, read_only=True)
    thresholded = FairnessFlagSerializer(many=True, read_only=True)
    in_sample = serializers.BooleanField(read_only=True)
    message = serializers.CharField(read_only=True)


class RunDetailSerializer(RunSerializer):
    """A run with the state of each of its rounds, the silos it no longer selects and why, its
    final model's evaluation (null until the run's evaluation phase ended) and, when that final
    model's deployed decisions exceed a fairness limit of the plan, ``fairness_warning`` (else
    null); ``fairness_info`` when only the raw model does and its postprocess thresholds bring
    it within (else null)."""

    round_summary = RoundSummarySerializer(source="round_set", many=True, read_only=True)
    waiting_since = serializers.DateTimeField(read_only=True, allow_null=True)
    refusals = serializers.SerializerMethodField()
    final_evaluation = FinalEvaluationSerializer(
        source="evaluation", read_only=True, allow_null=True
    )
    fairness_warning = serializers.SerializerMethodField()
    fairness_info = serializers.SerializerMethodField()

    class Meta(RunSerializer.Meta):
        fields = [
            *RunSerializer.Meta.fields,
            "round_summary",
            "waiting_since",
            "refusals",
            "final_evaluation",
            "fairness_warning",
            "fairness_info",
        ]
        read_only_fields = fields

    @extend_schema_field(FairnessWarningSerializer(allow_null=True))
    def get_fairness_warning(self, run: Run) -> dict[str, Any] | None:
        return fairness_outcome.final_fairness_warning(run.evaluation)

    @extend_schema_field(FairnessInfoSerializer(allow_null=True))
    def get_fairness_info(self, run: Run) -> dict[str, Any] | None:
        return fairness_outcome.final_fairness_info(run.evaluation)

    @extend_schema_field(RunRefusalSerializer(many=True))
    def get_refusals(self, run: Run) -> list[dict[str, Any]]:
        return RunRefusalSerializer(selectors.run_refusals(run), many=True).data


class RunStartSerializer(StrictSerializer):
    plan = VisiblePrimaryKeyField(model=TrainingPlan, scope=permissions.plans_visible_to)


class RoundMetricValueSerializer(serializers.Serializer):
    scope = serializers.CharField(read_only=True)
    name = serializers.CharField(read_only=True)
    value = serializers.FloatField(read_only=True)


class RoundSerializer(serializers.ModelSerializer):
    """A round: how many silos were asked, how many answered, and the round-level metrics."""

    selected_count = serializers.IntegerField(read_only=True)
    updates_count = serializers.IntegerField(read_only=True)
    metrics = RoundMetricValueSerializer(source="summary_metrics", many=True, read_only=True)

    class Meta:
        model = Round
        fields = [
            "number",
            "attempt",
            "status",
            "selected_count",
            "updates_count",
            "metrics",
            "deadline",
            "started_at",
            "finished_at",
            "error",
        ]
        read_only_fields = fields


class ModelVersionSerializer(serializers.ModelSerializer):
    """A global model version; ``id`` is what /api/v1/models/{id}/ and its downloads take."""

    round = serializers.IntegerField(source="round.number", read_only=True, allow_null=True)

    class Meta:
        model = ModelVersion
        fields = ["id", "run", "number", "round", "checksum", "size_bytes", "created_at"]
        read_only_fields = fields


class UploadedModelSerializer(serializers.ModelSerializer):
    """A model uploaded to a consortium for evaluation plans (``{"uploaded": id, "sha256":
    checksum}`` in a plan's model_version section)."""

    uploaded_by = serializers.CharField(
        source="uploaded_by.username", read_only=True, allow_null=True, default=None
    )

    class Meta:
        model = UploadedModel
        fields = [
            "id",
            "consortium",
            "name",
            "description",
            "uploaded_by",
            "model",
            "checksum",
            "size_bytes",
            "created_at",
        ]
        read_only_fields = fields


class UploadedModelDetailSerializer(UploadedModelSerializer):
    """An uploaded model with the schema and fitted preprocessing it reads, its tensors, and
    the URL of its safetensors file."""

    download = serializers.SerializerMethodField()

    class Meta(UploadedModelSerializer.Meta):
        fields = [
            *UploadedModelSerializer.Meta.fields,
            "schema",
            "preprocessing",
            "signature",
            "download",
        ]
        read_only_fields = fields

    def get_download(self, uploaded: UploadedModel) -> str:
        return reverse("api:uploaded-model-download", args=[uploaded.pk])


class UploadedModelUploadSerializer(StrictSerializer):
    """multipart/form-data: model, schema and preprocessing as JSON text, weights a file."""

    name = TextField(max_length=200)
    description = TextField(required=False, allow_blank=True, default="")
    model = JSONObjectField(binary=True, help_text="the model spec (a plan's model section)")
    schema = JSONObjectField(binary=True, help_text="the dataset schema the model reads")
    preprocessing = JSONObjectField(
        binary=True,
        help_text="the fitted preprocessing of that schema (fedcore.tabular.merge_statistics)",
    )
    weights = serializers.FileField(
        help_text="the weights as a .safetensors file (never a pickle or torch.save file)"
    )


class ModelVersionDetailSerializer(ModelVersionSerializer):
    """A model version with the URLs of its safetensors file, ONNX export and model card."""

    links = serializers.SerializerMethodField()

    class Meta(ModelVersionSerializer.Meta):
        fields = [*ModelVersionSerializer.Meta.fields, "links"]
        read_only_fields = fields

    @extend_schema_field(
        {
            "type": "object",
            "properties": {
                name: {"type": "string"} for name in ("download", "onnx", "card", "card_page")
            },
            "required": ["download", "onnx", "card", "card_page"],
        }
    )
    def get_links(self, version: ModelVersion) -> dict[str, str]:
        return {
            "download": reverse("api:model-download", args=[version.pk]),
            "onnx": reverse("api:model-onnx", args=[version.pk]),
            "card": reverse("api:model-card", args=[version.pk]),
            "card_page": reverse("dashboard:model_card", args=[version.pk]),
        }


# --- reports --------------------------------------------------------------------------------------


class RunPrivacySerializer(serializers.Serializer):
    """A run's privacy: the plan's mode and settings and the epsilon each silo spent on it."""

    mode = serializers.CharField()
    settings = serializers.DictField(allow_null=True)
    epsilon_spent = serializers.DictField(child=serializers.FloatField())
    status = serializers.CharField()


class RunAnalysisSerializer(serializers.Serializer):
    """An analysis run: its analysis, steps, and the released result (docs/analytics.md)."""

    run = serializers.IntegerField()
    status = serializers.CharField()
    kind = serializers.CharField(
        allow_null=True, help_text="the analysis: count, crosstab, ... (null: a training run)"
    )
    steps = serializers.ListField(child=serializers.CharField())
    step = serializers.CharField(allow_null=True, help_text="the step asked now (null: none)")
    result = serializers.DictField(
        allow_null=True,
        help_text="the released result (null until released, or when it was withheld); "
        "suppressed cells are null and listed under 'suppressed'",
    )
    error = serializers.CharField(help_text="why nothing was released, when the run failed")


class PrivacySiloSerializer(serializers.Serializer):
    silo = serializers.IntegerField(source="silo.pk")
    name = serializers.CharField(source="silo.name")
    budget = serializers.FloatField(allow_null=True)
    delta = serializers.FloatField(allow_null=True)
    spent = serializers.FloatField()
    remaining = serializers.FloatField(allow_null=True)
    entries = LedgerEntrySerializer(many=True)


class PrivacyRunSerializer(serializers.Serializer):
    run = serializers.IntegerField(source="run_id", allow_null=True)
    entries = LedgerEntrySerializer(many=True)


class PrivacyProjectionSerializer(serializers.Serializer):
    silo = serializers.CharField(source="silo.name")
    projected = serializers.FloatField()
    total_after = serializers.FloatField()
    budget = serializers.FloatField(allow_null=True)
    fits = serializers.BooleanField()


class PrivacyPendingSerializer(serializers.Serializer):
    plan = serializers.IntegerField(source="plan.pk")
    name = serializers.CharField(source="plan.name")
    version = serializers.IntegerField(source="version.number")
    silos = PrivacyProjectionSerializer(many=True)


class ConsortiumPrivacySerializer(serializers.Serializer):
    """The consortium's privacy budget report: per silo its budget, spend and ledger; the ledger
    by run, newest first; the projected cost of plans waiting to run."""

    silos = PrivacySiloSerializer(many=True)
    runs = PrivacyRunSerializer(many=True)
    pending = PrivacyPendingSerializer(many=True)


class ApiEndpointSerializer(serializers.Serializer):
    name = serializers.CharField()
    url = serializers.CharField()
    methods = serializers.ListField(child=serializers.CharField())
    summary = serializers.CharField()


class ApiIndexSerializer(serializers.Serializer):
    """Every endpoint of /api/v1/ with its methods; the schema and its docs page."""

    version = serializers.CharField()
    schema = serializers.CharField()
    docs = serializers.CharField()
    endpoints = ApiEndpointSerializer(many=True)


# --- audit ----------------------------------------------------------------------------------------


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = [
            "index",
            "created_at",
            "actor",
            "action",
            "consortium_id",
            "object_type",
            "object_id",
            "data",
            "prev_hash",
            "hash",
        ]
        read_only_fields = fields


class AuditHeadSerializer(serializers.Serializer):
    index = serializers.IntegerField(read_only=True)
    hash = serializers.CharField(read_only=True)


class ServerKeySerializer(serializers.Serializer):
    public_key = serializers.CharField(read_only=True)


class ApiTokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "expires_at", "last_used_at"]
        read_only_fields = fields


class ApiTokenCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False, default="", allow_blank=True)
    days = serializers.IntegerField(required=False, min_value=1)


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    token = serializers.CharField(read_only=True, help_text="shown only in this response")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class TokenObtainSerializer(StrictSerializer):
    """A username and password, exchanged for a new API token (``quorum login``)."""

    username = TextField(max_length=150)
    password = TextField(max_length=4096, trim_whitespace=False, style={"input_type": "password"})
    name = TextField(max_length=100, required=False, allow_blank=True, default="quorum login")
    days = WholeNumberField(required=False, min_value=1)


class InvitationAcceptSerializer(StrictSerializer):
    """An invitation link's token, and for a newcomer the username and password they choose."""

    token = TextField(max_length=200)
    username = TextField(max_length=150, required=False, allow_blank=True, default="")
    password = TextField(
        max_length=4096,
        required=False,
        allow_blank=True,
        default="",
        trim_whitespace=False,
        style={"input_type": "password"},
    )


class InvitationAcceptedSerializer(serializers.Serializer):
    username = serializers.CharField(read_only=True)
    membership = MembershipSerializer(read_only=True)
