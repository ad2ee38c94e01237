"""In-process FedAvg of the multi-class and regression demo scenarios (cardiology, progression)
against their centralised and local-only baselines, for choosing their plans and checking the
bars of docs/tasks.md. Same simulation as bench/fedavg_sim.py (``simulate``), the task's figures:

    python bench/task_sim.py --scenario cardiology progression --seed 0 1 2
    python bench/task_sim.py --scenario progression --rounds 40 --lr 0.02 --hidden lr 16

Bars: cardiology federated accuracy and macro F1 within 0.03 of the centralised model's (at
most 0.03 below it) and above the mean local-only; progression federated RMSE <= 1.05x the
centralised one, R2 at most 0.03 below it, RMSE below and R2 above the mean local-only.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fedavg_sim import _label, _model_spec, simulate  # noqa: E402
from federation.demo import baselines  # noqa: E402
from federation.demo.scenarios import SCENARIOS  # noqa: E402


def bars(task: str, result: dict[str, Any]) -> tuple[bool, str]:
    """Whether the comparison meets the task's bars, and the numbers that decide it."""
    fed, central = result["federated"], result["centralized"]
    local = list(result["local_only"].values())
    if task == "multiclass":
        mean = {k: statistics.fmean(v[k] for v in local) for k in ("accuracy", "macro_f1")}
        # "within 0.03": at most 0.03 below the centralised model (a better one is no miss)
        ok = all(fed[k] >= central[k] - 0.03 and fed[k] > mean[k] for k in mean)
        text = " ".join(
            f"{k} fed {fed[k]:.4f} central {central[k]:.4f} local-mean {mean[k]:.4f}" for k in mean
        )
        return ok, text
    mean = {k: statistics.fmean(v[k] for v in local) for k in ("rmse", "mae", "r2")}
    ok = (
        fed["rmse"] <= 1.05 * central["rmse"]
        and fed["r2"] >= central["r2"] - 0.03
        and fed["rmse"] < mean["rmse"]
        and fed["r2"] > mean["r2"]
    )
    text = " ".join(
        f"{k} fed {fed[k]:.3f} central {central[k]:.3f} local-mean {mean[k]:.3f}" for k in mean
    )
    return ok, text


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every combination and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", nargs="+", default=["cardiology", "progression"])
    parser.add_argument("--rounds", type=int, nargs="+", default=[None])
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--hidden", nargs="+", default=[None], help="e.g. 32,16 or lr")
    parser.add_argument("--lr", type=float, nargs="+", default=[None])
    parser.add_argument("--local-epochs", type=int, nargs="+", default=[None])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[None])
    parser.add_argument("--optimizer", nargs="+", default=[None], choices=["adam", "sgd"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.scenario:
        prepared_by_seed: dict[int, Any] = {}
        grid = itertools.product(
            args.hidden, args.lr, args.local_epochs, args.batch_size, args.rounds, args.optimizer
        )
        for hidden, lr, epochs, batch, rounds, optimizer in grid:
            passed = 0
            for seed in args.seed:
                if seed not in prepared_by_seed:
                    scenario = SCENARIOS[name](seed)
                    prepared_by_seed[seed] = (scenario.plan, baselines.prepare(scenario))
                base, prepared = prepared_by_seed[seed]
                plan = copy.deepcopy(base)
                if hidden is not None:
                    plan["model"] = _model_spec(hidden, "relu", 0.0)
                for key, value in (
                    ("lr", lr),
                    ("local_epochs", epochs),
                    ("batch_size", batch),
                    ("rounds", rounds),
                    ("optimizer", optimizer),
                ):
                    if value is not None:
                        plan["training"][key] = value
                state, _, _ = simulate(plan, prepared)
                result = baselines.compare(plan, prepared, state, seed=seed)
                ok, text = bars(result["task"], result)
                passed += ok
                print(
                    f"{name:<11} {_label(plan)} r={plan['training']['rounds']} seed {seed}: "
                    f"{'PASS' if ok else 'fail'} {text}",
                    flush=True,
                )
            print(f"{name:<11} {passed}/{len(args.seed)} seeds meet the bars", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
