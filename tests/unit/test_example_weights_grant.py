"""A task's example weights (a weighted bias mitigation) are covered by its signed grant:
weights added, removed or changed in transit are refused before any local data is read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fedcore import signing

PREPROCESSING = {"numeric": {"x1": {"mean": 0.0, "std": 1.0}}}
WEIGHTS = {"f": {"0": [0, 1.25], "1": [1, 0.8]}, "m": {"0": [0, 0.7], "1": [1, 1.3]}}


def task_grant(weights: dict[str, Any] | None) -> dict[str, Any]:
    return signing.request_scope(
        kind=signing.TASK_KIND,
        rounds=3,
        round=2,
        attempt=1,
        weights_sha256="a" * 64,
        preprocessing=PREPROCESSING,
        expires_at=datetime.now(UTC) + timedelta(minutes=5),
        example_weights=weights,
    )


def check(grant: dict[str, Any], weights: Any) -> None:
    signing.check_request_scope(
        grant,
        kind=signing.TASK_KIND,
        plan_rounds=3,
        round=2,
        rounds=3,
        weights_sha256="a" * 64,
        preprocessing=PREPROCESSING,
        example_weights=weights,
    )


def test_the_grant_binds_the_weights_it_was_signed_for() -> None:
    grant = task_grant(WEIGHTS)
    assert grant["example_weights_sha256"] == signing.sha256_canonical(WEIGHTS)
    check(grant, {k: WEIGHTS[k] for k in reversed(WEIGHTS)})  # key order does not matter
    changed = {**WEIGHTS, "m": {"0": [0, 0.7], "1": [1, 9.0]}}
    with pytest.raises(signing.AuthorizationError, match="example weights hash to"):
        check(grant, changed)
    with pytest.raises(signing.AuthorizationError, match="added, removed or changed"):
        check(grant, None)


def test_a_grant_without_weights_refuses_a_task_that_carries_some() -> None:
    grant = task_grant(None)
    assert "example_weights_sha256" not in grant
    check(grant, None)
    with pytest.raises(signing.AuthorizationError, match="added, removed or changed"):
        check(grant, WEIGHTS)
