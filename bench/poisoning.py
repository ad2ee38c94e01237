"""Poisoning experiment: 2 of 10 silos send malicious updates; robust strategies against FedAvg.

In process, no server and no agents, round for round as ``bench/fedavg_sim.py`` simulates them,
but with any ``fedcore.aggregation`` strategy and with attackers.

Data and split. The scenario (default: healthcare, the UCI thyroid data) is prepared as the demo
prepares it (``federation.demo.baselines.prepare``: each referral source's rows are validated
and split 80/20 with the plan's evaluation seed; the preprocessing is merged from the sources'
train statistics). The train rows of all sources are then pooled, shuffled with
``numpy.random.default_rng(seed)`` and dealt into ``--silos`` (10) silos of near-equal size with
``numpy.array_split``: IID silos (thyroid: 733-734 rows each, 26% positive). The test set is the
union of the sources' held-out splits (thyroid: 1835 rows). The IID split is the setting of
Blanchard et al. (2017) and Yin et al. (2018); with non-IID silos the robust rules also cost
accuracy in a clean run.

Training. The plan's model and optimiser (thyroid: MLP 32-16 ReLU, Adam lr 0.01, batch 64);
rounds and local epochs from the flags (default 10 and 1). Round r = 1..rounds: every silo loads
the global weights into a fresh model, runs ``train_local`` with ``seed = plan_seed * 1000 + r``
and reports its train row count as the weight. With FedAvg and no attack this is
``bench/fedavg_sim.py``'s simulation bit for bit (tests/unit/test_strategies.py checks it).

Attack. Silos 0 and 1 (``--attackers``) train honestly, then send
``global + scale * (trained - global)`` for every floating tensor: ``scaled`` is scale -10 (a
boosted reversed update), ``sign-flip`` is scale -1.

Output: test accuracy (threshold 0.5) and AUC of the final global model, the change in accuracy
points against clean FedAvg with the same seed, and how many attacker and honest updates the
anomaly flags marked over all rounds::

    python bench/poisoning.py
    python bench/poisoning.py --rounds 20 --local-epochs 2 --seed 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedcore import tabular, training  # noqa: E402
from fedcore.aggregation import ClientUpdate, make_strategy  # noqa: E402
from fedcore.models import build_model  # noqa: E402
from federation.demo import baselines  # noqa: E402
from federation.demo.scenarios import SCENARIOS  # noqa: E402

ATTACKS: dict[str, float | None] = {"none": None, "scaled": -10.0, "sign-flip": -1.0}
STRATEGY_SPECS: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "median": {"strategy": "median"},
    "trimmed_mean": {"strategy": "trimmed_mean", "beta": 0.2},
    "krum": {"strategy": "krum", "f": 2},
    "multi_krum": {"strategy": "multi_krum", "f": 2},
}
ROBUST = ("median", "trimmed_mean", "krum")


@dataclass
class Outcome:
    """One simulated run: final test scores and what the anomaly flags caught."""

    strategy: str
    attack: str
    seed: int
    accuracy: float
    auc: float
    flagged_attackers: int
    flagged_honest: int
    attacker_updates: int
    seconds: float


def iid_silos(prepared: baselines.Prepared, silos: int, seed: int) -> baselines.Prepared:
    """Pool the prepared train rows, shuffle them with ``seed`` and deal them into ``silos``."""
    X, y = prepared.pooled_train()
    order = np.random.default_rng(seed).permutation(len(y))
    train = {
        f"silo{k}": tabular.TabularData(X=X[rows], y=y[rows], groups={})
        for k, rows in enumerate(np.array_split(order, silos))
    }
    return baselines.Prepared(fitted=prepared.fitted, train=train, test=prepared.test)


def poison(
    global_state: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """Return ``global + scale * (trained - global)`` for floating tensors; others as trained."""
    return {
        name: global_state[name] + scale * (tensor - global_state[name])
        if tensor.is_floating_point()
        else tensor
        for name, tensor in trained.items()
    }


def simulate(
    plan: Mapping[str, Any],
    prepared: baselines.Prepared,
    spec: Mapping[str, Any],
    *,
    scale: float | None,
    attackers: Sequence[int] = (0, 1),
) -> tuple[dict[str, torch.Tensor], list[list[dict[str, Any]]]]:
    """Run the federation with ``spec``; return the final state and each round's flags."""
    settings = plan["training"]
    seed = int(plan.get("seed", 0))
    d = prepared.n_features
    strategy = make_strategy(spec)
    state = build_model(plan["model"], d, seed=seed).state_dict()
    flags_per_round = []
    for rnd in range(1, int(settings["rounds"]) + 1):
        updates = []
        for k, data in enumerate(prepared.train.values()):
            model = baselines.load_state(plan, state, d)
            training.train_local(
                model,
                data.X,
                data.y,
                epochs=int(settings["local_epochs"]),
                batch_size=int(settings["batch_size"]),
                lr=float(settings["lr"]),
                optimizer=settings.get("optimizer", "adam"),
                momentum=float(settings.get("momentum", 0.0)),
                weight_decay=float(settings.get("weight_decay", 0.0)),
                seed=seed * 1000 + rnd,
            )
            sent = model.state_dict()
            if scale is not None and k in attackers:
                sent = poison(state, sent, scale)
            updates.append(ClientUpdate(sent, float(data.X.shape[0]), client_id=k))
        result = strategy.aggregate(state, updates, round=rnd)
        state = result.state
        flags_per_round.append(result.flags)
    return state, flags_per_round


def run(
    *,
    scenario: str = "healthcare",
    seed: int = 0,
    silos: int = 10,
    attackers: Sequence[int] = (0, 1),
    rounds: int = 10,
    local_epochs: int = 1,
    strategies: Sequence[str] = tuple(STRATEGY_SPECS),
    attacks: Sequence[str] = tuple(ATTACKS),
) -> list[Outcome]:
    """Simulate every (strategy, attack) pair on one seed's data; return the outcomes."""
    base = SCENARIOS[scenario](seed)
    plan = dict(base.plan)
    plan["training"] = {**plan["training"], "rounds": rounds, "local_epochs": local_epochs}
    prepared = iid_silos(baselines.prepare(base), silos, seed)
    outcomes = []
    for name in strategies:
        for attack in attacks:
            scale = ATTACKS[attack]
            start = time.perf_counter()
            state, flags = simulate(
                plan, prepared, STRATEGY_SPECS[name], scale=scale, attackers=attackers
            )
            seconds = time.perf_counter() - start
            model = baselines.load_state(plan, state, prepared.n_features)
            metrics = training.evaluate(model, prepared.test.X, prepared.test.y)
            flagged = [flag["client"] for round_flags in flags for flag in round_flags]
            bad = set(attackers) if scale is not None else set()
            outcomes.append(
                Outcome(
                    strategy=name,
                    attack=attack,
                    seed=seed,
                    accuracy=float(metrics["accuracy"]),
                    auc=float(metrics["auc"]),
                    flagged_attackers=sum(1 for c in flagged if c in bad),
                    flagged_honest=sum(1 for c in flagged if c not in bad),
                    attacker_updates=len(bad) * rounds,
                    seconds=seconds,
                )
            )
    return outcomes


def clean_accuracy(outcomes: Sequence[Outcome], seed: int) -> float:
    """Accuracy of clean FedAvg for ``seed``, the reference of the table."""
    return next(
        o.accuracy
        for o in outcomes
        if o.strategy == "fedavg" and o.attack == "none" and o.seed == seed
    )


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the grid and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="healthcare", choices=sorted(SCENARIOS))
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--silos", type=int, default=10)
    parser.add_argument("--attackers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_SPECS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.strategies) - set(STRATEGY_SPECS))
    if unknown:
        parser.error(f"unknown strategies {unknown}; allowed: {', '.join(STRATEGY_SPECS)}")
    if "fedavg" not in args.strategies:
        args.strategies.insert(0, "fedavg")  # the reference
    torch.set_num_threads(args.threads)

    print(
        f"{args.scenario}: {args.silos} IID silos, attackers {args.attackers}, "
        f"{args.rounds} rounds x {args.local_epochs} local epochs; "
        f"accuracy points against clean FedAvg"
    )
    header = (
        f"{'strategy':<13} {'attack':<10} {'seed':>4} {'accuracy':>8} {'Δ pts':>6} {'AUC':>6} "
        f"{'flagged attackers':>17} {'flagged honest':>14} {'s':>5}"
    )
    print(header)
    print("-" * len(header))
    all_outcomes: list[Outcome] = []
    for seed in args.seed:
        outcomes = run(
            scenario=args.scenario,
            seed=seed,
            silos=args.silos,
            attackers=args.attackers,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            strategies=args.strategies,
        )
        clean = clean_accuracy(outcomes, seed)
        for o in outcomes:
            caught = f"{o.flagged_attackers}/{o.attacker_updates}" if o.attacker_updates else "-"
            print(
                f"{o.strategy:<13} {o.attack:<10} {o.seed:>4} {o.accuracy:>8.4f} "
                f"{100 * (o.accuracy - clean):>+6.2f} {o.auc:>6.4f} {caught:>17} "
                f"{o.flagged_honest:>14} {o.seconds:>5.1f}",
                flush=True,
            )
        all_outcomes += outcomes
    ok = all(
        clean_accuracy(all_outcomes, o.seed) - o.accuracy <= 0.02
        for o in all_outcomes
        if o.strategy in ROBUST and o.strategy in args.strategies
    )
    degraded = all(
        clean_accuracy(all_outcomes, o.seed) - o.accuracy > 0.02
        for o in all_outcomes
        if o.strategy == "fedavg" and o.attack == "scaled"
    )
    print(
        f"robust rules ({', '.join(s for s in ROBUST if s in args.strategies)}) within 2 points "
        f"of clean FedAvg under every attack: {'yes' if ok else 'NO'}; FedAvg degraded by more "
        f"than 2 points under the scaled attack: {'yes' if degraded else 'NO'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
