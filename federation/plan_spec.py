"""Reading the settings the orchestrator needs out of a plan spec, with their defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunSettings:
    """Orchestration settings of a plan."""

    rounds: int
    min_silos: int
    round_deadline_seconds: float
    round_retries: int
    wait_for_silos_seconds: float
    seed: int


def run_settings(spec: dict[str, Any]) -> RunSettings:
    """Extract orchestration settings from a validated plan spec."""
    training = spec.get("training", {})
    deadline = float(spec.get("round_deadline_seconds", 300))
    return RunSettings(
        rounds=int(training.get("rounds", 1)),
        min_silos=int(spec.get("min_silos", 1)),
        round_deadline_seconds=deadline,
        round_retries=int(spec.get("round_retries", 2)),
        wait_for_silos_seconds=float(spec.get("wait_for_silos_seconds", max(deadline, 120.0))),
        seed=int(spec.get("seed", 0)),
    )
