"""The ``constraint`` mitigation in secure rounds: the server steps its multipliers from the
contributors' group counts summed under the masks (``SecAggAttempt.counts``), the only counts it
learns, and the next round's tasks carry the new example weights. The real orchestrator,
coordinator and consumer, and the agent's own secure-aggregation code
(tests/integration/test_secagg_rounds.py's harness); the plan noises the counts
(``fairness.dp_epsilon``), as the plan language requires for a weighted mitigation under secure
aggregation."""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async

from fedcore import fairness, fairness_mitigation
from federation.models import AuditEvent, Round, Run, Update
from federation.services.mitigation import reduction_round
from tests.factories import SCHEMA, plan_spec
from tests.integration.test_secagg_rounds import (  # noqa: F401 (the autouse fixture)
    Site,
    _orchestration_thread,
    make_sites,
    run_sites,
    secure_run,
    site_counts,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

ROUNDS = 2
TRAINING_COUNTS = {
    "F": {"negatives": 60, "positives": 20},
    "M": {"negatives": 40, "positives": 50},
    "__missing__": {"negatives": 0, "positives": 0},
    fairness.OTHER_GROUP: {"negatives": 3, "positives": 2},
}


class RecordingSite(Site):
    """A site that keeps the example weights each task carried."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weights: dict[int, Any] = {}

    async def on_task(self, task: Any) -> None:
        self.weights[task.fields["round"]] = task.fields.get("example_weights")
        await super().on_task(task)


def constraint_state() -> dict[str, Any]:
    """What ``federation.services.mitigation.compute`` stores before round 1."""
    weights = fairness_mitigation.reduction_weights({}, TRAINING_COUNTS, "demographic_parity")
    return {
        "kind": "constraint",
        "attribute": "sex",
        "counts": TRAINING_COUNTS,
        "constraint": "demographic_parity",
        "bound": 0.01,
        "eta": 2.0,
        "multipliers": "averaged",
        "theta": {},
        "lambdas": {},
        "rounds": 0,
        "max_violation": None,
        "met": None,
        "example_weights": weights.to_json(),
    }


async def test_secure_rounds_step_the_multipliers_from_the_masked_sum_of_the_counts() -> None:
    silos, plain = await database_sync_to_async(make_sites)(3)
    sites = [
        RecordingSite(s.silo, s.token, examples=s.examples, fairness=site_counts(seed=i))
        for i, s in enumerate(plain)
    ]
    for site in plain:  # replaced by the recording sites
        site.session.close()

    @database_sync_to_async
    def start() -> Run:
        run = secure_run(
            silos,
            min_silos=3,
            schema={**SCHEMA, "sensitive": ["sex"]},
            fairness={
                "sensitive_attribute": "sex",
                "groups": {"sex": ["F", "M"]},
                "dp_epsilon": 1.0,
                "mitigation": {"kind": "constraint"},
            },
            training={**plan_spec()["training"], "rounds": ROUNDS},
        )
        run.mitigation = constraint_state()
        run.save(update_fields=["mitigation"])
        return run

    run = await run_sites(await start(), sites)

    @database_sync_to_async
    def check() -> None:
        merged = fairness.merge_counts([site.fairness["sex"] for site in sites])
        replay = constraint_state()
        for number in range(1, ROUNDS + 1):
            # round k's tasks carry the weights of the multipliers after round k - 1
            assert all(site.weights[number] == replay["example_weights"] for site in sites)
            replay = reduction_round(replay, "sex", [{"sex": merged}])
            stats = Round.objects.get(run=run, number=number).aggregation_stats["reduction"]
            assert stats["theta"] == pytest.approx(replay["theta"])
        state = Run.objects.get(pk=run.pk).mitigation
        assert state["rounds"] == ROUNDS and state["theta"] == pytest.approx(replay["theta"])
        assert state["example_weights"] == replay["example_weights"]
        assert replay["theta"]  # the multipliers moved
        # The server never held a site's own table.
        assert all(not u.fairness for u in Update.objects.filter(round__run=run))
        assert (
            AuditEvent.objects.filter(action="mitigation.updated", object_id=str(run.pk)).count()
            == ROUNDS
        )

    await check()
