"""Plans: list, detail with version diffs, and the governance forms (propose, edit, decide)."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_POST

from dashboard import forms
from dashboard.views.common import nav_for, page
from fedcore import approvals, webauthn
from federation import governance, permissions, selectors
from federation.models import Role, TrainingPlan
from federation.services import plans as plan_services
from federation.services import runs as run_services
from federation.services.errors import Conflict

STATUS_FILTERS = [(s.value, s.label) for s in TrainingPlan.Status]


@login_required
def plan_list(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """A consortium's plans, filterable by status."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    status = request.GET.get("status", "")
    if status not in TrainingPlan.Status.values:
        status = ""
    plans = selectors.consortium_plans(consortium, status=status)
    return page(
        request,
        "dashboard/plan_list.html",
        consortium=consortium,
        section="plans",
        plans=plans,
        status_filter=status,
        statuses=STATUS_FILTERS,
        awaiting={
            p.pk
            for p in selectors.plans_awaiting_decision(user=request.user, consortium=consortium)
        },
    )


def _version_number(value: str | None, default: int, numbers: list[int]) -> int:
    try:
        number = int(value) if value else default
    except ValueError:
        return default
    return number if number in numbers else default


def _diff_rows(changes: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Diff entries with their values as JSON text (a list of silos as names)."""
    rows = []
    for change in changes:
        if change["path"] == "silos":
            rows.append(
                {
                    "path": "silos",
                    "old": ", ".join(change["old"]) or "—",
                    "new": ", ".join(change["new"]) or "—",
                    "kind": "changed",
                }
            )
            continue
        kind = "changed"
        if change["old"] is None:
            kind = "added"
        elif change["new"] is None:
            kind = "removed"
        rows.append(
            {
                "path": change["path"],
                "old": "—" if change["old"] is None else json.dumps(change["old"]),
                "new": "—" if change["new"] is None else json.dumps(change["new"]),
                "kind": kind,
            }
        )
    return rows


def _decision_organizations(request: HttpRequest, plan: TrainingPlan) -> Any:
    return permissions.organizations_with_role(
        request.user, plan.consortium_id, permissions.CAN_DECIDE_PLANS
    ).order_by("name")


def _render_detail(
    request: HttpRequest,
    plan: TrainingPlan,
    *,
    status: int = 200,
    error: str = "",
    approve_form: forms.PlanApproveForm | None = None,
    reject_form: forms.PlanRejectForm | None = None,
) -> HttpResponse:
    nav = nav_for(request, plan.consortium)
    versions = list(selectors.plan_versions(plan))
    numbers = [v.number for v in versions]
    current = plan.current_version
    current_number = current.number if current else 0
    new = _version_number(request.GET.get("to"), current_number, numbers)
    old = _version_number(request.GET.get("from"), max(new - 1, 1), numbers)
    by_number = {v.number: v for v in versions}
    diff = None
    if old != new and old in by_number and new in by_number:
        diff = _diff_rows(governance.plan_diff(by_number[old], by_number[new]))
    user = request.user
    own = plan.proposed_by_id == user.pk or (
        current is not None and current.created_by_id == user.pk
    )
    may_decide = nav.can_decide and not own and plan.status == TrainingPlan.Status.SUBMITTED
    my_decisions = (
        [d for d in selectors.version_decisions(current) if d.user_id == user.pk]
        if current is not None and nav.can_decide
        else []
    )
    organizations = _decision_organizations(request, plan) if may_decide else None
    if may_decide and approve_form is None and reject_form is None:
        # Once the user decided for every organisation they act for, there is nothing to ask.
        decided = {d.organization_id for d in my_decisions}
        may_decide = any(org.pk not in decided for org in organizations)
    if may_decide and current is not None:
        initial = {"plan_hash": current.spec_hash}
        approve_form = approve_form or forms.PlanApproveForm(
            initial=initial, organizations=organizations
        )
        reject_form = reject_form or forms.PlanRejectForm(
            initial=initial, organizations=organizations
        )
    is_proposer = plan.proposed_by_id == user.pk
    projected = governance.projected_epsilon(current) if current else {}
    passkey_approval = None
    if may_decide and current is not None and organizations is not None and len(organizations) == 1:
        passkey_approval = _passkey_approval(request, plan, current.spec_hash, organizations[0])
    return page(
        request,
        "dashboard/plan_detail.html",
        passkey_approval=passkey_approval,
        nav=nav,
        section="plans",
        status=status,
        error=error,
        plan=plan,
        current=current,
        current_silos=selectors.version_silos(current) if current else [],
        spec_json=json.dumps(current.spec, indent=2) if current else "",
        versions=versions,
        state=governance.approval_state(current) if current else None,
        decisions=selectors.decision_grants(selectors.plan_decisions(plan)),
        projected=projected,
        projected_spends=any(projected.values()),
        diff=diff,
        diff_old=old,
        diff_new=new,
        may_decide=may_decide,
        my_decisions=my_decisions,
        approve_form=approve_form,
        reject_form=reject_form,
        may_edit=(
            (nav.can_propose or is_proposer) and plan.status not in plan_services.NOT_EDITABLE
        ),
        may_submit=is_proposer and plan.status == TrainingPlan.Status.DRAFT,
        may_withdraw=is_proposer and plan.status in plan_services.WITHDRAWABLE,
        may_start=(
            plan.status == TrainingPlan.Status.APPROVED
            and (is_proposer or Role.CONSORTIUM_ADMIN in nav.roles)
            and nav.can_start_runs
        ),
        runs=selectors.plan_runs(plan),
    )


@login_required
def plan_detail(request: HttpRequest, plan_id: int) -> HttpResponse:
    """A plan: current version, approval state, decisions, diffs between versions, actions."""
    plan = permissions.access_plan(user=request.user, id=plan_id)
    return _render_detail(request, plan)


def _rp_id(request: HttpRequest) -> str:
    """The WebAuthn relying party ID: the dashboard's host name, without the port."""
    return request.get_host().rsplit(":", 1)[0]


def _passkey_approval(
    request: HttpRequest, plan: TrainingPlan, plan_hash: str, organization: Any
) -> dict[str, str] | None:
    """What the approve form's passkey button signs: the challenge of the approval message
    (fedcore.approvals.approval_challenge) for now, the RP ID and the user's credential ids."""
    keys = list(selectors.passkey_list(user=request.user))
    if not keys:
        return None
    signed_at = timezone.now().isoformat()
    challenge = approvals.approval_challenge(
        consortium=plan.consortium.name,
        organization=organization.name,
        plan_hash=plan_hash,
        signed_at=signed_at,
    )
    return {
        "challenge": webauthn.b64url_encode(challenge),
        "signed_at": signed_at,
        "rp_id": _rp_id(request),
        "credentials": " ".join(key.credential_id for key in keys),
    }


def _passkey_signature(request: HttpRequest) -> dict[str, str] | None:
    """The passkey assertion the form carries, as a signature object for plan_approve (None:
    approved without signing). The service verifies it; an unknown credential is refused here."""
    credential_id = str(request.POST.get("passkey_credential_id", ""))
    if not credential_id:
        return None
    passkey = selectors.passkey_list(user=request.user).filter(credential_id=credential_id).first()
    if passkey is None:
        raise ValidationError({"signature": "the passkey that signed is not one of yours"})
    return {
        "kind": approvals.WEBAUTHN_KIND,
        "key": passkey.public_key,
        "signed_at": str(request.POST.get("signed_at", "")),
        "credential_id": credential_id,
        "authenticator_data": str(request.POST.get("passkey_authenticator_data", "")),
        "client_data_json": str(request.POST.get("passkey_client_data_json", "")),
        "signature": str(request.POST.get("passkey_signature", "")),
        "rp_id": _rp_id(request),
    }


@login_required
@require_POST
def plan_approve(request: HttpRequest, plan_id: int) -> HttpResponse:
    """Approve the reviewed version (its hash is in the form) for one organisation."""
    plan = permissions.access_plan(user=request.user, id=plan_id)
    permissions.require_roles(
        request.user, plan.consortium_id, permissions.CAN_DECIDE_PLANS, "approving a plan"
    )
    form = forms.PlanApproveForm(request.POST, organizations=_decision_organizations(request, plan))
    if not form.is_valid():
        return _render_detail(request, plan, status=400, approve_form=form)
    try:
        plan_services.plan_approve(
            actor=request.user,
            plan=plan,
            plan_hash=form.cleaned_data["plan_hash"],
            organization=form.cleaned_data["organization"],
            signature=_passkey_signature(request),
        )
    except Conflict as exc:
        return _render_detail(request, plan, status=409, error=exc.message)
    except ValidationError as exc:
        form.apply_service_errors(exc)
        return _render_detail(request, plan, status=400, approve_form=form)
    plan.refresh_from_db()
    note = " It is now approved and can run." if plan.status == TrainingPlan.Status.APPROVED else ""
    messages.success(request, f"You approved version {plan.current_version.number}.{note}")
    return redirect("dashboard:plan_detail", plan_id=plan.pk)


@login_required
@require_POST
def plan_reject(request: HttpRequest, plan_id: int) -> HttpResponse:
    """Reject the reviewed version, with a reason."""
    plan = permissions.access_plan(user=request.user, id=plan_id)
    permissions.require_roles(
        request.user, plan.consortium_id, permissions.CAN_DECIDE_PLANS, "rejecting a plan"
    )
    form = forms.PlanRejectForm(request.POST, organizations=_decision_organizations(request, plan))
    if not form.is_valid():
        return _render_detail(request, plan, status=400, reject_form=form)
    try:
        plan_services.plan_reject(
            actor=request.user,
            plan=plan,
            plan_hash=form.cleaned_data["plan_hash"],
            reason=form.cleaned_data["reason"],
            organization=form.cleaned_data["organization"],
        )
    except Conflict as exc:
        return _render_detail(request, plan, status=409, error=exc.message)
    except ValidationError as exc:
        form.apply_service_errors(exc)
        return _render_detail(request, plan, status=400, reject_form=form)
    messages.success(request, f"You rejected version {plan.current_version.number}.")
    return redirect("dashboard:plan_detail", plan_id=plan.pk)


@login_required
def plan_propose(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """A data scientist proposes a plan; the service's field errors show on the form."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    permissions.require_roles(
        request.user, consortium.pk, permissions.CAN_PROPOSE_PLANS, "proposing a plan"
    )
    silos = selectors.consortium_silos(consortium, admitted_only=True)
    first = silos.first()
    initial: dict[str, Any] = {"spec": forms.starter_spec(first.schema if first else None)}
    evaluate = request.GET.get("evaluate", "")
    if evaluate.isdigit():  # "Evaluate on the sites" of a model card: an evaluation plan
        version = permissions.access_model_version(user=request.user, id=int(evaluate))
        if version.run.plan.consortium_id == consortium.pk:
            initial = {
                "spec": selectors.evaluation_plan_template(version),
                "name": f"Evaluate run {version.run_id} v{version.number}",
            }
    uploaded_id = request.GET.get("evaluate_uploaded", "")
    if uploaded_id.isdigit():  # "Evaluate on the sites" of an uploaded model
        uploaded = permissions.access_uploaded_model(user=request.user, id=int(uploaded_id))
        if uploaded.consortium_id == consortium.pk:
            initial = {
                "spec": selectors.uploaded_evaluation_template(uploaded),
                "name": f"Evaluate {uploaded.name}",
            }
    form = forms.PlanProposeForm(request.POST or None, initial=initial, silos=silos)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            plan = plan_services.plan_propose(
                actor=request.user,
                consortium=consortium,
                name=data["name"],
                description=data["description"],
                spec=data["spec"],
                silos=list(data["silos"]),
                submit=data["submit"],
            )
        except ValidationError as exc:
            form.apply_service_errors(exc)
        else:
            verb = "submitted for approval" if data["submit"] else "saved as a draft"
            messages.success(request, f"Plan '{plan.name}' {verb}.")
            return redirect("dashboard:plan_detail", plan_id=plan.pk)
    return page(
        request,
        "dashboard/plan_form.html",
        consortium=consortium,
        section="plans",
        status=400 if form.errors else 200,
        form=form,
        plan=None,
    )


@login_required
def plan_edit(request: HttpRequest, plan_id: int) -> HttpResponse:
    """Make a new version of a plan (its approvals start afresh)."""
    plan = permissions.access_plan(user=request.user, id=plan_id)
    if plan.proposed_by_id != request.user.pk:
        permissions.require_roles(
            request.user, plan.consortium_id, permissions.CAN_PROPOSE_PLANS, "editing a plan"
        )
    silos = selectors.consortium_silos(plan.consortium, admitted_only=True)
    current = plan.current_version
    initial = {}
    if current is not None:
        initial = {
            "description": plan.description,
            # The name and description have their own fields (the version's hash covers them).
            "spec": {k: v for k, v in current.spec.items() if k not in ("name", "description")},
            "silos": list(selectors.version_silos(current)),
        }
    form = forms.PlanEditForm(request.POST or None, initial=initial, silos=silos)
    error, status = "", 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            version = plan_services.plan_edit(
                actor=request.user,
                plan=plan,
                spec=data["spec"],
                silos=list(data["silos"]),
                description=data["description"],
            )
        except Conflict as exc:
            error, status = exc.message, 409
        except ValidationError as exc:
            form.apply_service_errors(exc)
        else:
            messages.success(
                request,
                f"Version {version.number} saved; earlier approvals do not carry over to it.",
            )
            return redirect("dashboard:plan_detail", plan_id=plan.pk)
    return page(
        request,
        "dashboard/plan_form.html",
        consortium=plan.consortium,
        section="plans",
        status=400 if form.errors else status,
        form=form,
        plan=plan,
        error=error,
    )


def _plan_action(request: HttpRequest, plan_id: int, action: Any, done: str) -> HttpResponse:
    plan = permissions.access_plan(user=request.user, id=plan_id)
    try:
        action(actor=request.user, plan=plan)
    except Conflict as exc:
        return _render_detail(request, plan, status=409, error=exc.message)
    messages.success(request, done)
    return redirect("dashboard:plan_detail", plan_id=plan.pk)


@login_required
@require_POST
def plan_submit(request: HttpRequest, plan_id: int) -> HttpResponse:
    """Submit a draft for approval."""
    return _plan_action(request, plan_id, plan_services.plan_submit, "Submitted for approval.")


@login_required
@require_POST
def plan_withdraw(request: HttpRequest, plan_id: int) -> HttpResponse:
    """Withdraw a plan that has not run."""
    return _plan_action(request, plan_id, plan_services.plan_withdraw, "Plan withdrawn.")


@login_required
@require_POST
def plan_start(request: HttpRequest, plan_id: int) -> HttpResponse:
    """Start a run of an approved plan and go to its monitor."""
    plan = permissions.access_plan(user=request.user, id=plan_id)
    try:
        run = run_services.run_start(actor=request.user, plan=plan)
    except Conflict as exc:
        return _render_detail(request, plan, status=409, error=exc.message)
    messages.success(request, f"Run {run.pk} started: it waits for the silos' agents.")
    return redirect("dashboard:run_monitor", run_id=run.pk)
