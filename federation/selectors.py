"""Reads of the federation domain."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Count, F, OuterRef, Prefetch, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import Http404
from django.utils import timezone

from fedcore import signing
from fedcore.plan import is_evaluation_plan, parse_evaluation_plan, run_settings
from fedcore.protocol import BinaryMessage
from federation import permissions
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
    Round,
    RoundMetric,
    Run,
    Silo,
    SiloRefusal,
    StewardPasskey,
    TrainingPlan,
    Update,
    UploadedModel,
)
from federation.signing import authorization_for, offer_authorization, run_approvals
from federation.storage import blob_store

log = logging.getLogger("quorum.orchestrator")

# A stats_request of a run that has no statistics deadline yet is signed valid this long.
STATS_GRANT_TTL = timedelta(hours=1)


def task_message(*, round_id: int, silo_id: int) -> BinaryMessage | None:
    """The task a selected silo must train on, or None when it owes nothing for this round."""
    round_ = (
        Round.objects.select_related("run__plan__consortium", "run__version")
        .filter(pk=round_id)
        .first()
    )
    if (
        round_ is None
        or round_.status != Round.Status.COLLECTING
        or not round_.selected.filter(pk=silo_id).exists()
        or round_.updates.filter(silo_id=silo_id).exists()
    ):
        return None
    model = ModelVersion.objects.get(run=round_.run, number=round_.number - 1)
    fields = round_task_fields(round_, model, [Silo.objects.get(pk=silo_id)])[silo_id]
    return BinaryMessage(
        type="task", fields=fields, payload=_model_bytes(model.blob_key, model.checksum)
    )


def round_task_fields(
    round_: Round, model: ModelVersion, silos: list[Silo]
) -> dict[int, dict[str, Any]]:
    """The task fields (everything but the global model's bytes) of each silo, by silo id.

    One reading of the run's approvals and one grant scope for all of them: the round opening
    signs every selected silo's task at once (``federation.services.rounds``), and a silo asked
    again later gets the same fields through :func:`task_message`.
    """
    run = round_.run
    weights = run.mitigation.get("example_weights") if isinstance(run.mitigation, dict) else None
    scope = signing.request_scope(
        kind=signing.TASK_KIND,
        rounds=run.rounds,
        round=round_.number,
        attempt=round_.attempt,
        # The checksum taken when the model was stored: a blob changed since is refused too.
        weights_sha256=model.checksum,
        preprocessing=run.preprocessing,
        expires_at=round_.deadline + timedelta(seconds=signing.TASK_EXPIRY_MARGIN_SECONDS),
        example_weights=weights,
    )
    common: dict[str, Any] = {
        "run": run.pk,
        "round": round_.number,
        "rounds": run.rounds,
        "plan_hash": run.plan_hash,
        "plan": run.version.spec,
        "preprocessing": run.preprocessing,
        "deadline": round_.deadline.timestamp(),
    }
    if weights is not None:  # a weighted bias mitigation (federation.services.mitigation)
        common["example_weights"] = weights
    approvals = run_approvals(run)
    return {
        silo.pk: {
            **common,
            "authorization": authorization_for(
                run=run, silo=silo, scope=scope, approvals=approvals
            ),
        }
        for silo in silos
    }


def prebuilt_task(event: dict[str, Any]) -> BinaryMessage:
    """The task message of a ``round.task`` event that carries its fields (a plain round's
    opening signs them all at once): the global model's bytes come from this process's cache."""
    model = event["model"]
    return BinaryMessage(
        type="task",
        fields=dict(event["task"]),
        payload=_model_bytes(model["blob_key"], model["checksum"]),
    )


def evaluate_message(*, run_id: int, silo_id: int) -> BinaryMessage | None:
    """The final model an asked silo must evaluate, or None when it owes no evaluation."""
    run = (
        Run.objects.select_related("plan__consortium", "version")
        .filter(pk=run_id, status=Run.Status.EVALUATING)
        .first()
    )
    if run is None or run.evaluation_deadline is None:
        return None
    asked = run.silo_evaluations.filter(silo_id=silo_id, report__isnull=True).first()
    if asked is None:
        return None
    model = ModelVersion.objects.get(run=run, number=asked.model_version)
    scope = signing.request_scope(
        kind=signing.EVALUATE_KIND,
        rounds=run.rounds,
        model_version=model.number,
        weights_sha256=model.checksum,
        preprocessing=run.preprocessing,
        expires_at=run.evaluation_deadline + timedelta(seconds=signing.TASK_EXPIRY_MARGIN_SECONDS),
    )
    silo = Silo.objects.get(pk=silo_id)
    return BinaryMessage(
        type="evaluate",
        fields={
            "run": run.pk,
            "rounds": run.rounds,
            "model_version": model.number,
            "plan_hash": run.plan_hash,
            "plan": run.version.spec,
            "preprocessing": run.preprocessing,
            "deadline": run.evaluation_deadline.timestamp(),
            "authorization": authorization_for(run=run, silo=silo, scope=scope),
        },
        payload=_model_bytes(model.blob_key, model.checksum),
    )


# The global model every selected silo of a round is sent: read once per process, not once per
# silo (200 silos x 4 MB). Keyed by checksum too, so a rewritten blob is never served stale.
_MODEL_CACHE: dict[tuple[str, str], bytes] = {}
_MODEL_CACHE_SIZE = 2
_MODEL_CACHE_LOCK = threading.Lock()


def _model_bytes(blob_key: str, checksum: str) -> bytes:
    key = (blob_key, checksum)
    with _MODEL_CACHE_LOCK:
        data = _MODEL_CACHE.get(key)
    if data is None:
        data = blob_store().get(blob_key)
        with _MODEL_CACHE_LOCK:
            while len(_MODEL_CACHE) >= _MODEL_CACHE_SIZE:
                _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
            _MODEL_CACHE[key] = data
    return data


def evaluation_plan_of(run: Run) -> dict[str, Any] | None:
    """What an evaluation plan's run evaluates (``source``, :func:`evaluated_source`) and on
    which rows (``rows_note``); None for a run of another plan kind."""
    if not is_evaluation_plan(run.version.spec):
        return None
    plan = parse_evaluation_plan(run.version.spec)
    return {
        "source": evaluated_source(run.plan.consortium_id, plan.model_version),
        "rows_note": plan.rows_note,
    }


def evaluated_source(consortium_id: int, ref: Any) -> dict[str, Any]:
    """What an evaluation plan evaluates, as results show it: a run's version (``run``,
    ``model_version``) or an uploaded model (``uploaded``, ``name``, ``uploaded_by``; run and
    model_version None), with the SHA-256 the plan names."""
    source: dict[str, Any] = {"run": ref.run, "model_version": ref.number, "sha256": ref.sha256}
    if ref.uploaded is None:
        return source
    uploaded = (
        UploadedModel.objects.select_related("uploaded_by")
        .filter(pk=ref.uploaded, consortium_id=consortium_id)
        .first()
    )
    user = uploaded.uploaded_by if uploaded is not None else None
    return {
        **source,
        "uploaded": ref.uploaded,
        "name": uploaded.name if uploaded is not None else None,
        "uploaded_by": user.get_username() if user is not None else None,
    }


def uploaded_evaluation_template(uploaded: UploadedModel) -> dict[str, Any]:
    """An evaluation plan spec of an uploaded model to start from: its schema and model spec,
    every row of every site (its training rows are unknown), and its SHA-256."""
    return {
        "kind": "evaluation",
        "schema": uploaded.schema,
        "model": uploaded.model,
        "model_version": {"uploaded": uploaded.pk, "sha256": uploaded.checksum},
        "rows": "all",
        "min_silos": 1,
    }


def evaluation_plan_template(version: ModelVersion) -> dict[str, Any]:
    """An evaluation plan spec of a model version to start from: its run's schema, model spec
    and held-out split (the rows it never trained on), and its SHA-256."""
    source = version.run.version.spec
    spec: dict[str, Any] = {
        "kind": "evaluation",
        "schema": source.get("schema"),
        "model": source.get("model"),
        "model_version": {
            "run": version.run_id,
            "number": version.number,
            "sha256": version.checksum,
        },
        "rows": "held_out",
        "evaluation": source.get("evaluation") or {},
        "min_silos": source.get("min_silos", 1),
    }
    if isinstance(source.get("fairness"), dict):
        fairness = {k: v for k, v in source["fairness"].items() if k != "mitigation"}
        spec["fairness"] = fairness
    return spec


def stats_request_fields(*, run_id: int, silo_id: int) -> dict[str, Any] | None:
    """Fields of a stats_request for a silo that still owes its statistics, else None."""
    run = (
        Run.objects.select_related("plan__consortium", "version")
        .filter(pk=run_id, status=Run.Status.STATS)
        .first()
    )
    if run is None or run.silo_statistics.filter(silo_id=silo_id).exists():
        return None
    silo = run.version.silos.filter(pk=silo_id).first()
    if silo is None:
        return None
    return {
        "run": run.pk,
        "plan_hash": run.plan_hash,
        "plan": run.version.spec,
        "authorization": authorization_for(run=run, silo=silo, scope=stats_scope(run)),
    }


def analysis_request_fields(*, run_id: int, silo_id: int) -> dict[str, Any] | None:
    """Fields of an analysis_request for a silo that still owes the current step, else None."""
    run = (
        Run.objects.select_related("plan__consortium", "version")
        .filter(pk=run_id, status=Run.Status.RUNNING)
        .first()
    )
    state = (run.analysis or {}) if run is not None else {}
    if run is None or "step" not in state or "result" in state:
        return None
    step = state["steps"][state["step"]]
    if not run.silo_analyses.filter(silo_id=silo_id, step=step, answer__isnull=True).exists():
        return None
    silo = run.version.silos.get(pk=silo_id)
    scope = signing.request_scope(
        kind=signing.ANALYSIS_KIND,
        rounds=run.rounds,
        expires_at=datetime.fromisoformat(state["deadline"])
        + timedelta(seconds=signing.TASK_EXPIRY_MARGIN_SECONDS),
        step=step,
        params=state["params"],
    )
    return {
        "run": run.pk,
        "plan_hash": run.plan_hash,
        "plan": run.version.spec,
        "step": step,
        "params": state["params"],
        "authorization": authorization_for(run=run, silo=silo, scope=scope),
    }


def stats_scope(run: Run) -> dict[str, Any]:
    """The signed scope of a stats_request: the run's rounds, valid until the statistics
    deadline plus the margin (an hour from now when the run has none yet)."""
    expires = (
        run.stats_deadline if run.stats_deadline is not None else timezone.now() + STATS_GRANT_TTL
    )
    return signing.request_scope(
        kind=signing.STATS_KIND,
        rounds=run.rounds,
        expires_at=expires + timedelta(seconds=signing.TASK_EXPIRY_MARGIN_SECONDS),
    )


def pending_work(*, silo_id: int) -> list[dict[str, Any]]:
    """Channel events a (re)connecting silo's agent still has to act on: offers, then work."""
    offered = TrainingPlan.objects.filter(
        status__in=(TrainingPlan.Status.SUBMITTED, TrainingPlan.Status.APPROVED),
        current_version__silos__pk=silo_id,
    ).values_list("current_version_id", flat=True)
    events: list[dict[str, Any]] = [
        {"type": "plan.offer", "version_id": version_id} for version_id in offered
    ]
    runs = Run.objects.filter(
        status__in=(Run.Status.STATS, Run.Status.RUNNING, Run.Status.EVALUATING),
        version__silos__pk=silo_id,
    ).order_by("pk")
    for run in runs:
        if run.status == Run.Status.STATS:
            events.append({"type": "run.stats_request", "run_id": run.pk})
            continue
        if run.analysis is not None:  # an analysis run: its current step, if still owed
            events.append({"type": "run.analysis_request", "run_id": run.pk})
            continue
        if run.status == Run.Status.EVALUATING:
            if run.silo_evaluations.filter(silo_id=silo_id, report__isnull=True).exists():
                events.append({"type": "run.evaluate", "run_id": run.pk})
            continue
        current = run.round_set.order_by("-number", "-attempt").first()
        if current is not None and current.status == Round.Status.COLLECTING:
            events.append({"type": "round.task", "round_id": current.pk})
    return events


def online_silos(run: Run, *, evaluation: bool = False) -> list[Silo]:
    """Participating, admitted silos whose agent is connected and heartbeating, has not refused
    the run, and whose privacy budget can afford one more round of the plan (the others stop
    participating) -- or, for the final ``evaluation``, its noisy fairness counts only.

    The one place a run's selection is decided (the round state machine selects these)."""
    from federation import ledger

    fresh = timezone.now() - timedelta(seconds=settings.QUORUM_SILO_OFFLINE_AFTER)
    connected = (
        run.version.silos.filter(
            admission=Silo.Admission.ADMITTED,
            connection_id__isnull=False,
            last_heartbeat__gte=fresh,
        )
        .exclude(pk__in=run_refused_silo_ids(run.pk))  # refused the run (services.refusals)
        .order_by("pk")
    )
    selectable = []
    affords = ledger.can_afford_evaluation if evaluation else ledger.can_afford_round
    for silo in connected:
        if affords(silo, run.version.spec):
            selectable.append(silo)
        else:
            log.warning("run %s: silo %s is out of privacy budget; not selected", run.pk, silo.name)
    return selectable


def run_waiting_note(run: Run, rounds: list[Round]) -> str | None:
    """What an active run is waiting for, in words (the run monitor's notice), or None.

    Counts the silos the state machine would select (``online_silos``), not merely connected
    ones, so the note and the decision never disagree. ``rounds``: the run's rounds in order.
    """
    from federation import roundplan

    if not run.active:
        return None
    current = rounds[-1] if rounds else None
    failed = current is not None and current.status == Round.Status.FAILED
    if run.waiting_since is None and not failed:
        return None
    cfg = run_settings(run.version.spec)
    secure = run.version.spec.get("secure_aggregation") is True
    needed = cfg.min_silos
    what = "federated statistics"
    evaluation_next = (
        current is not None and current.status == "completed" and current.number >= run.rounds
    )
    plan_evaluates = is_evaluation_plan(run.version.spec)  # no round: one evaluation
    if plan_evaluates:
        what = "the evaluation"
    elif run.status == Run.Status.RUNNING and evaluation_next:
        what = "the final evaluation"  # needs the plan's minimum, not secure aggregation's 2
    elif run.status == Run.Status.RUNNING:
        needed = roundplan.needed_to_open(cfg.min_silos, secure=secure)
        number = 1 if current is None else current.number + (current.status == "completed")
        what = f"round {number}"
        if failed:
            assert current is not None
            what = f"round {current.number} attempt {current.attempt + 1} (a retry)"
    selectable = len(online_silos(run, evaluation=evaluation_next or plan_evaluates))
    if selectable >= needed:
        return (
            f"{selectable} silos can take part ({needed} needed): {what} opens at the next sweep."
        )
    since = "" if run.waiting_since is None else f" since {run.waiting_since:%H:%M:%S %Z}"
    then = (
        "the final model is evaluated by those there (the run completes either way)"
        if evaluation_next and not plan_evaluates
        else "the run fails"
    )
    return (
        f"Waiting{since} for silos: {selectable} of the {needed} needed for {what} can take "
        "part (connected, heartbeating in the last "
        f"{settings.QUORUM_SILO_OFFLINE_AFTER:g} s, admitted, within their privacy budget); "
        f"{then} if they are not back within {cfg.wait_for_silos_seconds:.0f} s of waiting."
    )


def active_run_ids() -> list[int]:
    """Ids of the runs the sweep moves forward."""
    return list(Run.objects.filter(status__in=Run.ACTIVE).values_list("pk", flat=True))


# The status an offer of a version that is no longer its plan's current one carries.
OFFER_SUPERSEDED = "superseded"


def plan_offer_fields(*, version_id: int, silo_id: int) -> dict[str, Any] | None:
    """Fields of a plan_offer telling a silo's agent about a plan version that names it.

    ``status`` is the plan's status for its current version, ``superseded`` for an older one
    (an edit made a new version: what the site reviewed under this hash will not run)."""
    version = (
        PlanVersion.objects.select_related("plan__consortium")
        .filter(pk=version_id, silos__pk=silo_id)
        .first()
    )
    if version is None:
        return None
    silo = Silo.objects.get(pk=silo_id)
    plan = version.plan
    status = plan.status if plan.current_version_id == version.pk else OFFER_SUPERSEDED
    return {
        "plan_hash": version.spec_hash,
        "plan": version.spec,
        "name": plan.name,
        "version": version.number,
        "consortium": plan.consortium.name,
        "status": status,
        "authorization": offer_authorization(version=version, silo=silo, status=status),
    }


def api_token_list(*, user: Any) -> QuerySet[ApiToken]:
    """A user's API tokens, newest first (their SHA-256 rows: the tokens themselves are gone)."""
    return ApiToken.objects.filter(user=user).order_by("-created_at", "-pk")


def passkey_list(*, user: Any) -> QuerySet[StewardPasskey]:
    """A user's registered passkeys (public keys only), oldest first."""
    return StewardPasskey.objects.filter(user=user).order_by("created_at", "pk")


def silo_is_online(silo: Silo) -> bool:
    """Whether the silo's agent is connected (as the orchestrator sees it)."""
    return silo.connection_id is not None


def plan_rounds(run: Run) -> int:
    """How many rounds the run's plan asks for."""
    return run_settings(run.version.spec).rounds


# --------------------------------------------------------------------------------------------
# Reads behind the dashboard's pages. Each takes an object its caller already fetched through
# ``federation.permissions.access_*`` (so membership is settled), and returns what one page needs
# in a constant number of queries.


def consortium_organizations(consortium: Consortium) -> QuerySet[Organization]:
    """A consortium's member organisations by name, with their silo and member counts."""
    return (
        Organization.objects.filter(consortium=consortium)
        .annotate(
            silo_count=Count("silos", distinct=True),
            member_count=Count(
                "memberships__user",
                distinct=True,
                filter=Q(memberships__status=Membership.Status.ACTIVE),
            ),
        )
        .order_by("name", "pk")
    )


def consortium_memberships(consortium: Consortium) -> QuerySet[Membership]:
    """Who holds which role in a consortium, by organisation and username."""
    return (
        Membership.objects.filter(organization__consortium=consortium)
        .select_related("user", "organization__consortium", "granted_by")
        .order_by("organization__name", "user__username", "role", "pk")
    )


def consortium_invitations(*, user: Any, consortium: Consortium) -> QuerySet[Invitation]:
    """The consortium's e-mail invitations the user may see, newest first."""
    return (
        permissions.invitations_visible_to(user, consortium.pk)
        .select_related("organization", "invited_by")
        .order_by("-created_at", "-pk")
    )


def invitations_of(user: Any) -> QuerySet[Membership]:
    """The user's pending memberships (invitations to accept), oldest first."""
    if not getattr(user, "is_authenticated", False):
        return Membership.objects.none()
    return (
        Membership.objects.filter(user=user, status=Membership.Status.PENDING)
        .select_related("organization__consortium", "granted_by")
        .order_by("created_at", "pk")
    )


def decision_grants(decisions: Any) -> list[Any]:
    """The decisions, each with ``grant``: the membership behind its role (None if none now).

    What the plan page shows beside every approval: the approver's role grant, who granted it,
    when, and whether it is active, so a reader sees which role change enabled which approval.
    """
    decisions = list(decisions)
    grants = {
        (m.user_id, m.organization_id, m.role): m
        for m in Membership.objects.filter(
            user_id__in={d.user_id for d in decisions},
            organization_id__in={d.organization_id for d in decisions},
        ).select_related("granted_by")
    }
    for decision in decisions:
        decision.grant = grants.get((decision.user_id, decision.organization_id, decision.role))
    return decisions


def consortium_silos(consortium: Consortium, *, admitted_only: bool = False) -> QuerySet[Silo]:
    """A consortium's silos by name, with their organisation (only the admitted ones if asked)."""
    silos = Silo.objects.filter(consortium=consortium)
    if admitted_only:
        silos = silos.filter(admission=Silo.Admission.ADMITTED)
    return silos.select_related("organization").order_by("name", "pk")


def consortium_plans(consortium: Consortium, *, status: str = "") -> QuerySet[TrainingPlan]:
    """A consortium's plans (of one status if asked), most recently changed first."""
    plans = TrainingPlan.objects.filter(consortium=consortium)
    if status:
        plans = plans.filter(status=status)
    return (
        plans.select_related("current_version", "proposed_by")
        .annotate(run_count=Count("runs", distinct=True))
        .order_by("-updated_at", "-pk")
    )


def consortium_runs(consortium: Consortium, *, active: bool | None = None) -> QuerySet[Run]:
    """A consortium's runs, newest first; only the active (or finished) ones if asked."""
    runs = Run.objects.filter(plan__consortium=consortium)
    if active is True:
        runs = runs.filter(status__in=Run.ACTIVE)
    elif active is False:
        runs = runs.exclude(status__in=Run.ACTIVE)
    return (
        runs.select_related("plan", "version", "started_by")
        .annotate(
            rounds_completed=Count(
                "round_set",
                filter=Q(round_set__status=Round.Status.COMPLETED),
                distinct=True,
            )
        )
        .order_by("-created_at", "-pk")
    )


def plans_awaiting_decision(*, user: Any, consortium: Consortium) -> list[TrainingPlan]:
    """Submitted plans of the consortium the user may still approve or reject.

    The user acts as a data steward or organisation admin for at least one organisation that has
    no decision of theirs on the plan's current version, and neither proposed the plan nor wrote
    that version (nobody decides on their own plan).
    """
    org_ids = set(
        permissions.organizations_with_role(
            user, consortium.pk, permissions.CAN_DECIDE_PLANS
        ).values_list("pk", flat=True)
    )
    if not org_ids:
        return []
    plans = list(
        TrainingPlan.objects.filter(
            consortium=consortium,
            status=TrainingPlan.Status.SUBMITTED,
            current_version__isnull=False,
        )
        .exclude(proposed_by=user)
        .exclude(current_version__created_by=user)
        .select_related("current_version", "proposed_by")
        .order_by("updated_at", "pk")
    )
    decided = set(
        Approval.objects.filter(
            user=user, version_id__in=[p.current_version_id for p in plans]
        ).values_list("version_id", "organization_id")
    )
    return [
        plan
        for plan in plans
        if any((plan.current_version_id, org_id) not in decided for org_id in org_ids)
    ]


def plan_versions(plan: TrainingPlan) -> QuerySet[PlanVersion]:
    """A plan's versions, oldest first, with their silos and author."""
    return (
        PlanVersion.objects.filter(plan=plan)
        .select_related("created_by", "plan__consortium")
        .prefetch_related(Prefetch("silos", queryset=Silo.objects.order_by("name")))
        .order_by("number")
    )


def plan_decisions(plan: TrainingPlan) -> QuerySet[Approval]:
    """Every approval and rejection of every version of a plan, in the order they were made."""
    return (
        Approval.objects.filter(version__plan=plan)
        .select_related("version", "user", "organization")
        .order_by("created_at", "pk")
    )


def version_decisions(version: PlanVersion) -> QuerySet[Approval]:
    """The approvals and rejections recorded for one plan version (and its hash)."""
    return (
        Approval.objects.filter(version=version, plan_hash=version.spec_hash)
        .select_related("user", "organization")
        .order_by("created_at", "pk")
    )


def version_silos(version: PlanVersion) -> QuerySet[Silo]:
    """The silos a plan version names, by name, with their organisation."""
    return version.silos.select_related("organization").order_by("name", "pk")


def plan_runs(plan: TrainingPlan) -> QuerySet[Run]:
    """A plan's runs, newest first."""
    return plan.runs.select_related("version").order_by("-created_at", "-pk")


def silo_participation(silo: Silo) -> QuerySet[Run]:
    """Runs whose plan version names the silo, newest first, with what the silo contributed."""
    answered = Update.objects.filter(round__run=OuterRef("pk"), silo=silo)
    return (
        Run.objects.filter(version__silos=silo)
        .select_related("plan", "version")
        .annotate(
            rounds_selected=Count("round_set", filter=Q(round_set__selected=silo), distinct=True),
            updates_sent=Subquery(answered.values("silo").annotate(n=Count("pk")).values("n")[:1]),
            examples_sent=Subquery(
                answered.values("silo").annotate(n=Sum("num_examples")).values("n")[:1]
            ),
        )
        .order_by("-created_at", "-pk")
    )


def silo_rounds(silo: Silo, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest rounds the silo was selected for: did it answer, with how many examples."""
    rows = (
        Round.objects.filter(selected=silo)
        .select_related("run__plan")
        .order_by("-started_at", "-pk")[:limit]
    )
    rows = list(rows)
    sent = {
        u.round_id: u for u in Update.objects.filter(silo=silo, round_id__in=[r.pk for r in rows])
    }
    return [{"round": r, "update": sent.get(r.pk)} for r in rows]


def run_silos(run: Run) -> QuerySet[Silo]:
    """The silos the run's plan version names, by name, with their organisation."""
    return run.version.silos.select_related("organization").order_by("name", "pk")


def _round_update_sum(expression: Any) -> Subquery:
    """Subquery: the sum of ``expression`` over a round's accepted updates (None without any).

    A subquery, not a Sum() beside the Count()s: the join with ``selected`` would multiply it."""
    return Subquery(
        Update.objects.filter(round=OuterRef("pk"))
        .order_by()
        .values("round")
        .annotate(total=Sum(expression))
        .values("total")
    )


def run_rounds(run: Run, *, summary_metrics: bool = False) -> QuerySet[Round]:
    """A run's rounds (every attempt) with how many silos were selected and answered, and the
    bytes their updates took on the wire (``received_bytes``: compressed as sent; updates from
    before wire sizes were recorded count their stored size) and in storage (``stored_bytes``).

    ``summary_metrics``: also each round's round-level metrics (``summary_metrics``, one more
    query)."""
    rounds = (
        Round.objects.filter(run=run)
        .annotate(
            selected_count=Count("selected", distinct=True),
            updates_count=Count("updates", distinct=True),
            received_bytes=_round_update_sum(Coalesce("wire_bytes", "size_bytes")),
            stored_bytes=_round_update_sum("size_bytes"),
        )
        .order_by("number", "attempt")
    )
    if summary_metrics:
        rounds = rounds.prefetch_related(
            Prefetch(
                "metrics",
                queryset=RoundMetric.objects.filter(silo__isnull=True).order_by("scope", "name"),
                to_attr="summary_metrics",
            )
        )
    return rounds


def run_task(run: Run) -> str:
    """The prediction task of a run's plan (``schema.target.task``): binary, multiclass or
    regression (docs/tasks.md); an analysis plan's run counts as binary (it charts nothing)."""
    target = (run.version.spec.get("schema") or {}).get("target")
    task = target.get("task", "binary") if isinstance(target, dict) else "binary"
    return task if task in ("binary", "multiclass", "regression") else "binary"


def run_metric_rows(run: Run) -> list[dict[str, Any]]:
    """Every metric of a run: round number and attempt, silo name (None for the round's
    summary), scope (global, local, train), name and value."""
    return list(
        RoundMetric.objects.filter(round__run=run)
        .order_by("round__number", "round__attempt", "silo__name", "scope", "name")
        .values(
            round_number=F("round__number"),
            attempt=F("round__attempt"),
            silo_name=F("silo__name"),
            metric_scope=F("scope"),
            metric_name=F("name"),
            metric_value=F("value"),
        )
    )


def run_contributions(run: Run) -> list[dict[str, Any]]:
    """Per participating silo: its rows, the rounds it answered and the examples it trained on."""
    silos = run_silos(run).annotate(
        updates_sent=Count("updates", filter=Q(updates__round__run=run), distinct=True),
        examples_sent=Sum("updates__num_examples", filter=Q(updates__round__run=run)),
    )
    return [
        {
            "silo": silo,
            "row_count": silo.row_count,
            "updates_sent": silo.updates_sent,
            "examples_sent": silo.examples_sent or 0,
        }
        for silo in silos
    ]


def run_analysis_contributions(run: Run) -> list[dict[str, Any]]:
    """Per participating silo of an analysis run: the steps it was asked, those it answered and
    its refusal, if any (the compliance report's record of what each site released)."""
    from federation.models import SiloAnalysis, SiloRefusal

    asked: dict[int, list[SiloAnalysis]] = {}
    for row in SiloAnalysis.objects.filter(run=run).order_by("asked_at", "pk"):
        asked.setdefault(row.silo_id, []).append(row)
    refusals = {r.silo_id: r.reason for r in SiloRefusal.objects.filter(run=run)}
    return [
        {
            "silo": silo,
            "steps_asked": [row.step for row in asked.get(silo.pk, [])],
            "steps_answered": [
                row.step for row in asked.get(silo.pk, []) if row.answer is not None
            ],
            "refused": refusals.get(silo.pk, ""),
        }
        for silo in run_silos(run)
    ]


def run_privacy_spent(run: Run) -> dict[str, float]:
    """Epsilon the run spent at each participating silo, by silo name: the run's privacy ledger
    entries at that silo composed by the accountant (0.0 where there are none, as without DP)."""
    from federation import ledger

    histories: dict[int, list[tuple[float, float, int]]] = {}
    pure: dict[int, float] = {}
    for entry in PrivacyLedgerEntry.objects.filter(run=run).order_by("created_at", "pk"):
        if entry.epsilon_pure is not None:  # noisy fairness counts: basic composition on top
            pure[entry.silo_id] = pure.get(entry.silo_id, 0.0) + entry.epsilon_pure
            continue
        histories.setdefault(entry.silo_id, []).append(
            (entry.noise_multiplier, entry.sample_rate, entry.steps)
        )
    delta = ledger.plan_delta(run.version.spec)
    return {
        silo.name: ledger.composed_epsilon(
            histories.get(silo.pk, []), ledger.ledger_delta(silo, delta)
        )
        + pure.get(silo.pk, 0.0)
        for silo in run.version.silos.order_by("name")
    }


def silo_privacy(
    silo: Silo, *, limit: int | None = 50, newest_first: bool = True
) -> dict[str, Any]:
    """A silo's privacy budget, what its data has spent (composed over its whole history), what
    remains, and its ledger entries (the newest ``limit`` of them; all when None)."""
    from federation import ledger

    spent = ledger.silo_spent_epsilon(silo)
    budget = silo.epsilon_budget
    order = ("-created_at", "-pk") if newest_first else ("created_at", "pk")
    entries = PrivacyLedgerEntry.objects.filter(silo=silo).order_by(*order)
    return {
        "budget": budget,
        "delta": ledger.ledger_delta(silo),
        "spent": spent,
        "remaining": None if budget is None else max(0.0, budget - spent),
        "entries": list(entries if limit is None else entries[:limit]),
    }


def silo_budget_report(silo: Silo) -> dict[str, Any]:
    """The API's budget report: budget, composed spend, what remains, every entry (oldest first)."""
    privacy = silo_privacy(silo, limit=None, newest_first=False)
    return {
        "epsilon_budget": privacy["budget"],
        "delta_budget": silo.delta_budget,
        "epsilon_spent": privacy["spent"],
        "epsilon_remaining": privacy["remaining"],
        "entries": privacy["entries"],
    }


def run_model_versions(run: Run) -> QuerySet[ModelVersion]:
    """A run's global models, oldest first."""
    return ModelVersion.objects.filter(run=run).select_related("round").order_by("number")


def consortium_model_versions(consortium: Consortium) -> QuerySet[ModelVersion]:
    """Every global model of a consortium's runs, newest run first, then by version."""
    return (
        ModelVersion.objects.filter(run__plan__consortium=consortium)
        .select_related("run__plan", "run__version", "round")
        .order_by("-run__created_at", "-run_id", "number")
    )


def model_version_bytes(version: ModelVersion) -> bytes:
    """The stored safetensors bytes of a global model."""
    return blob_store().get(version.blob_key)


def audit_events(
    consortium: Consortium, *, action: str = "", object_type: str = "", object_id: str = ""
) -> QuerySet[AuditEvent]:
    """A consortium's audit events, newest first, optionally of one action or object."""
    events = AuditEvent.objects.filter(consortium_id=consortium.pk)
    if action:
        events = events.filter(action=action)
    if object_type:
        events = events.filter(object_type=object_type)
    if object_id:
        events = events.filter(object_id=object_id)
    return events.order_by("-index")


def audit_actions(consortium: Consortium) -> list[str]:
    """The distinct actions recorded for a consortium, sorted (for the log's filter)."""
    return list(
        AuditEvent.objects.filter(consortium_id=consortium.pk)
        .order_by("action")
        .values_list("action", flat=True)
        .distinct()
    )


def run_audit_events(run: Run) -> QuerySet[AuditEvent]:
    """The audit trail of a run in chain order: its plan's events up to the run's end, then the
    run's own events (start, rounds, updates, end)."""
    plan_events = Q(object_type="plan", object_id=str(run.plan_id))
    if run.finished_at is not None:
        plan_events &= Q(created_at__lte=run.finished_at)
    return AuditEvent.objects.filter(
        Q(consortium_id=run.plan.consortium_id)
        & (plan_events | Q(object_type="run", object_id=str(run.pk)))
    ).order_by("index")


def run_consortium_id(run_id: Any) -> int | None:
    """The consortium of a run (None when there is no such run)."""
    try:
        run_id = int(run_id)
    except (TypeError, ValueError):
        return None
    return Run.objects.filter(pk=run_id).values_list("plan__consortium_id", flat=True).first()


# --------------------------------------------------------------------------------------------
# Fairness reports, the consortium's privacy budgets, and model export (dashboard pages).


def run_fairness_reports(run: Run) -> list[Any]:
    """A run's fairness reports, one per round (its latest completed attempt), oldest first.

    The report of round k is about model version k-1 (the model the silos received).
    """
    from federation.models import FairnessReport

    latest: dict[int, Any] = {}
    for stored in (
        FairnessReport.objects.filter(round__run=run)
        .select_related("round")
        .order_by("round__number", "round__attempt")
    ):
        latest[stored.round.number] = stored
    return [latest[number] for number in sorted(latest)]


def model_version_fairness(version: ModelVersion) -> Any | None:
    """The fairness report about a model version: round v+1's (None until that round ends)."""
    from federation.models import FairnessReport

    return (
        FairnessReport.objects.filter(
            round__run_id=version.run_id, round__number=version.number + 1
        )
        .select_related("round")
        .order_by("-round__attempt")
        .first()
    )


def run_fairness_flag_count(run: Run) -> int:
    """How many fairness.flag events the run's rounds appended to the audit log."""
    return AuditEvent.objects.filter(
        consortium_id=run.plan.consortium_id,
        action="fairness.flag",
        object_type="run",
        object_id=str(run.pk),
    ).count()


def consortium_privacy(consortium: Consortium) -> dict[str, Any]:
    """What the consortium's privacy budget report shows.

    ``silos``: per silo its budget, ledger delta, epsilon spent (composed over its whole
    history), what remains and its ledger entries oldest first. ``runs``: the ledger entries
    grouped by run, newest run first. ``pending``: for every submitted or approved plan, each
    participating silo's projected epsilon for a run of its current version alone
    (``governance.projected_epsilon``), its total after such a run composed with its history
    (``ledger.projected_total``) and whether that fits its budget.
    """
    from federation import governance, ledger

    silos = list(consortium_silos(consortium))
    entries = list(
        PrivacyLedgerEntry.objects.filter(silo__consortium=consortium)
        .select_related("run__plan")
        .order_by("created_at", "pk")
    )
    by_silo: dict[int, list[PrivacyLedgerEntry]] = {}
    by_run: dict[int | None, list[PrivacyLedgerEntry]] = {}
    names = {silo.pk: silo.name for silo in silos}
    for entry in entries:
        entry.silo_name = names.get(entry.silo_id, str(entry.silo_id))
        by_silo.setdefault(entry.silo_id, []).append(entry)
        by_run.setdefault(entry.run_id, []).append(entry)
    silo_rows = []
    for silo in silos:
        spent = ledger.silo_spent_epsilon(silo)
        budget = silo.epsilon_budget
        silo_rows.append(
            {
                "silo": silo,
                "budget": budget,
                "delta": ledger.ledger_delta(silo),
                "spent": spent,
                "remaining": None if budget is None else max(0.0, budget - spent),
                "entries": by_silo.get(silo.pk, []),
            }
        )
    runs = [
        {"run": group[0].run, "run_id": run_id, "entries": group}
        for run_id, group in sorted(by_run.items(), key=lambda item: -(item[0] or 0))
    ]
    pending = []
    plans = (
        TrainingPlan.objects.filter(
            consortium=consortium,
            status__in=(TrainingPlan.Status.SUBMITTED, TrainingPlan.Status.APPROVED),
            current_version__isnull=False,
        )
        .select_related("current_version")
        .order_by("-updated_at", "-pk")
    )
    for plan in plans:
        version = plan.current_version
        projected = governance.projected_epsilon(version)
        rows = []
        for silo in version.silos.order_by("name"):
            total = ledger.projected_total(silo, version)
            rows.append(
                {
                    "silo": silo,
                    "projected": projected.get(silo.name, 0.0),
                    "total_after": total,
                    "budget": silo.epsilon_budget,
                    "fits": silo.epsilon_budget is None or total <= silo.epsilon_budget,
                }
            )
        pending.append({"plan": plan, "version": version, "silos": rows})
    return {"silos": silo_rows, "runs": runs, "pending": pending}


def model_version_features(version: ModelVersion) -> list[str] | None:
    """The names of the model's input columns, from the run's fitted preprocessing (None when
    the run has none yet)."""
    from fedcore import tabular

    try:
        schema = tabular.DatasetSchema.from_dict(version.run.version.spec["schema"])
        return tabular.feature_names(schema, version.run.preprocessing or {})
    except (tabular.SchemaError, KeyError, TypeError, ValueError):
        return None


def model_version_onnx(version: ModelVersion) -> bytes:
    """The model version as ONNX (``fedcore.onnx_export``): the plan's model with its weights.

    Raises:
        ValueError: the run has no fitted preprocessing, or the stored weights do not match
            their recorded SHA-256 or the plan's model.
        fedcore.onnx_export.OnnxUnavailable: the server lacks the ``onnx`` package.
    """
    import hashlib

    from fedcore import onnx_export, tabular, tensors
    from fedcore.models import build_model

    names = model_version_features(version)
    if not names:
        raise ValueError("the run has no fitted preprocessing, so the model's inputs are unknown")
    data = model_version_bytes(version)
    if hashlib.sha256(data).hexdigest() != version.checksum:
        raise ValueError(
            f"the stored file of model v{version.number} of run {version.run_id} does not match "
            "its recorded SHA-256"
        )
    target = tabular.DatasetSchema.from_dict(version.run.version.spec["schema"]).target
    model = build_model(
        version.run.version.spec["model"], len(names), n_outputs=target.n_outputs, seed=0
    )
    state = tensors.decode_state_dict(data)
    try:
        tensors.check_compatible(state, model.state_dict())
        model.load_state_dict(state, strict=True)
    except (tensors.IncompatibleStateDict, RuntimeError) as exc:
        raise ValueError(f"the stored weights do not fit the plan's model: {exc}") from None
    return onnx_export.export_onnx(
        model, len(names), task=target.task, thresholds=model_version_thresholds(version)
    )


def model_version_thresholds(version: ModelVersion) -> Any:
    """The group thresholds that are part of this model version (``ThresholdRules``): those of
    a postprocess run's final evaluation, for the final model; None for any other version."""
    from fedcore.fairness_mitigation import ThresholdRules

    final = version.run.evaluation if isinstance(version.run.evaluation, dict) else None
    if not final or final.get("model_version") != version.number or not final.get("thresholds"):
        return None
    return ThresholdRules.from_json(final["thresholds"])


# --------------------------------------------------------------------------------------------
# Reads behind the API: querysets shaped so a page costs a constant number of queries. Every list
# starts from a ``federation.permissions`` scope (``*_visible_to``, ``access_*``), so what a user
# can list is decided in one place; these only add joins, prefetches, counts and a stable order.


def me(user: Any) -> Any:
    """The user with their memberships, organisations and consortia."""
    memberships = Membership.objects.select_related(
        "user", "organization__consortium", "granted_by"
    ).order_by("organization__consortium__name", "organization__name", "role")
    return (
        get_user_model()
        .objects.prefetch_related(Prefetch("memberships", queryset=memberships))
        .get(pk=user.pk)
    )


def user_by_username(username: str) -> Any | None:
    """The user with this username, or None."""
    return get_user_model().objects.filter(username=username).first()


def consortium_list(user: Any) -> QuerySet[Consortium]:
    """The user's consortia by name."""
    return permissions.consortia_of(user)


def silo_list(user: Any) -> QuerySet[Silo]:
    """Silos of the user's consortia."""
    return (
        permissions.silos_visible_to(user)
        .select_related("organization")
        .order_by("consortium_id", "name", "pk")
    )


def uploaded_models(user: Any, consortium: Any) -> QuerySet[Any]:
    """Models uploaded to a consortium of the user's, newest first."""
    return (
        permissions.uploaded_models_visible_to(user)
        .filter(consortium=consortium)
        .select_related("uploaded_by")
        .order_by("-created_at", "-pk")
    )


def plan_list(user: Any) -> QuerySet[TrainingPlan]:
    """Plans of the user's consortia, newest first."""
    return (
        permissions.plans_visible_to(user)
        .select_related("current_version", "proposed_by")
        .order_by("-created_at", "-pk")
    )


def plan_version(plan: TrainingPlan, number: int) -> PlanVersion:
    """Version `number` of a plan the user may see, else 404."""
    found = plan_versions(plan).filter(number=number).first()
    if found is None:
        raise Http404("no such plan version")
    return found


def run_list(user: Any) -> QuerySet[Run]:
    """Runs of the user's consortia, newest first."""
    return (
        permissions.runs_visible_to(user)
        .select_related("plan", "version", "started_by")
        .order_by("-created_at", "-pk")
    )


def audit_event_list(user: Any) -> QuerySet[AuditEvent]:
    """Events of the consortia whose log the user may read (else PermissionDenied)."""
    ids = permissions.audit_consortium_ids(user)
    return AuditEvent.objects.filter(consortium_id__in=ids).order_by("index")


# Refusing sites (federation.services.refusals): who is out of a run's selection, and why.


def run_refused_silo_ids(run_id: int) -> QuerySet[SiloRefusal]:
    """Ids (a ``silo_id`` values subquery) of the silos a run does not select: they refused it."""
    return SiloRefusal.objects.filter(run_id=run_id).values("silo_id")


def run_refusals(run: Run) -> QuerySet[SiloRefusal]:
    """The silos out of a run's selection, why and since when, oldest first."""
    return SiloRefusal.objects.filter(run=run).select_related("silo").order_by("since", "pk")


def round_refused_count(round_: Round) -> int:
    """How many of a round's selected silos sent no update and refused the run: the round does
    not wait for them."""
    return (
        round_.selected.exclude(pk__in=round_.updates.values("silo_id"))
        .filter(pk__in=run_refused_silo_ids(round_.run_id))
        .count()
    )
