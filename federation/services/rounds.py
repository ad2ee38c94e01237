"""Round and run writes: apply the state machine's decisions, aggregate rounds.

``run_step`` locks a run, loads a snapshot of it (:func:`run_state`), asks the pure decision
function (``federation.roundplan.decide``) what to do and applies that one decision in the same
transaction. ``federation.orchestrator.run_advance`` calls it until the run waits. Every step
re-reads the database, so a step may be repeated, run by any process, or interrupted by a crash
without losing or double-counting an accepted update. Aggregation (:func:`round_aggregate`) runs
outside any transaction and streams the updates from blob storage one at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from fedcore import aggregation, tabular, task_metrics, tensors
from fedcore.aggregation import AggregateResult
from fedcore.fairness_mitigation import MitigationError
from fedcore.models import build_model
from fedcore.plan import (
    RunSettings,
    is_analysis,
    is_evaluation_plan,
    run_settings,
    server_strategy_spec,
)
from fedcore.privacy import accounting as dp_accounting
from fedcore.privacy import client_dp
from fedcore.privacy.wrapper import ClientDPStrategy
from federation import dispatch, ledger, roundplan, secagg_rounds
from federation.models import (
    ModelVersion,
    Round,
    RoundMetric,
    Run,
    Silo,
    TrainingPlan,
)
from federation.selectors import online_silos, round_refused_count, round_task_fields
from federation.services import analysis as analysis_service
from federation.services import evaluation as evaluation_service
from federation.services import evaluation_plans
from federation.services import fairness as fairness_service
from federation.services import mitigation as mitigation_service
from federation.services.audit import audit_append
from federation.services.updates import validate_metrics
from federation.storage import blob_store, model_key, strategy_key

log = logging.getLogger("quorum.orchestrator")


# -- the state machine: snapshot, decide, apply ---------------------------------------------------


def run_limits(cfg: RunSettings, *, secure: bool) -> roundplan.Limits:
    """The decision function's limits of a plan's run settings."""
    return roundplan.Limits(
        rounds=cfg.rounds,
        min_silos=cfg.min_silos,
        round_retries=cfg.round_retries,
        round_deadline_seconds=cfg.round_deadline_seconds,
        wait_for_silos_seconds=cfg.wait_for_silos_seconds,
        aggregation_stale_seconds=float(settings.QUORUM_AGGREGATION_STALE_SECONDS),
        secure=secure,
        sole_aggregator_since=dispatch.sole_orchestrator_since(),
    )


def run_state(run: Run, online: list[Silo]) -> roundplan.RunState:
    """The snapshot of a run the decision function needs (read in the caller's transaction)."""
    spec = run.version.spec
    secure = secagg_rounds.is_secure(spec)
    limits = run_limits(run_settings(spec), secure=secure)
    state = roundplan.RunState(
        status=run.status,
        now=timezone.now(),
        limits=limits,
        online=tuple(s.pk for s in online),
        waiting_since=run.waiting_since,
        stats_deadline=run.stats_deadline,
    )
    if run.status == Run.Status.STATS:
        return replace(
            state,
            stats_reported=run.silo_statistics.count(),
            stats_expected=run.version.silos.filter(admission=Silo.Admission.ADMITTED).count(),
        )
    if run.status == Run.Status.EVALUATING:
        asked, reported, refused = evaluation_service.evaluation_counts(run)
        return replace(
            state,
            evaluation_deadline=run.evaluation_deadline,
            evaluation_asked=asked,
            evaluation_reported=reported,
            evaluation_refused=refused,
        )
    if run.status != Run.Status.RUNNING:
        return state
    current = run.round_set.order_by("-number", "-attempt").first()
    if current is None:
        return state
    outcome = None
    if secure and current.status == Round.Status.COLLECTING:
        found = secagg_rounds.outcome(current)  # closes a stage whose deadline passed
        if found is not None:
            outcome = roundplan.SecureOutcome(
                ok=found.ok, contributors=len(found.contributors), error=found.error
            )
    collecting = current.status == Round.Status.COLLECTING
    return replace(
        state,
        current=roundplan.RoundState(
            id=current.pk,
            number=current.number,
            attempt=current.attempt,
            status=current.status,
            selected=current.selected.count() if collecting else 0,
            received=current.updates.count() if collecting and not secure else 0,
            refused=round_refused_count(current) if collecting and not secure else 0,
            started_at=current.started_at,
            deadline=current.deadline,
            aggregation_started_at=current.aggregation_started_at,
            error=current.error,
            secure_outcome=outcome,
        ),
    )


@transaction.atomic
def run_step(*, run_id: int) -> roundplan.Decision | None:
    """Decide the next thing to do for a run and do it; None when the run is gone or over."""
    run = (
        Run.objects.select_for_update().select_related("plan", "version").filter(pk=run_id).first()
    )
    if run is None or not run.active:
        return None
    if is_analysis(run.version.spec):  # an analysis plan: no rounds (services.analysis)
        return _analysis_step(run)
    if is_evaluation_plan(run.version.spec) and run.status == Run.Status.PENDING:
        return _evaluation_plan_start(run)  # then the final evaluation's phase, as below
    online = online_silos(run, evaluation=_evaluation_next(run))
    decision = roundplan.decide(run_state(run, online))
    _apply(run, decision, online)
    return decision


def _analysis_step(run: Run) -> roundplan.Decision:
    outcome, why = analysis_service.analysis_step(run, online_silos(run))
    if outcome == "complete":
        _complete_run(run)
    elif outcome == "fail":
        _fail_run(run, why)
    return roundplan.Wait(reason=why or "analysis released")


def _evaluation_plan_start(run: Run) -> roundplan.Decision:
    outcome, why = evaluation_plans.evaluation_plan_begin(run, online_silos(run, evaluation=True))
    if outcome == "fail":
        _fail_run(run, why)
    return roundplan.Wait(reason=why or "evaluating")


def _evaluation_next(run: Run) -> bool:
    """Whether the run's next phase is the final evaluation (its last round is completed): its
    silos need only afford the evaluation's fairness counts, not another training round."""
    if run.status != Run.Status.RUNNING:
        return False
    last = run.round_set.order_by("-number", "-attempt").values("number", "status").first()
    return (
        last is not None
        and last["status"] == Round.Status.COMPLETED
        and last["number"] >= run.rounds
    )


def _apply(run: Run, decision: roundplan.Decision, online: list[Silo]) -> None:
    cfg = run_settings(run.version.spec)
    match decision:
        case roundplan.Wait():
            return
        case roundplan.StartWaiting(online=count, needed=needed):
            run.waiting_since = timezone.now()
            run.save(update_fields=["waiting_since"])
            log.info("run %s waits for silos: %d online, %d needed", run.pk, count, needed)
            # the run page's waiting notice shows at once, not at the next event or a reload
            _publish(run, "run.waiting", online=count, needed=needed)
        case roundplan.BeginStatistics(silos=silo_ids):
            _begin_statistics(run, cfg, [s for s in online if s.pk in set(silo_ids)])
        case roundplan.FinishStatistics():
            _finish_statistics(run, cfg)
        case roundplan.OpenRound(number=number, attempt=attempt, silos=silo_ids):
            chosen = set(silo_ids)
            _open_round(run, cfg, [s for s in online if s.pk in chosen], number, attempt)
        case roundplan.CloseRound(round_id=round_id):
            Round.objects.filter(pk=round_id, status=Round.Status.COLLECTING).update(
                status=Round.Status.AGGREGATING, aggregation_started_at=timezone.now()
            )
        case roundplan.Aggregate():
            return  # the caller aggregates, outside this transaction
        case roundplan.FailRound(round_id=round_id, reason=reason):
            _fail_round(run, Round.objects.get(pk=round_id), reason)
        case roundplan.BeginEvaluation(silos=silo_ids):
            chosen = set(silo_ids)
            evaluation_service.evaluation_begin(run, cfg, [s for s in online if s.pk in chosen])
        case roundplan.FinishEvaluation():
            run.evaluation = evaluation_service.evaluation_pool(run)
            if is_evaluation_plan(run.version.spec):
                run.evaluation = evaluation_plans.evaluation_plan_result(run, run.evaluation)
            _complete_run(run)
        case roundplan.CompleteRun(note=note):
            if note:  # no silo could evaluate the final model: say so where the figures go
                run.evaluation = {**evaluation_service.evaluation_pool(run), "note": note}
            _complete_run(run)
        case roundplan.FailRun(reason=reason):
            _fail_run(run, reason)
        case _:
            raise TypeError(f"unknown decision {decision!r}")


def _begin_statistics(run: Run, cfg: RunSettings, silos: list[Silo]) -> None:
    run.status = Run.Status.STATS
    run.waiting_since = None
    run.started_at = timezone.now()
    run.stats_deadline = run.started_at + timedelta(seconds=cfg.round_deadline_seconds)
    run.save(update_fields=["status", "waiting_since", "started_at", "stats_deadline"])
    TrainingPlan.objects.filter(pk=run.plan_id).update(status=TrainingPlan.Status.RUNNING)
    for silo in silos:
        dispatch.send_to_silo(silo.pk, {"type": "run.stats_request", "run_id": run.pk})
    dispatch.enqueue_advance(run.pk, countdown=cfg.round_deadline_seconds + 0.05)
    _publish(run, "run.started")
    log.info("run %s: federated statistics requested from %d silos", run.pk, len(silos))


def _finish_statistics(run: Run, cfg: RunSettings) -> None:
    reported = list(run.silo_statistics.order_by("silo_id"))
    schema = tabular.DatasetSchema.from_dict(run.version.spec["schema"])
    try:
        noised = ledger.plan_statistics_epsilon(run.version.spec) > 0.0
        fitted = tabular.merge_statistics([s.stats for s in reported], schema, noised=noised)
        n_features = len(tabular.feature_names(schema, fitted))
        model = build_model(
            run.version.spec["model"],
            n_features,
            n_outputs=schema.target.n_outputs,
            seed=cfg.seed,
        )
    except ValueError as exc:
        _fail_run(run, f"federated statistics could not be combined: {exc}")
        return
    try:  # before round 1: a mitigation that cannot be computed never trains unmitigated
        run.mitigation = mitigation_service.compute(run, fitted)
    except MitigationError as exc:
        _fail_run(run, f"the plan's bias mitigation could not be computed: {exc}")
        return
    _store_model_version(run, number=0, state=model.state_dict(), round_=None)
    run.preprocessing = fitted
    run.status = Run.Status.RUNNING
    run.save(update_fields=["preprocessing", "status", "mitigation"])
    if run.mitigation is not None:
        _audit_run(
            run,
            "mitigation.computed",
            kind=run.mitigation["kind"],
            attribute=run.mitigation["attribute"],
            example_weights=run.mitigation["example_weights"],
        )
    log.info(
        "run %s: preprocessing fitted from %d silos, %d features", run.pk, len(reported), n_features
    )


def _open_round(run: Run, cfg: RunSettings, silos: list[Silo], number: int, attempt: int) -> None:
    if run.waiting_since is not None:
        run.waiting_since = None
        run.save(update_fields=["waiting_since"])
    now = timezone.now()
    round_ = Round.objects.create(
        run=run,
        number=number,
        attempt=attempt,
        started_at=now,
        deadline=now + timedelta(seconds=cfg.round_deadline_seconds),
    )
    round_.selected.set(silos)
    if secagg_rounds.is_secure(run.version.spec):  # its coordinator starts on commit
        for silo in silos:  # each connection asks whether its silo is still in the attempt
            dispatch.send_to_silo(silo.pk, {"type": "round.task", "round_id": round_.pk})
        secagg_rounds.open_round(round_, silos, run.version.spec, cfg)
    else:
        # Every task signed here, with one reading of the approvals, and carried by the event:
        # the connections send it without a database read and a grant each (bench/round_split.py,
        # "task out"). A connection that opens later asks through selectors.task_message.
        model = ModelVersion.objects.get(run=run, number=number - 1)
        tasks = round_task_fields(round_, model, silos)
        where = {"blob_key": model.blob_key, "checksum": model.checksum}
        for silo in silos:
            dispatch.send_to_silo(
                silo.pk,
                {
                    "type": "round.task",
                    "round_id": round_.pk,
                    "task": tasks[silo.pk],
                    "model": where,
                },
            )
    dispatch.enqueue_advance(run.pk, countdown=cfg.round_deadline_seconds + 0.05)
    _publish(run, "round.opened", round=number, selected=len(silos))
    log.info(
        "run %s: round %d (attempt %d) opened with %d silos", run.pk, number, attempt, len(silos)
    )


def _fail_round(run: Run, round_: Round, error: str) -> None:
    """Mark the attempt failed; the next decision retries it or fails the run."""
    if secagg_rounds.is_secure(run.version.spec):
        secagg_rounds.forget(round_.pk)
    round_.status = Round.Status.FAILED
    round_.finished_at = timezone.now()
    round_.error = error
    round_.save(update_fields=["status", "finished_at", "error"])
    # Audited whatever the cause (a secure round that unmasked too few contributors included):
    # the run monitor shows the reason, the audit log keeps it.
    _audit_run(run, "round.failed", round=round_.number, attempt=round_.attempt, error=error)
    _publish(run, "round.failed", round=round_.number, error=round_.error)
    log.warning("run %s: round %d failed: %s", run.pk, round_.number, round_.error)


# -- aggregation -----------------------------------------------------------------------------------


def round_aggregate(round_id: int) -> None:
    """Aggregate an AGGREGATING round's updates into the next model version (idempotent)."""
    round_ = Round.objects.select_related("run").get(pk=round_id)
    if round_.status != Round.Status.AGGREGATING:
        return
    updates = list(
        round_.updates.order_by("silo_id").values(
            "silo_id", "blob_key", "num_examples", "metrics", "task_part"
        )
    )
    store = blob_store()
    spec = round_.run.version.spec
    try:
        state, dp, result = _combine(round_, spec, updates)
    except (ValueError, OSError) as exc:
        _fail_round_aggregation(round_, f"aggregation failed: {exc}")
        return
    try:  # a constraint's multipliers step with this round's counts (next round's weights)
        reduction = mitigation_service.constraint_round(round_, spec, updates)
    except MitigationError as exc:
        _fail_round_aggregation(round_, f"the constraint mitigation could not be updated: {exc}")
        return
    data = tensors.encode_state_dict(state)
    key = model_key(run_id=round_.run_id, number=round_.number)
    store.put(key, data)  # before the commit: a crash here leaves a blob a re-run overwrites
    with transaction.atomic():
        locked = Round.objects.select_for_update().get(pk=round_id)
        if locked.status != Round.Status.AGGREGATING:
            return  # another worker finished it first
        ModelVersion.objects.update_or_create(
            run_id=round_.run_id,
            number=round_.number,
            defaults={
                "round": locked,
                "checksum": tensors.sha256_hex(data),
                "size_bytes": len(data),
                "blob_key": key,
                "signature": _signature_json(state),
            },
        )
        _record_round_metrics(locked, updates)
        fairness_service.record_round_report(locked, round_.run)  # of model v(k-1)
        if result is not None:
            locked.anomalies = _json_safe(result.flags)
            locked.aggregation_stats = _json_safe(result.stats)
            for flag in result.flags:
                _audit_run(
                    round_.run, "round.anomaly", **{**_json_safe(flag), "round": locked.number}
                )
        if reduction is not None:  # the next round's tasks carry the new example weights
            locked.aggregation_stats = {
                **(locked.aggregation_stats or {}),
                "reduction": _json_safe(
                    {k: reduction[k] for k in ("theta", "lambdas", "gamma", "max_violation", "met")}
                ),
            }
            Run.objects.filter(pk=round_.run_id).update(mitigation=_json_safe(reduction))
            _audit_run(
                round_.run,
                "mitigation.updated",
                round=locked.number,
                max_violation=reduction["max_violation"],
                example_weights=reduction["example_weights"],
            )
        if dp is not None:  # client-level DP: each contributing silo's data spent one step
            locked.aggregation_stats = _json_safe(dp)
            for silo in Silo.objects.filter(pk__in=[u["silo_id"] for u in updates]):
                ledger.ledger_append(
                    silo=silo,
                    run=round_.run,
                    round_number=locked.number,
                    mechanism="client",
                    noise_multiplier=dp["noise_multiplier"],
                    sample_rate=1.0,
                    steps=1,
                    delta=dp["delta"],
                )
        _audit_run(
            round_.run,
            "round.completed",
            round=locked.number,
            attempt=locked.attempt,
            updates=[u["silo_id"] for u in updates],
            model_sha256=tensors.sha256_hex(data),
        )
        locked.status = Round.Status.COMPLETED
        locked.finished_at = timezone.now()
        locked.save(update_fields=["status", "finished_at", "anomalies", "aggregation_stats"])
        _publish(round_.run, "round.completed", round=locked.number, updates=len(updates))
    log.info(
        "run %s: round %d aggregated from %d updates", round_.run_id, round_.number, len(updates)
    )
    secagg_rounds.forget(round_id)  # a secure round's unmasked sum is no longer needed


def _combine(
    round_: Round, spec: dict[str, Any], updates: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, float] | None, AggregateResult | None]:
    """The next global state from the round's updates, streamed one at a time from storage.

    Client-level DP plans (McMahan et al. 2018): each silo's delta from the round's global model
    is clipped to C, the clipped deltas are summed, Gaussian noise of std z*C (from a
    cryptographically keyed source) is added to the sum and it is divided by the number of
    silos selected for the round: an unweighted mean with a fixed denominator, so the sensitivity
    is C/m -- example counts never weight it. That noised mean is the one update the plan's
    strategy steps with (fedcore.privacy.wrapper: FedAdam + DP is FedAdam on the DP mean).

    Other plans: the plan's strategy (fedcore.aggregation), whose server-optimizer state is kept
    per round in blob storage so that a rerun of round k starts again from round k-1's state.
    """
    store = blob_store()
    reference = ModelVersion.objects.get(run_id=round_.run_id, number=round_.number - 1)
    global_state = tensors.decode_state_dict(store.get_buffer(reference.blob_key))
    privacy = spec.get("privacy") or {}
    secure_mean, dp = None, None
    if secagg_rounds.is_secure(spec):  # from the unmasked sum: no individual update exists
        # (client-level DP: the sites added the noise before masking, so it is the DP mean)
        secure_mean, dp = secagg_rounds.mean_state(round_, global_state, updates)
    strategy = aggregation.make_strategy(
        server_strategy_spec(spec.get("aggregation") or {}),
        spill_dir=Path(settings.QUORUM_BLOB_DIR) / "spill",
    )
    if round_.number > 1:
        try:
            previous = store.get(strategy_key(run_id=round_.run_id, number=round_.number - 1))
        except OSError:
            previous = None
        if previous is not None:
            strategy.load_state_dict(tensors.decode_state_dict(previous))
    if secure_mean is not None:  # the strategy sees the mean as one update (server optimisers)
        streamed: Iterator[aggregation.ClientUpdate] = iter(
            [aggregation.ClientUpdate(state=secure_mean, weight=1.0, client_id="secure_sum")]
        )
        result = strategy.aggregate(global_state, streamed, round=round_.number)
    elif privacy.get("mode", "none") == "client":  # the DP mean feeds the plan's strategy
        result, dp = _client_dp_mean(round_, spec, updates, global_state, strategy)
    else:
        weights = {u["silo_id"]: float(u["num_examples"]) for u in updates}
        fairfed = None
        if mitigation_service.plan_kind(spec) == mitigation_service.FAIR_AGGREGATION:
            weights, fairfed = mitigation_service.fairfed_weights(round_, spec, updates)
        streamed = (
            aggregation.ClientUpdate(
                state=tensors.decode_state_dict(store.get_buffer(u["blob_key"])),
                weight=weights[u["silo_id"]],
                client_id=u["silo_id"],
                loss=u["metrics"].get("global_train_loss"),
            )
            for u in updates
            # FairFed may drive a silo's weight to 0 (fairfed_step's safeguard): it adds nothing
            if weights[u["silo_id"]] > 0.0
        )
        result = strategy.aggregate(global_state, streamed, round=round_.number)
        if fairfed is not None:  # carried to the next round (aggregation_stats["fairfed"])
            result = replace(result, stats={**result.stats, "fairfed": fairfed})
    optimizer_state = strategy.state_dict()
    if optimizer_state:
        store.put(
            strategy_key(run_id=round_.run_id, number=round_.number),
            tensors.encode_state_dict(optimizer_state),
        )
    return result.state, dp, None if dp is not None else result


def _client_dp_mean(
    round_: Round,
    spec: dict[str, Any],
    updates: list[dict[str, Any]],
    global_state: dict[str, Any],
    strategy: aggregation.Strategy,
) -> tuple[AggregateResult, dict[str, Any]]:
    """DP-FedAvg's noised mean over the round's updates, fed to the plan's strategy.

    Adaptive clipping (Andrew et al. 2021): the clip of round k was set by round k-1 (the plan's
    ``clip`` in round 1); each silo's report ``1[norm <= C]`` is summed with Gaussian noise and
    moves the clip geometrically toward the plan's target quantile. The round is accounted as
    one Gaussian mechanism with the plan's z; the update itself gets ``z_delta`` (their
    Theorem 1), so adaptivity costs no extra epsilon.
    """
    store = blob_store()
    privacy = spec["privacy"]
    z = ledger.client_noise_multiplier(spec)
    expected = round_.selected.count()
    adaptive_spec = privacy.get("adaptive_clip")
    clip = float(privacy.get("clip", dp_accounting.PLAN_PRIVACY_DEFAULTS["clip"]))
    adaptive = None
    if adaptive_spec:
        previous = (
            Round.objects.filter(
                run_id=round_.run_id, number=round_.number - 1, status=Round.Status.COMPLETED
            )
            .values_list("aggregation_stats", flat=True)
            .first()
        )
        clip = float((previous or {}).get("next_clip", clip))
        adaptive = client_dp.AdaptiveClip(
            initial_clip=clip,
            noise_std_for_count=adaptive_count_noise(adaptive_spec, expected=expected, z=z),
            target_quantile=float(adaptive_spec.get("target_quantile", 0.5)),
            learning_rate=float(adaptive_spec.get("learning_rate", 0.2)),
        )
    wrapped = ClientDPStrategy(strategy, clip=clip, noise_multiplier=z, adaptive=adaptive)
    states = (tensors.decode_state_dict(store.get_buffer(u["blob_key"])) for u in updates)
    done = wrapped.aggregate(
        global_state, states, round=round_.number, num_clients_expected=expected
    )
    info = {**done.info, "delta": float(privacy.get("delta", 1e-5))}
    return done.result, info


def adaptive_count_noise(adaptive_spec: dict[str, Any], *, expected: int, z: float) -> float:
    """sigma_b of the noisy clip count: the plan's, else max(m/20 (the paper's), 2z)."""
    given = adaptive_spec.get("count_noise_std")
    return float(given) if given is not None else max(expected / 20.0, 2.0 * z)


def _json_safe(value: Any) -> Any:
    """Plain JSON of strategy flags and stats: numpy/tensor scalars to numbers, NaN/Inf to null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | str | int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def _fail_round_aggregation(round_: Round, error: str) -> None:
    secagg_rounds.forget(round_.pk)
    with transaction.atomic():
        locked = Round.objects.select_for_update().get(pk=round_.pk)
        if locked.status != Round.Status.AGGREGATING:
            return
        locked.status = Round.Status.FAILED
        locked.error = error
        locked.finished_at = timezone.now()
        locked.save(update_fields=["status", "error", "finished_at"])
        run = Run.objects.select_for_update().get(pk=round_.run_id)
        _fail_run(run, f"round {locked.number}: {error}")


def _weighted_mean(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    if total <= 0:
        return None
    return sum(v * w for v, w in values) / total


# Counts the silos report next to their metrics: a weight, never averaged into a "metric" (an
# example-weighted mean of the evaluation sizes was once reported as global/n = 5042.19).
COUNT_METRICS = frozenset({"n"})


def _record_round_metrics(round_: Round, updates: list[dict[str, Any]]) -> None:
    """Per-round summary: means of what the silos reported, weighted by the rows each metric
    was computed on -- a scope's held-out rows (its ``n``) for evaluation metrics, the
    training rows otherwise; a multi-class or regression round's "global" figures pooled
    exactly from the silos' parts (:func:`_pooled_global`). A mean of per-silo AUCs is not the AUC on the pooled rows: the
    run's final figures come from the final evaluation (federation.services.evaluation)."""
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for u in updates:
        flat = validate_metrics(u["metrics"])  # checked at receipt
        sizes = {scope: value for scope, name, value in flat if name in COUNT_METRICS}
        for scope, name, value in flat:
            if name in COUNT_METRICS or value != value:  # NaN: e.g. AUC of a one-class split
                continue
            weight = sizes.get(scope, float(u["num_examples"]))
            buckets.setdefault((scope, name), []).append((value, weight))
    summary = {
        key: mean
        for key, values in sorted(buckets.items())
        if (mean := _weighted_mean(values)) is not None
    }
    summary.update(_pooled_global(round_, updates))
    RoundMetric.objects.filter(round=round_, silo__isnull=True).delete()
    RoundMetric.objects.bulk_create(
        RoundMetric(round=round_, silo=None, scope=scope, name=name, value=value)
        for (scope, name), value in sorted(summary.items())
    )


# The figures of a multi-class or regression round summary pooled exactly from the silos' parts.
POOLED_FIGURES = {
    "multiclass": (
        "accuracy",
        "macro_f1",
        "weighted_f1",
        "auc_ovr",
        "auc_error_bound",
        "loss",
        "n",
    ),
    "regression": ("rmse", "mae", "r2", "mean_error", "loss", "n"),
}


def _pooled_global(round_: Round, updates: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """A multi-class or regression round's "global" figures (the received model v(k-1) on the
    held-out rows) from the silos' parts added up: exact on the union of their held-out rows,
    not a mean of site figures. Empty unless every update carries a part (fedcore.task_metrics)
    or, in a secure round, the contributors' parts were summed under the masks."""
    parts = [u.get("task_part") for u in updates]
    merged = secagg_rounds.merged_task_part(round_.pk)
    if merged is not None:  # a secure round: one merged part, no update carries its own
        parts = [merged]
    if not parts or any(part is None for part in parts):
        return {}
    if "confusion" in parts[0]:
        if len({part.get("bins") for part in parts}) > 1:  # agents of two versions: no AUC
            parts = [{**part, "bins": None, "histograms": None} for part in parts]
        task, report = (
            "multiclass",
            task_metrics.multiclass_report(task_metrics.merge_multiclass(parts)),
        )
    else:
        task, report = (
            "regression",
            task_metrics.regression_report(task_metrics.merge_regression(parts)),
        )
    return {
        ("global", name): float(report[name])
        for name in POOLED_FIGURES[task]
        if report.get(name) is not None
    }


def _signature_json(state: dict[str, Any]) -> dict[str, list[Any]]:
    return {name: [dtype, list(shape)] for name, (dtype, shape) in tensors.signature(state).items()}


def _store_model_version(
    run: Run, *, number: int, state: dict[str, Any], round_: Round | None
) -> None:
    data = tensors.encode_state_dict(state)
    key = model_key(run_id=run.pk, number=number)
    blob_store().put(key, data)
    ModelVersion.objects.update_or_create(
        run=run,
        number=number,
        defaults={
            "round": round_,
            "checksum": tensors.sha256_hex(data),
            "size_bytes": len(data),
            "blob_key": key,
            "signature": _signature_json(state),
        },
    )


# The final model's pooled figures the run.finished audit event keeps, per task.
FINAL_FIGURES = {
    "binary": ("auc", "auc_error_bound", "accuracy", "n"),
    "multiclass": ("accuracy", "macro_f1", "weighted_f1", "n"),
    "regression": ("rmse", "mae", "r2", "n"),
}


def _complete_run(run: Run) -> None:
    run.status = Run.Status.COMPLETED
    run.finished_at = timezone.now()
    run.save(update_fields=["status", "finished_at", "evaluation"])
    final = (run.evaluation or {}).get("metrics") or {}
    _audit_run(
        run,
        "run.finished",
        status=run.status,
        **(
            {
                "final_model": {
                    k: final.get(k) for k in FINAL_FIGURES[run.evaluation.get("task", "binary")]
                }
            }
            if final
            else {}
        ),
    )
    TrainingPlan.objects.filter(pk=run.plan_id).update(status=TrainingPlan.Status.COMPLETED)
    _notify_finished(run)
    log.info("run %s completed", run.pk)


def _fail_run(run: Run, error: str) -> None:
    run.status = Run.Status.FAILED
    run.error = error
    run.finished_at = timezone.now()
    run.save(update_fields=["status", "error", "finished_at"])
    TrainingPlan.objects.filter(pk=run.plan_id).update(status=TrainingPlan.Status.FAILED)
    _audit_run(run, "run.finished", status=run.status, error=error)
    _notify_finished(run)
    log.error("run %s failed: %s", run.pk, error)


def _notify_finished(run: Run) -> None:
    for silo_id in run.version.silos.values_list("pk", flat=True):
        dispatch.send_to_silo(
            silo_id, {"type": "run.finished", "run_id": run.pk, "status": run.status}
        )
    _publish(run, "run.finished", status=run.status)


def _audit_run(run: Run, action: str, **data: Any) -> None:
    """Append an audit event about a run, in the caller's transaction."""
    audit_append(
        actor="system",
        action=action,
        consortium_id=run.plan.consortium_id,
        object_type="run",
        object_id=run.pk,
        data=data,
    )


def _publish(run: Run, kind: str, **fields: Any) -> None:
    dispatch.publish_live({"type": "live.event", "event": kind, "run": run.pk, **fields})
