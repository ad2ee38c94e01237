"""The round state machine, driven through the same services the agent websocket calls."""

from __future__ import annotations

import secrets
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import torch
from django.utils import timezone

from fedcore import tabular, tensors
from fedcore.models import build_model
from federation import orchestrator
from federation.models import ModelVersion, Round, Run, Silo
from federation.services import rounds as round_services
from federation.services.updates import Refused, stats_receive, update_receive
from federation.storage import blob_store
from tests.factories import (
    SCHEMA,
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    end_final_evaluation,
    plan_spec,
    start_run,
)

pytestmark = pytest.mark.django_db


def online(silos: list[Silo]) -> None:
    for s in silos:
        s.connection_id = f"conn-{s.pk}"
        s.last_heartbeat = timezone.now()
        s.save()


def make_plan(n_silos: int = 3, **spec: object) -> tuple[list[Silo], Run]:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(n_silos, organization__consortium=consortium)
    plan = PlanFactory(consortium=consortium, spec=plan_spec(**spec), silos=silos)
    online(silos)
    return silos, start_run(plan)


def site_frame(seed: int, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    return pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": y}).astype(str)


def send_stats(run: Run, silos: list[Silo]) -> None:
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    for i, silo in enumerate(silos):
        valid = tabular.validate_frame(site_frame(i), schema)
        stats_receive(silo_id=silo.pk, run_id=run.pk, stats=tabular.local_statistics(valid, schema))


def submit(run: Run, silo: Silo, round_number: int, state: dict[str, torch.Tensor], n: int) -> None:
    update_receive(
        silo_id=silo.pk,
        fields={
            "run": run.pk,
            "round": round_number,
            "nonce": secrets.token_hex(16),
            "num_examples": n,
            "metrics": {"train_loss": 0.3, "local": {"auc": 0.9}},
        },
        payload=tensors.encode_state_dict(state),
    )


def current_round(run: Run) -> Round:
    return run.round_set.order_by("-number", "-attempt").first()


def test_run_goes_from_statistics_to_rounds_to_completion() -> None:
    silos, run = make_plan(3, min_silos=2)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.STATS
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    assert run.preprocessing is not None
    round1 = current_round(run)
    assert round1.number == 1 and set(round1.selected.all()) == set(silos)

    for rnd in (1, 2):
        weights = [10, 20, 30]
        states = [
            build_model({"kind": "logistic_regression"}, 3, seed=100 * rnd + i).state_dict()
            for i in range(3)
        ]
        for silo, state, n in zip(silos, states, weights, strict=True):
            submit(run, silo, rnd, state, n)
        orchestrator.run_advance(run.pk)
        version = ModelVersion.objects.get(run=run, number=rnd)
        got = tensors.decode_state_dict(blob_store().get(version.blob_key))
        for name in got:
            expected = sum(s[name] * w for s, w in zip(states, weights, strict=True)) / sum(weights)
            torch.testing.assert_close(got[name], expected)
    run.refresh_from_db()
    assert run.status == Run.Status.EVALUATING  # the final model, at every site
    run = end_final_evaluation(run)  # no agent here to answer: the deadline ends it
    assert run.status == Run.Status.COMPLETED
    assert run.evaluation["metrics"] is None and len(run.evaluation["missing"]) == 3
    run.plan.refresh_from_db()
    assert run.plan.status == "completed"


def test_deadline_aggregates_with_those_in_when_minimum_holds() -> None:
    silos, run = make_plan(3, min_silos=2)
    orchestrator.run_advance(run.pk)
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    state = build_model({"kind": "logistic_regression"}, 3, seed=5).state_dict()
    submit(run, silos[0], 1, state, 10)
    submit(run, silos[1], 1, state, 10)
    orchestrator.run_advance(run.pk)
    assert current_round(run).status == Round.Status.COLLECTING  # still waiting for the third
    Round.objects.filter(run=run).update(deadline=timezone.now() - timedelta(seconds=1))
    orchestrator.run_advance(run.pk)
    assert Round.objects.get(run=run, number=1).status == Round.Status.COMPLETED
    assert current_round(run).number == 2


def test_too_few_updates_fail_the_round_then_retry_then_fail_the_run() -> None:
    silos, run = make_plan(3, min_silos=2, round_retries=1)
    orchestrator.run_advance(run.pk)
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    state = build_model({"kind": "logistic_regression"}, 3, seed=5).state_dict()
    submit(run, silos[0], 1, state, 10)
    Round.objects.filter(run=run).update(deadline=timezone.now() - timedelta(seconds=1))
    orchestrator.run_advance(run.pk)
    first, retry = Round.objects.filter(run=run).order_by("attempt")
    assert first.status == Round.Status.FAILED and "1 of 3" in first.error
    assert retry.attempt == 2 and retry.status == Round.Status.COLLECTING
    # An update for the failed attempt's round number goes to the retry, not the failed attempt.
    Round.objects.filter(pk=retry.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "round 1 failed 2 times" in run.error


def test_run_waits_for_silos_then_fails_when_they_never_come() -> None:
    silos, run = make_plan(2, min_silos=2, wait_for_silos_seconds=5)
    Silo.objects.filter(pk=silos[1].pk).update(connection_id=None)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.PENDING and run.waiting_since is not None
    Run.objects.filter(pk=run.pk).update(waiting_since=timezone.now() - timedelta(seconds=10))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "only 1 of the minimum 2" in run.error


def test_aggregation_is_idempotent_and_counts_each_update_once() -> None:
    silos, run = make_plan(2, min_silos=2)
    orchestrator.run_advance(run.pk)
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    a = build_model({"kind": "logistic_regression"}, 3, seed=1).state_dict()
    b = build_model({"kind": "logistic_regression"}, 3, seed=2).state_dict()
    submit(run, silos[0], 1, a, 1)
    submit(run, silos[1], 1, b, 3)
    orchestrator.run_advance(run.pk)
    round1 = Round.objects.get(run=run, number=1)
    first = ModelVersion.objects.get(run=run, number=1).checksum
    # A worker that died after aggregating is replayed: the state is reset and aggregation rerun.
    Round.objects.filter(pk=round1.pk).update(status=Round.Status.AGGREGATING)
    round_services.round_aggregate(round1.pk)
    assert ModelVersion.objects.get(run=run, number=1).checksum == first
    assert ModelVersion.objects.filter(run=run, number=1).count() == 1
    with pytest.raises(Refused) as refused:
        submit(run, silos[0], 1, a, 1)
    assert refused.value.code == "wrong_round"


def test_an_aggregation_a_gone_process_began_is_rerun_at_once_by_the_sole_orchestrator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server killed after marking round 1 aggregating, before the model was stored: its
    restart (the embedded profile's one orchestrating process, attached after the mark) reruns
    the aggregation at its first pass instead of waiting QUORUM_AGGREGATION_STALE_SECONDS
    (120 s: the e2e SIGTERM test saw the run stall that long). Without that knowledge (several
    Celery workers), an aggregation that young is left to the process running it."""
    from federation import dispatch

    silos, run = make_plan(2, min_silos=2)
    orchestrator.run_advance(run.pk)
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    submit(
        run, silos[0], 1, build_model({"kind": "logistic_regression"}, 3, seed=1).state_dict(), 1
    )
    submit(
        run, silos[1], 1, build_model({"kind": "logistic_regression"}, 3, seed=2).state_dict(), 3
    )
    marked = timezone.now() - timedelta(seconds=5)
    Round.objects.filter(run=run, number=1).update(
        status=Round.Status.AGGREGATING, aggregation_started_at=marked
    )

    monkeypatch.setattr(dispatch, "sole_orchestrator_since", lambda: None)
    orchestrator.run_advance(run.pk)
    assert current_round(run).status == Round.Status.AGGREGATING
    assert not ModelVersion.objects.filter(run=run, number=1).exists()

    monkeypatch.setattr(dispatch, "sole_orchestrator_since", lambda: marked - timedelta(seconds=1))
    orchestrator.run_advance(run.pk)  # attached before the mark: that process may still run it
    assert not ModelVersion.objects.filter(run=run, number=1).exists()

    monkeypatch.setattr(dispatch, "sole_orchestrator_since", lambda: marked + timedelta(seconds=1))
    orchestrator.run_advance(run.pk)
    assert ModelVersion.objects.filter(run=run, number=1).count() == 1
    assert Round.objects.get(run=run, number=1).status == Round.Status.COMPLETED


def test_statistics_from_a_silo_not_in_the_plan_are_refused() -> None:
    silos, run = make_plan(2)
    outsider = SiloFactory()
    orchestrator.run_advance(run.pk)
    with pytest.raises(Refused) as refused:
        stats_receive(silo_id=outsider.pk, run_id=run.pk, stats={})
    assert refused.value.code == "wrong_run"


def test_update_blobs_are_content_addressed_so_a_racing_update_cannot_overwrite_one() -> None:
    silos, run = make_plan(2, min_silos=2)
    orchestrator.run_advance(run.pk)
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    state = build_model({"kind": "logistic_regression"}, 3, seed=5).state_dict()
    submit(run, silos[0], 1, state, 10)

    update = current_round(run).updates.get(silo=silos[0])
    assert update.sha256[:32] in update.blob_key
    assert tensors.sha256_hex(blob_store().get(update.blob_key)) == update.sha256


def offline(silos: list[Silo]) -> None:
    Silo.objects.filter(pk__in=[s.pk for s in silos]).update(connection_id=None)


def test_a_round_that_failed_with_its_silos_away_is_retried_once_they_are_back() -> None:
    # Issue 12 part 6: the retry used to be tried once, at the failure, and never again, so the
    # run stayed "running" forever although every silo came back.
    silos, run = make_plan(2, min_silos=2)
    orchestrator.run_advance(run.pk)
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    assert current_round(run).number == 1
    offline(silos)
    Round.objects.filter(run=run).update(deadline=timezone.now() - timedelta(seconds=1))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    failed = current_round(run)
    assert (failed.attempt, failed.status) == (1, Round.Status.FAILED)
    assert run.status == Run.Status.RUNNING and run.waiting_since is not None
    online(silos)
    orchestrator.sweep()
    retry = current_round(run)
    assert (retry.number, retry.attempt, retry.status) == (1, 2, Round.Status.COLLECTING)
    assert set(retry.selected.all()) == set(silos)
    run.refresh_from_db()
    assert run.waiting_since is None
    state = build_model({"kind": "logistic_regression"}, 3, seed=5).state_dict()
    for silo in silos:
        submit(run, silo, 1, state, 10)
    orchestrator.sweep()
    assert Round.objects.get(run=run, number=1, attempt=2).status == Round.Status.COMPLETED


def test_a_failed_round_whose_silos_stay_away_fails_the_run_after_the_wait() -> None:
    silos, run = make_plan(2, min_silos=2, wait_for_silos_seconds=30)
    orchestrator.run_advance(run.pk)
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    offline(silos)
    Round.objects.filter(run=run).update(deadline=timezone.now() - timedelta(seconds=1))
    orchestrator.run_advance(run.pk)
    Run.objects.filter(pk=run.pk).update(waiting_since=timezone.now() - timedelta(seconds=31))
    orchestrator.sweep()
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert "round 1 could not start: only 0 of the minimum 2 silos" in run.error


def test_a_run_that_starts_waiting_tells_the_live_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    from federation import dispatch

    # What crosses the dispatch port to the live pages (a server loop would send it on).
    published: list[dict[str, object]] = []
    monkeypatch.setattr(dispatch, "publish_live", published.append)
    silos, run = make_plan(2, min_silos=2, wait_for_silos_seconds=5)
    Silo.objects.filter(pk=silos[1].pk).update(connection_id=None)
    orchestrator.run_advance(run.pk)
    # the monitor re-fetches on any event naming its run: the waiting notice shows at once
    assert {
        "type": "live.event",
        "event": "run.waiting",
        "run": run.pk,
        "online": 1,
        "needed": 2,
    } in (published)


def test_only_the_attached_embedded_backend_says_since_when_it_orchestrates_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from federation import dispatch

    backend = dispatch.EmbeddedBackend()
    monkeypatch.setattr(dispatch, "backend", lambda: backend)
    assert dispatch.sole_orchestrator_since() is None  # no server loop in this process
    loop = asyncio.new_event_loop()
    try:
        before = timezone.now()
        backend.attach(loop)
        assert before <= dispatch.sole_orchestrator_since() <= timezone.now()
        backend.detach()
        assert dispatch.sole_orchestrator_since() is None
    finally:
        loop.run_until_complete(asyncio.sleep(0))  # let the cancelled sweeper finish
        loop.close()
    monkeypatch.setattr(dispatch, "backend", lambda: dispatch.CeleryBackend())
    assert dispatch.sole_orchestrator_since() is None  # several workers: nobody knows
