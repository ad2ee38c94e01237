"""Training plan writes: proposing and editing versions, and the approval workflow.

A plan's content lives in numbered, immutable versions; each approval or rejection belongs to one
version and names its hash, so an edit (version n+1) starts the approvals afresh. The rules that
turn approvals into "approved" are in ``federation.governance.approval_state``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.http import Http404
from django.utils import timezone

from fedcore import approvals, model_kinds, models
from fedcore.plan import (
    PlanError,
    is_evaluation_plan,
    parse_schema,
    plan_errors,
    versioned_spec,
)
from fedcore.plan import plan_hash as compute_plan_hash
from fedcore.plan.keys import is_int
from fedcore.tabular import DatasetSchema, SchemaError
from federation import dispatch, governance, permissions
from federation.fairness_outcome import unavailable_mitigation_error
from federation.models import (
    Approval,
    Consortium,
    Organization,
    PlanVersion,
    Role,
    Silo,
    TrainingPlan,
)
from federation.services.audit import actor_label, audit_append
from federation.services.errors import Conflict
from federation.services.evaluation_plans import source_errors

Status = TrainingPlan.Status

# From where a plan may be withdrawn (by its proposer) and edited.
WITHDRAWABLE = frozenset({Status.DRAFT, Status.SUBMITTED, Status.APPROVED, Status.REJECTED})
NOT_EDITABLE = frozenset({Status.RUNNING, Status.WITHDRAWN})
# An edit of a plan in one of these states sends the new version back for approval.
EDIT_RESUBMITS = frozenset(
    {
        Status.SUBMITTED,
        Status.APPROVED,
        Status.REJECTED,
        Status.COMPLETED,
        Status.FAILED,
        Status.STOPPED,
    }
)


def _silo_schema_problems(schema: DatasetSchema, silo: Any) -> list[str]:
    """Columns the plan's schema uses that a silo's registered schema lacks or types otherwise."""
    name = getattr(silo, "name", str(silo))
    try:
        local = DatasetSchema.from_dict(silo.schema)
    except (SchemaError, TypeError, KeyError, AttributeError):
        return [f"silo '{name}' has no valid registered schema"]
    types = {column.name: column.type for column in local.columns}
    known = {*types, local.target.column, *local.sensitive}
    problems = []
    for column in schema.columns:
        if column.name not in types:
            problems.append(f"silo '{name}' has no column '{column.name}' ({column.type})")
        elif types[column.name] != column.type:
            problems.append(
                f"silo '{name}': column '{column.name}' is {types[column.name]}, "
                f"the plan needs {column.type}"
            )
    if schema.target.column not in known:
        problems.append(f"silo '{name}' has no target column '{schema.target.column}'")
    for attribute in schema.sensitive:
        if attribute not in known:
            problems.append(f"silo '{name}' has no sensitive column '{attribute}'")
    return problems


def plan_spec_errors(spec: Any, *, silos: Iterable[Any] | None = None) -> dict[str, str]:
    """Field-level problems of a plan spec (empty when it is valid).

    The plan language's problems (fedcore.plan.plan_errors: dotted paths into the spec, the
    same rules every site agent applies), and, when ``silos`` is given, the participating silos'
    (too few for min_silos, a column a silo lacks) under "silos".
    """
    errors = plan_errors(spec)
    if silos is None or "spec" in errors:
        return errors
    silos = list(silos)
    problems = []
    min_silos = spec.get("min_silos", 1)
    if is_int(min_silos) and len(silos) < min_silos:
        problems.append(
            f"{len(silos)} silo(s) take part; the plan needs at least {min_silos} (min_silos)"
        )
    try:
        schema = parse_schema(spec.get("schema"))
    except PlanError:
        schema = None  # already among the errors
    if schema is not None:
        for silo in silos:
            problems.extend(_silo_schema_problems(schema, silo))
    if problems:
        errors["silos"] = "; ".join(problems)
    return errors


def _not_run_here(spec: dict[str, Any], silos: list[Silo]) -> dict[str, str]:
    """What the plan language accepts but these silos cannot run: refused at proposal with the
    reason, never accepted and left to fail in a round (docs/tasks.md).

    Not a rule of the plan language (sites accept these plans; fedcore.plan): what the
    participating sites announced, checked only when a plan is proposed or edited. An
    installed model kind must be announced (name, version and digest) by at least one of them
    in its last hello; each site still checks it again before reading any data.
    """
    problems: dict[str, str] = {}
    model = spec.get("model", {})
    if isinstance(model, dict) and model.get("kind") == models.INSTALLED:
        if not model_kinds.announced(model, (silo.model_kinds or [] for silo in silos)):
            problems["model.kind"] = (
                f"no participating silo has announced the installed model kind "
                f"{model.get('name')!r} version {model.get('version')!r} with digest "
                f"{str(model.get('sha256'))[:12]}...: a site announces the kinds it installed "
                "and allows ([models] allowed in site.toml) when its agent connects "
                "(docs/tasks.md)"
            )
    return problems


def _spec_field(key: str) -> str:
    """Where a plan_spec_errors key points in a request: inside "spec", or the silos list."""
    return key if key in ("spec", "silos") else f"spec.{key}"


def _checked_silos(consortium_id: int, silos: Iterable[Silo], errors: dict[str, str]) -> list[Silo]:
    """The participating silos re-read from the database: admitted silos of the consortium."""
    try:
        ids = {silo.pk for silo in silos}
    except (TypeError, AttributeError):
        errors["silos"] = "must be a list of silos"
        return []
    found = list(
        Silo.objects.filter(pk__in=ids, consortium_id=consortium_id)
        .select_related("organization")
        .order_by("name")
    )
    # Silos of other consortia are named by id only: their names are not the actor's to see.
    foreign = sorted(ids - {silo.pk for silo in found}, key=str)
    problems = []
    if foreign:
        problems.append(
            f"silo id(s) {', '.join(map(str, foreign))} are not silos of this consortium"
        )
    not_admitted = [s.name for s in found if s.admission != Silo.Admission.ADMITTED]
    if not_admitted:
        problems.append(f"silo(s) {', '.join(not_admitted)} are not admitted")
    if not ids:
        problems.append("choose at least one silo")
    if problems:
        errors["silos"] = "; ".join(problems)
    return found


def _validated(
    consortium_id: int, spec: Any, silos: Iterable[Silo], errors: dict[str, str]
) -> tuple[list[Silo], str]:
    """Check the spec and the silos together; raise ValidationError with every problem."""
    chosen = _checked_silos(consortium_id, silos, errors)
    spec_errors = plan_spec_errors(spec, silos=chosen if "silos" not in errors else None)
    if not spec_errors:
        spec_errors = _not_run_here(spec, chosen)
    if not spec_errors and is_evaluation_plan(spec):  # the model version it names must fit
        spec_errors = source_errors(consortium_id, spec)
    # Valid in the plan language (every agent accepts it) but not applied by this server
    # version: refused here rather than run as if unmitigated.
    unavailable = unavailable_mitigation_error(spec)
    if unavailable and not {"fairness.mitigation", "fairness.mitigation.kind"} & spec_errors.keys():
        spec_errors["fairness.mitigation.kind"] = unavailable
    for key, message in spec_errors.items():
        field = _spec_field(key)
        errors[field] = f"{errors[field]}; {message}" if field in errors else message
    digest = ""
    if not errors:
        try:
            digest = compute_plan_hash(spec)
        except (TypeError, ValueError) as exc:
            errors["spec"] = f"not canonical JSON: {exc}"
    if errors:
        raise ValidationError(errors)
    return chosen, digest


def _with_identity(spec: Any, *, name: str, description: str | None, errors: dict[str, str]) -> Any:
    """The spec with the plan's name and description in it: what the version hashes.

    A ``name`` inside the spec must be the plan's (a plan's name does not change; a new name is
    a new plan); a ``description`` inside it is replaced by the one the request gives, when it
    gives one (``description`` None: the spec's own, if any).
    """
    if not isinstance(spec, dict) or not name:
        return spec  # plan_errors names the problem (or "name" is already refused)
    given = spec.get("name")
    if given is not None and given != name:
        errors["spec.name"] = (
            f"is {given!r}, but the plan is named {name!r}: leave it out of the spec or give "
            "the same name (a plan's name is part of its hash; another name is another plan)"
        )
    if description is None:
        own = spec.get("description")
        description = own if isinstance(own, str) else None
    return versioned_spec(spec, name=name, description=description)


def _lock_plan(plan: TrainingPlan) -> TrainingPlan:
    """The plan's row, locked for the rest of the transaction (status changes serialise on it)."""
    return (
        TrainingPlan.objects.select_for_update(of=("self",))
        .select_related("consortium", "current_version")
        .get(pk=plan.pk)
    )


def _audit_plan(actor: Any, plan: TrainingPlan, action: str, **data: Any) -> None:
    audit_append(
        actor=actor_label(actor),
        action=action,
        consortium_id=plan.consortium_id,
        object_type="plan",
        object_id=plan.pk,
        data={"plan": plan.name, **data},
    )


def _offer(version: PlanVersion | None) -> None:
    """After commit, push the version's offer (with the plan's status now) to every connected
    agent of the silos it names.

    A connected agent learns of a submitted plan, and of its later status (approved, rejected,
    withdrawn, superseded by a new version), at once instead of at its next reconnect
    (``selectors.pending_work`` re-offers the open ones then). The consumer builds and signs the
    offer when the event arrives (``AgentConsumer.plan_offer``); through the Redis channel layer
    in the production profile, so the process holding the connection need not be this one.
    """
    if version is None:
        return
    for silo_id in version.silos.values_list("pk", flat=True):
        dispatch.send_to_silo(silo_id, {"type": "plan.offer", "version_id": version.pk})


def _touch(plan: TrainingPlan, *fields: str) -> None:
    plan.updated_at = timezone.now()
    plan.save(update_fields=[*fields, "updated_at"])


def _require_author(actor: Any, plan: TrainingPlan, action: str) -> None:
    """The plan's proposer, or another data scientist of its consortium (else 403/404)."""
    roles = permissions.roles_in(actor, plan.consortium_id)
    if not roles:
        raise Http404("no such plan")
    if plan.proposed_by_id != actor.pk and Role.DATA_SCIENTIST not in roles:
        raise PermissionDenied(
            f"{action} needs the plan's proposer or a data scientist of the consortium"
        )


@transaction.atomic
def plan_propose(
    *,
    actor: Any,
    consortium: Consortium,
    name: str,
    description: str,
    spec: dict[str, Any],
    silos: list[Silo],
    submit: bool = True,
) -> TrainingPlan:
    """Propose a plan (version 1), submitted for approval unless ``submit`` is False."""
    permissions.require_roles(
        actor, consortium.pk, permissions.CAN_PROPOSE_PLANS, "proposing a plan"
    )
    errors: dict[str, str] = {}
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        errors["name"] = "required"
    elif len(name) > 200:
        errors["name"] = "at most 200 characters"
    if not isinstance(description, str):
        errors["description"] = "must be text"
        description = ""
    # The name and description are part of the version, so of its hash (docs/plan-spec.md).
    spec = _with_identity(spec, name=name, description=description or None, errors=errors)
    if isinstance(spec, dict):
        description = spec.get("description") or ""
    chosen, digest = _validated(consortium.pk, spec, silos, errors)
    now = timezone.now()
    plan = TrainingPlan.objects.create(
        consortium=consortium,
        name=name,
        description=description,
        proposed_by=actor,
        status=Status.SUBMITTED if submit else Status.DRAFT,
        created_at=now,
        updated_at=now,
    )
    version = PlanVersion.objects.create(
        plan=plan, number=1, spec=spec, spec_hash=digest, created_by=actor, created_at=now
    )
    version.silos.set(chosen)
    plan.current_version = version
    plan.save(update_fields=["current_version"])
    _audit_plan(
        actor,
        plan,
        "plan.proposed",
        version=1,
        plan_hash=digest,
        silos=[s.name for s in chosen],
    )
    if submit:
        _audit_plan(actor, plan, "plan.submitted", version=1, plan_hash=digest)
        _offer(version)
    return plan


@transaction.atomic
def plan_edit(
    *,
    actor: Any,
    plan: TrainingPlan,
    spec: dict[str, Any],
    silos: list[Silo],
    description: str | None = None,
) -> PlanVersion:
    """Make version n+1 the plan's current version.

    The approvals of version n stay with it, so none counts for the new hash; a submitted,
    approved or rejected (or finished) plan goes back to "submitted", a draft stays a draft.
    """
    _require_author(actor, plan, "editing a plan")
    plan = _lock_plan(plan)
    if plan.status in NOT_EDITABLE:
        raise Conflict(
            f"plan '{plan.name}' is {plan.status}; "
            + (
                "stop its run before editing it"
                if plan.status == Status.RUNNING
                else "a withdrawn plan is closed: propose a new one"
            )
        )
    errors: dict[str, str] = {}
    if description is not None and not isinstance(description, str):
        errors["description"] = "must be text"
        description = None
    if description is None and not (isinstance(spec, dict) and "description" in spec):
        description = plan.description  # unchanged unless the request or the spec changes it
    spec = _with_identity(spec, name=plan.name, description=description, errors=errors)
    if isinstance(spec, dict):
        description = spec.get("description") or ""
    chosen, digest = _validated(plan.consortium_id, spec, silos, errors)
    previous = plan.current_version
    if (
        previous is not None
        and previous.spec_hash == digest
        and set(previous.silos.values_list("pk", flat=True)) == {s.pk for s in chosen}
    ):
        raise ValidationError(
            {"spec": f"nothing to change: the spec and silos equal version {previous.number}"}
        )
    number = (previous.number if previous else 0) + 1
    version = PlanVersion.objects.create(
        plan=plan, number=number, spec=spec, spec_hash=digest, created_by=actor
    )
    version.silos.set(chosen)
    old_status = plan.status
    plan.current_version = version
    fields = ["current_version"]
    if plan.status in EDIT_RESUBMITS:
        plan.status = Status.SUBMITTED
        plan.rejection_reason = ""
        fields += ["status", "rejection_reason"]
    if description != plan.description:
        plan.description = description  # the current version's, which its hash covers
        fields.append("description")
    _touch(plan, *fields)
    voided = previous.approvals.count() if previous else 0
    changed = [c["path"] for c in governance.plan_diff(previous, version)] if previous else []
    _audit_plan(
        actor,
        plan,
        "plan.edited",
        version=number,
        plan_hash=digest,
        previous_hash=previous.spec_hash if previous else None,
        changed=changed,
        decisions_voided=voided,
        status=plan.status,
        previous_status=old_status,
    )
    if old_status != Status.DRAFT:
        # The sites of the old version learn it is superseded; those of the new one, the offer.
        _offer(previous)
        if plan.status == Status.SUBMITTED:
            _offer(version)
    return version


@transaction.atomic
def plan_submit(*, actor: Any, plan: TrainingPlan) -> TrainingPlan:
    """Submit a draft for approval."""
    _require_author(actor, plan, "submitting a plan")
    plan = _lock_plan(plan)
    if plan.status != Status.DRAFT:
        raise Conflict(f"plan '{plan.name}' is {plan.status}; only a draft can be submitted")
    plan.status = Status.SUBMITTED
    _touch(plan, "status")
    version = plan.current_version
    _audit_plan(
        actor,
        plan,
        "plan.submitted",
        version=version.number if version else None,
        plan_hash=version.spec_hash if version else None,
    )
    _offer(version)
    return plan


@transaction.atomic
def plan_withdraw(*, actor: Any, plan: TrainingPlan) -> TrainingPlan:
    """Withdraw a plan that has not run (its proposer only)."""
    permissions.require_roles(actor, plan.consortium_id, permissions.READ_ROLES, "withdrawing")
    plan = _lock_plan(plan)
    if plan.proposed_by_id != actor.pk:
        raise PermissionDenied("only the plan's proposer can withdraw it")
    if plan.status not in WITHDRAWABLE:
        raise Conflict(
            f"plan '{plan.name}' is {plan.status}; only a draft, submitted, approved or rejected "
            "plan can be withdrawn"
        )
    previous_status = plan.status
    plan.status = Status.WITHDRAWN
    _touch(plan, "status")
    _audit_plan(actor, plan, "plan.withdrawn", previous_status=previous_status)
    if previous_status != Status.DRAFT:
        _offer(plan.current_version)
    return plan


def _already_approved(
    plan: TrainingPlan, version: PlanVersion, organization: Organization, verb: str
) -> str:
    """Why a decision on an approved version is refused: the rule is met, and by whom."""
    state = governance.approval_state(version)
    parts = "; ".join(
        f"{'stewards of every participating silo' if part.name == 'stewards' else 'organisations'}"
        f": {part.progress}"
        for part in state.parts
    )
    mine = [
        a.user.get_username()
        for a in version.approvals.filter(
            organization=organization, decision=Approval.Decision.APPROVE
        ).select_related("user")
    ]
    if organization.name in state.organizations_approved:
        yours = (
            f"{organization.name} already counts for the organisations' part through the "
            f"approval of {', '.join(mine)} (a data steward's approval counts for their "
            "organisation too, and an organisation counts once)"
        )
    else:
        yours = f"{organization.name}'s approval is not needed: the quorum is met without it"
    if verb == "approving":
        what = "there is nothing left to approve"
    else:
        what = (
            "an approved version can no longer be rejected; ask the proposer to withdraw the "
            "plan, or to edit it (a new version needs every approval again)"
        )
    return (
        f"plan '{plan.name}' version {version.number} is already approved: its rule is met "
        f"({parts}), so {what}. {yours}"
    )


def _decision_context(
    *, actor: Any, plan: TrainingPlan, plan_hash: Any, organization: Organization | None, verb: str
) -> tuple[TrainingPlan, PlanVersion, Organization, str]:
    """Shared checks of approve and reject: who acts for which organisation, on which version."""
    permissions.require_roles(
        actor, plan.consortium_id, permissions.CAN_DECIDE_PLANS, f"{verb} a plan"
    )
    plan = _lock_plan(plan)
    version = plan.current_version
    if plan.proposed_by_id == actor.pk:
        raise PermissionDenied(
            f"you proposed plan '{plan.name}'; nobody approves or rejects their own plan "
            "(someone else must decide; withdraw it if you no longer want it)"
        )
    if version is not None and version.created_by_id == actor.pk:
        raise PermissionDenied(
            f"you wrote version {version.number} of plan '{plan.name}'; someone else must decide"
        )
    orgs = list(
        permissions.organizations_with_role(
            actor, plan.consortium_id, permissions.CAN_DECIDE_PLANS
        ).order_by("name")
    )
    if organization is None:
        if len(orgs) != 1:
            names = ", ".join(o.name for o in orgs)
            raise ValidationError(
                {"organization": f"you act for several organisations ({names}); name one"}
            )
        organization = orgs[0]
    elif organization.pk not in {o.pk for o in orgs}:
        names = ", ".join(o.name for o in orgs)
        raise ValidationError(
            {
                "organization": "you are not a data steward or organisation admin of that "
                f"organisation; you act for: {names}"
            }
        )
    if not isinstance(plan_hash, str) or not plan_hash:
        raise ValidationError({"plan_hash": "required: the hash of the version you reviewed"})
    if plan.status == Status.APPROVED and version is not None:
        raise Conflict(_already_approved(plan, version, organization, verb))
    if plan.status != Status.SUBMITTED or version is None:
        raise Conflict(
            f"plan '{plan.name}' is {plan.status}; only a submitted plan can be decided on"
        )
    if plan_hash != version.spec_hash:
        raise Conflict(
            f"stale plan hash: you named {plan_hash}, but the current version "
            f"{version.number} of plan '{plan.name}' has hash {version.spec_hash}; "
            "review the current version and decide on its hash"
        )
    # A steward's decision counts for the unanimity rule; record the strongest role held there.
    stewarded = permissions.organizations_with_role(
        actor, plan.consortium_id, {Role.DATA_STEWARD}
    ).filter(pk=organization.pk)
    role = Role.DATA_STEWARD if stewarded.exists() else Role.ORG_ADMIN
    if Approval.objects.filter(version=version, user=actor, organization=organization).exists():
        raise Conflict(
            f"you already decided on version {version.number} of plan '{plan.name}' "
            f"for {organization.name}"
        )
    return plan, version, organization, role


@transaction.atomic
def plan_approve(
    *,
    actor: Any,
    plan: TrainingPlan,
    plan_hash: str,
    organization: Organization | None = None,
    signature: Any = None,
) -> Approval:
    """Approve the plan's current version (named by its hash) for one organisation.

    ``signature`` is the steward's own signature over the approval
    (:func:`fedcore.approvals.sign_approval`): checked here against the consortium, the
    organisation and the hash, stored with the approval and carried in every grant, where the
    sites that pin the steward's key check it again. When the consortium's rules are then
    satisfied, the plan becomes "approved".
    """
    plan, version, organization, role = _decision_context(
        actor=actor, plan=plan, plan_hash=plan_hash, organization=organization, verb="approving"
    )
    if signature is not None:
        try:
            approvals.check_signature(
                signature,
                consortium=plan.consortium.name,
                organization=organization.name,
                plan_hash=version.spec_hash,
            )
        except approvals.ApprovalSignatureError as exc:
            raise ValidationError({"signature": str(exc)}) from None
    earlier = Approval.objects.filter(
        version=version,
        organization=organization,
        role=role,
        decision=Approval.Decision.APPROVE,
    ).first()
    if earlier is not None:
        raise Conflict(
            f"{organization.name} already approved version {version.number} of plan "
            f"'{plan.name}' as {role}"
        )
    problems = governance.privacy_budget_problems(version)
    if problems:
        raise Conflict("; ".join(problems))
    approval = Approval.objects.create(
        version=version,
        plan_hash=version.spec_hash,
        user=actor,
        organization=organization,
        role=role,
        decision=Approval.Decision.APPROVE,
        signature=signature,
    )
    _audit_plan(
        actor,
        plan,
        "plan.approved",
        version=version.number,
        plan_hash=version.spec_hash,
        organization=organization.name,
        organization_id=organization.pk,
        role=role,
        signed_by=signature["key"] if signature is not None else None,
    )
    state = governance.approval_state(version)
    if state.satisfied:
        plan.status = Status.APPROVED
        _touch(plan, "status")
        _audit_plan(
            actor,
            plan,
            "plan.fully_approved",
            version=version.number,
            plan_hash=version.spec_hash,
            organizations=state.organizations_approved,
            organizations_needed=state.organizations_needed,
        )
        _offer(version)
    return approval


@transaction.atomic
def plan_reject(
    *,
    actor: Any,
    plan: TrainingPlan,
    plan_hash: str,
    reason: str,
    organization: Organization | None = None,
) -> Approval:
    """Reject the plan's current version for one organisation, with a reason; the plan is
    "rejected" until an edit resubmits it."""
    reason = reason.strip() if isinstance(reason, str) else ""
    if not reason:
        # Checked after access, so that a stranger still gets 404 first.
        permissions.require_roles(
            actor, plan.consortium_id, permissions.CAN_DECIDE_PLANS, "rejecting a plan"
        )
        raise ValidationError({"reason": "a rejection needs a reason"})
    plan, version, organization, role = _decision_context(
        actor=actor, plan=plan, plan_hash=plan_hash, organization=organization, verb="rejecting"
    )
    rejection = Approval.objects.create(
        version=version,
        plan_hash=version.spec_hash,
        user=actor,
        organization=organization,
        role=role,
        decision=Approval.Decision.REJECT,
        reason=reason,
    )
    plan.status = Status.REJECTED
    plan.rejection_reason = reason
    _touch(plan, "status", "rejection_reason")
    _audit_plan(
        actor,
        plan,
        "plan.rejected",
        version=version.number,
        plan_hash=version.spec_hash,
        organization=organization.name,
        organization_id=organization.pk,
        role=role,
        reason=reason,
    )
    _offer(version)
    return rejection
