"""An analysis plan's run: ask every site for each step, merge, release the result.

An analysis plan (``"kind": "analysis"``, ``fedcore.plan.analysis``) is governed exactly like a
training plan (hash, every steward's approval, signed grants); only its run differs. The round
state machine hands an analysis run to :func:`analysis_step` (``federation.services.rounds``),
which, in the run's locked transaction:

1. waits for the plan's ``min_silos`` selectable silos (failing the run after
   ``wait_for_silos_seconds``), then asks each of them for the first step: a ``SiloAnalysis``
   row each and a signed ``analysis_request`` (``federation.selectors.analysis_request_fields``);
2. when every asked silo answered (:func:`analysis_receive`) or the step's deadline passed,
   merges the answers (``fedcore.analytics.steps.merge_step``) and asks the silos that answered
   for the next step, or releases the result (``steps.release``: suppression with the largest
   minimum cell count of the sites, the largest minimum number of sites);
   (a quantile asks bisection steps until its search is exact, a Cox or logistic model a
   Newton step at a time until it converges or reaches the plan's ``max_iterations``:
   ``steps.next_step``);
3. stores the result in ``Run.analysis["result"]`` and audits ``analysis.released``.

Under secure aggregation (the plan's ``secure_aggregation``) an answer carries its summary's
layout instead of the summary (one carrying a summary in clear is refused, nothing stored);
when the step's answers are in, :func:`_secure_sum` opens the step's SecAgg session over the
sites that answered (``federation.secagg_analysis``), waits for it, and merges the unmasked sum
exactly as the clear merge would; a site out of the sum at a later step withholds the result,
as a silent one does. The result says what travelled masked and what in clear
(``"secure_aggregation"``: Kaplan-Meier's and the unstratified Cox model's event times).

Nothing is released when a site refused (its agent's ``policy_refused``, for instance a cohort
below its minimum cell count, recorded by ``federation.services.refusals``): the other sites'
results alone, set beside a release that included it, would reveal the refusing site's part by
difference. Nor when a site that answered an earlier step of the run is silent at a later step's
deadline (the earlier merges hold its data), nor when fewer sites answered than the plan or any
answering site requires. Each fails the run with the reason, audited as ``analysis.withheld``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from fedcore.analytics import secure
from fedcore.analytics.disclosure import DisclosureRefused
from fedcore.analytics.steps import EVENT_TIMES, SUMMARY, merge_step, next_step, release
from fedcore.plan import AnalysisPlan, parse_analysis_plan
from federation import dispatch, ledger, secagg_analysis
from federation.models import Run, Silo, SiloAnalysis, SiloRefusal, TrainingPlan
from federation.services.audit import audit_append
from federation.services.updates import Refused, audit_refused

log = logging.getLogger("quorum.orchestrator")

ANALYSIS_EVENT = "run.analysis_request"
# An answer larger than this (JSON characters) is refused: a grid of every event time of a
# large registry fits many times over.
MAX_ANSWER_CHARS = 8_000_000


def analysis_step(run: Run, online: list[Silo]) -> tuple[str, str]:
    """Move an analysis run on, in the caller's transaction with the run locked.

    Returns:
        ``("wait", why)``, ``("complete", "")`` (the result is in ``run.analysis``) or
        ``("fail", reason)``: the caller completes or fails the run.
    """
    plan = parse_analysis_plan(run.version.spec)
    now = timezone.now()
    if run.status == Run.Status.PENDING:
        return _begin(run, plan, online, now)
    state = dict(run.analysis or {})
    index = int(state["step"])
    step = state["steps"][index]
    rows = list(
        SiloAnalysis.objects.filter(run=run, step=step).select_related("silo").order_by("silo_id")
    )
    refusals = list(
        SiloRefusal.objects.filter(run=run, silo_id__in=[r.silo_id for r in rows])
        .select_related("silo")
        .order_by("silo__name")
    )
    if refusals:
        reasons = "; ".join(f"{r.silo.name}: {r.reason}" for r in refusals)
        return _withhold(
            run,
            f"{len(refusals)} site(s) refused the analysis ({reasons}); nothing is released: "
            "the other sites' results alone could reveal a refusing site's by difference",
        )
    answered = [r for r in rows if r.answer is not None]
    deadline = datetime.fromisoformat(state["deadline"])
    if len(answered) < len(rows) and now < deadline:
        return "wait", f"{len(answered)} of {len(rows)} sites answered step {step!r}"
    if index > 0 and len(answered) < len(rows):
        # Asked because they answered every step before: those steps' merges (an event-time
        # grid, a centre, a Newton path) hold their data, so the others' result alone would be
        # neither the pooled one nor safe (the grid shows their event times; set beside the
        # merges, it gives their part by difference).
        missing = ", ".join(r.silo.name for r in rows if r.answer is None)
        return _withhold(
            run,
            f"site(s) {missing} answered the earlier steps but not step {step!r} by its "
            "deadline; the earlier steps included their data, so the other sites' result "
            "alone could reveal it: nothing is released",
        )
    if len(answered) < plan.min_sites:
        missing = ", ".join(r.silo.name for r in rows if r.answer is None)
        return _withhold(
            run,
            f"{len(answered)} of {len(rows)} sites answered step {step!r} by its deadline "
            f"(missing: {missing}); the plan needs {plan.min_sites}"
            + (" (secure aggregation sums at least 2)" if plan.secure_aggregation else "")
            + ": nothing is released",
        )
    summed = None
    if plan.secure_aggregation and any("masked" in r.answer for r in answered):
        secured = _secure_sum(run, plan, step, index, answered)
        if isinstance(secured[0], str):
            return secured  # type: ignore[return-value]
        answered, summed = secured  # type: ignore[assignment]
    answers = [r.answer for r in answered]
    try:
        merged = merge_step(plan.analysis, step, answers, summed=summed)
    except (ValueError, KeyError, TypeError) as exc:
        return _withhold(run, f"the sites' answers to step {step!r} do not merge: {exc}")
    state["merged"] = {**state.get("merged", {}), step: merged}
    try:
        following = next_step(
            plan.analysis,
            [state["merged"][name] for name in state["steps"]],
            secure=plan.secure_aggregation,
        )
    except ValueError as exc:
        return _withhold(run, f"the analysis cannot go on after step {step!r}: {exc}")
    if following is not None:
        _ask(run, plan, state, following, [r.silo for r in answered], now)
        return "wait", f"asked step {following[0]!r}"
    try:
        result = release(
            plan.analysis,
            state["merged"],
            answers,
            min_silos=plan.min_silos,
            noise=plan.privacy,
            secure=plan.secure_aggregation,
        )
    except (DisclosureRefused, ValueError, TypeError, KeyError) as exc:
        return _withhold(run, f"the result cannot be released: {exc}")
    result["asked"] = sorted(r.silo.name for r in rows)
    result["answered"] = sorted(r.silo.name for r in answered)
    result["missing"] = sorted({r.silo.name for r in rows} - set(result["answered"]))
    if plan.secure_aggregation:
        result["secure_aggregation"] = _secure_note(state["steps"], run)
    state["result"] = result
    run.analysis = state
    run.save(update_fields=["analysis"])
    _audit(run, "analysis.released", kind=plan.analysis.kind, sites=result["answered"])
    return "complete", ""


def _secure_sum(
    run: Run, plan: AnalysisPlan, step: str, index: int, answered: list[SiloAnalysis]
) -> tuple[str, str] | tuple[list[SiloAnalysis], dict[str, Any]]:
    """The step's summaries summed under secure aggregation (``federation.secagg_analysis``):
    ``("wait", why)`` or ``("fail", reason)``, else the rows of the sites in the sum and the
    merged summary. Opens the step's SecAgg session over the sites that answered the first
    time it is called; the sum holds the sites whose masked input arrived."""
    if not secagg_analysis.started(run.pk, step):
        layouts = [(r.answer.get("masked") or {}).get("layout") for r in answered]
        if any(spec != layouts[0] for spec in layouts):
            return _withhold(
                run,
                f"the sites' summaries of step {step!r} have different layouts (the sites ran "
                "different requests): they cannot be summed; nothing is released",
            )
        try:
            secagg_analysis.open_step(run, plan, step, [r.silo_id for r in answered], layouts[0])
        except ValueError as exc:
            return _withhold(run, f"step {step!r} cannot be summed securely: {exc}")
        return "wait", f"secure aggregation of step {step!r} opened"
    outcome = secagg_analysis.outcome(run.pk, step)
    if outcome is None:
        return "wait", f"secure aggregation of step {step!r} in progress"
    if not outcome.ok:
        return _withhold(
            run,
            f"the secure aggregation of step {step!r} failed ({outcome.error}); nothing is "
            "released",
        )
    contributors = set(outcome.contributors)
    out = [r for r in answered if r.silo_id not in contributors]
    if out and index > 0:
        names = ", ".join(r.silo.name for r in out)
        return _withhold(
            run,
            f"site(s) {names} answered the earlier steps but dropped out of the secure "
            f"aggregation of step {step!r} before their masked input; the earlier steps "
            "included their data, so the other sites' result alone could reveal it: nothing "
            "is released",
        )
    if len(contributors) < plan.min_sites:
        return _withhold(
            run,
            f"{len(contributors)} site(s) are in the secure sum of step {step!r}; the plan "
            f"needs {plan.min_sites}: nothing is released",
        )
    secagg_analysis.forget(run.pk, step)
    assert outcome.summed is not None
    return [r for r in answered if r.silo_id in contributors], outcome.summed


def _secure_note(steps: list[str], run: Run) -> dict[str, Any]:
    """What a result under secure aggregation says about what the server saw."""
    clear = sorted({s for s in steps if s == EVENT_TIMES})
    masked = [s for s in steps if s not in clear or _has_summary(run, s)]
    return {
        "masked_steps": masked,
        "clear_steps": clear,
        "note": (
            "every site's summary of the masked steps was summed under secure aggregation: "
            "the server saw only the sum (counts exact; sums of reals in fixed point with 32 "
            "fractional bits, each site's value rounded by at most 2^-33)"
            + (
                "; the event-time step's answer is a set (each site's distinct event times, "
                "coarsened to its time_step), not a sum: it travelled in clear"
                if clear
                else ""
            )
        ),
    }


def _has_summary(run: Run, step: str) -> bool:
    return SiloAnalysis.objects.filter(run=run, step=step, answer__has_key="masked").exists()


def _begin(run: Run, plan: AnalysisPlan, online: list[Silo], now: datetime) -> tuple[str, str]:
    if len(online) < plan.min_sites:
        if run.waiting_since is None:
            run.waiting_since = now
            run.save(update_fields=["waiting_since"])
            dispatch.enqueue_advance(run.pk, countdown=plan.wait_for_silos_seconds + 0.05)
        elif (now - run.waiting_since).total_seconds() >= plan.wait_for_silos_seconds:
            return (
                "fail",
                f"{len(online)} site(s) connected after {plan.wait_for_silos_seconds:g} s; the "
                f"analysis needs {plan.min_sites} (min_silos"
                + (", and 2 under secure aggregation)" if plan.secure_aggregation else ")"),
            )
        return "wait", f"{len(online)} of {plan.min_sites} sites connected"
    run.status = Run.Status.RUNNING
    run.waiting_since = None
    run.started_at = now
    run.save(update_fields=["status", "waiting_since", "started_at"])
    TrainingPlan.objects.filter(pk=run.plan_id).update(status=TrainingPlan.Status.RUNNING)
    first = next_step(plan.analysis, [])
    assert first is not None  # every analysis asks at least one step
    _ask(run, plan, {"steps": [], "merged": {}}, first, online, now)
    _audit(run, "analysis.started", kind=plan.analysis.kind, silos=[s.name for s in online])
    return "wait", "asked the first step"


def _ask(
    run: Run,
    plan: AnalysisPlan,
    state: dict[str, Any],
    request: tuple[str, dict[str, Any]],
    silos: list[Silo],
    now: datetime,
) -> None:
    step, params = request
    state["steps"] = [*state["steps"], step]
    state["step"] = len(state["steps"]) - 1
    state["params"] = params
    state["deadline"] = (now + timedelta(seconds=plan.round_deadline_seconds)).isoformat()
    run.analysis = state
    run.save(update_fields=["analysis"])
    SiloAnalysis.objects.bulk_create(
        SiloAnalysis(run=run, silo=silo, step=step, asked_at=now) for silo in silos
    )
    for silo in silos:
        dispatch.send_to_silo(silo.pk, {"type": ANALYSIS_EVENT, "run_id": run.pk})
    dispatch.enqueue_advance(run.pk, countdown=plan.round_deadline_seconds + 0.05)
    log.info("run %s: analysis step %r asked of %d silos", run.pk, step, len(silos))


def _withhold(run: Run, reason: str) -> tuple[str, str]:
    secagg_analysis.forget(run.pk)
    _audit(run, "analysis.withheld", reason=reason)
    return "fail", reason


def _audit(run: Run, action: str, **data: Any) -> None:
    audit_append(
        actor="system",
        action=action,
        consortium_id=run.plan.consortium_id,
        object_type="run",
        object_id=run.pk,
        data=data,
    )


def analysis_receive(*, silo_id: int, fields: Mapping[str, Any]) -> None:
    """Keep a silo's answer to the current step of an analysis run.

    Refused, changing nothing (audited as ``analysis.refused``): a run the silo is not part of
    or that asks no analysis step (``wrong_run``), another step (``wrong_round``), a silo not
    asked (``not_selected``), a second answer (``duplicate_update``), an answer that is not an
    object of the step or too large (``invalid_update``).
    """
    try:
        _analysis_receive(silo_id=silo_id, fields=fields)
    except Refused as refused:
        audit_refused(silo_id, "analysis.refused", fields.get("run", ""), refused)
        raise


def _analysis_receive(*, silo_id: int, fields: Mapping[str, Any]) -> None:
    silo = Silo.objects.get(pk=silo_id)
    run_id, step, answer = fields["run"], fields["step"], fields["answer"]
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(pk=run_id).first()
        if run is None or not run.version.silos.filter(pk=silo.pk).exists():
            raise Refused(
                "wrong_run", f"run {run_id} does not exist or this silo does not take part"
            )
        state = run.analysis or {}
        if run.status != Run.Status.RUNNING or "step" not in state:
            raise Refused("wrong_run", f"run {run.pk} asks no analysis step (it is {run.status})")
        current = state["steps"][state["step"]]
        if step != current:
            raise Refused(
                "wrong_round", f"answer to step {step!r} refused: run {run.pk} asks {current!r}"
            )
        if answer.get("step") != step or not ({"summary", "event_times", "masked"} & set(answer)):
            raise Refused("invalid_update", f"the answer is not an answer to step {step!r}")
        if len(json.dumps(answer)) > MAX_ANSWER_CHARS:
            raise Refused("invalid_update", f"the answer is over {MAX_ANSWER_CHARS} characters")
        plan = parse_analysis_plan(run.version.spec)
        _check_secure(plan, run, step, answer)
        noise = plan.privacy
        noised = noise is not None and bool({"summary", "masked"} & set(answer)) and step == SUMMARY
        if noised and answer.get("noise") != noise.describe():
            raise Refused(
                "invalid_update",
                f"the plan asks every site to add {noise.mechanism} noise (epsilon "
                f"{noise.epsilon:g}) to its table; the answer does not say it did",
            )
        row = SiloAnalysis.objects.filter(run=run, silo=silo, step=step).first()
        if row is None:
            raise Refused("not_selected", f"this silo was not asked step {step!r} of run {run.pk}")
        if row.answer is not None:
            raise Refused("duplicate_update", f"this silo's answer to step {step!r} is in")
        row.answer = dict(answer)
        row.received_at = timezone.now()
        row.save(update_fields=["answer", "received_at"])
        if noised:
            assert noise is not None
            # The site released its noised table to the server: that costs its epsilon
            # whether or not the result is released.
            ledger.analysis_charge(run=run, silo=silo, noise=noise)
        audit_append(
            actor=f"silo:{silo.name}",
            action="analysis.received",
            consortium_id=silo.consortium_id,
            object_type="run",
            object_id=run.pk,
            data={"step": step},
        )
        waiting = SiloAnalysis.objects.filter(run=run, step=step, answer__isnull=True).exists()
        if not waiting:  # the last answer wakes the orchestrator; the deadline the rest
            dispatch.enqueue_advance(run.pk)


def _check_secure(plan: AnalysisPlan, run: Run, step: str, answer: Mapping[str, Any]) -> None:
    """Under secure aggregation a summary never reaches the server in clear: an answer carries
    its layout (``"masked"``) instead, and only before the step's SecAgg session started.
    Without it, an answer must not be masked. Raises ``Refused`` (nothing is stored)."""
    if not plan.secure_aggregation:
        if "masked" in answer:
            raise Refused(
                "invalid_update",
                "the plan does not run under secure aggregation: the answer must carry its "
                "summary, not a masked layout",
            )
        return
    if "summary" in answer:
        raise Refused(
            "invalid_update",
            "the plan runs under secure aggregation: a site's summary must not reach the "
            "server in clear (send its layout and mask it); nothing was stored",
        )
    if "masked" in answer:
        masked = answer["masked"]
        try:
            if not isinstance(masked, Mapping) or set(masked) != {"layout"}:
                raise ValueError("'masked' must be {'layout': [...]}")
            secure.check_layout(masked["layout"])
        except ValueError as exc:
            raise Refused("invalid_update", f"the answer's masked layout: {exc}") from None
    if secagg_analysis.started(run.pk, step):
        raise Refused(
            "wrong_round",
            f"the secure aggregation of step {step!r} started without this site (the step's "
            "deadline passed)",
        )
