"""In-process FedAvg simulation of a demo scenario, for choosing plan hyperparameters.

It runs no server and no agents, but mimics what they do, step for step:

- each site validates its rows and splits them with the plan's ``evaluation`` settings;
- the preprocessing is merged from the sites' train statistics;
- the global model starts from ``build_model(model, d, seed=plan["seed"])`` (the orchestrator);
- round r = 1..rounds: every site loads the global weights into a fresh model (so the
  optimizer state is fresh), runs ``train_local`` for ``local_epochs`` with
  ``seed = plan["seed"] * 1000 + r`` and reports ``num_examples`` = its train rows; the server
  computes ``fedavg`` weighted by ``num_examples``.

It then compares the federated model with the centralised and local-only baselines of
``federation.demo.baselines`` (same budget and evaluation as the demo's), all measured on the
union of held-out splits.

Every hyperparameter flag takes several values; the simulation runs the cartesian product::

    python bench/fedavg_sim.py --scenario healthcare --seed 0 1 2
    python bench/fedavg_sim.py --scenario finance --hidden 16 lr --lr 0.01 0.003 --seed 0 1 2

``--hidden lr`` means logistic regression. The timing columns give the local training time per
round: summed over the sites and for the slowest site, with torch on ``--threads`` threads
(default 1). The real run spreads the sites over agent processes; expect its per-round wall time
to be at least the summed time divided by the number of cores, plus messaging overhead.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedcore import training  # noqa: E402
from fedcore.aggregation import fedavg  # noqa: E402
from fedcore.models import build_model  # noqa: E402
from federation.demo import baselines  # noqa: E402
from federation.demo.scenarios import SCENARIOS  # noqa: E402


def simulate(
    plan: dict[str, Any], prepared: baselines.Prepared
) -> tuple[dict, list[float], list[float]]:
    """Run FedAvg as server and agents would; return (global state, sum and max s per round)."""
    settings = plan["training"]
    seed = int(plan.get("seed", 0))
    d = prepared.n_features
    task = baselines.objective(plan)  # the plan's task: outputs and loss
    state = build_model(plan["model"], d, n_outputs=task.n_outputs, seed=seed).state_dict()
    sums: list[float] = []
    maxima: list[float] = []
    for rnd in range(1, int(settings["rounds"]) + 1):
        updates = []
        times = []
        for data in prepared.train.values():
            model = baselines.load_state(plan, state, d)
            start = time.perf_counter()
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
                objective=task,
            )
            times.append(time.perf_counter() - start)
            updates.append((model.state_dict(), float(data.X.shape[0])))
        state = fedavg(updates)
        sums.append(sum(times))
        maxima.append(max(times))
    return state, sums, maxima


def _model_spec(hidden: str, activation: str, dropout: float) -> dict[str, Any]:
    """Model spec from a --hidden value: 'lr' or comma-separated widths."""
    if hidden == "lr":
        return {"kind": "logistic_regression"}
    widths = [int(w) for w in hidden.split(",")]
    return {"kind": "mlp", "hidden": widths, "activation": activation, "dropout": dropout}


def _label(plan: dict[str, Any]) -> str:
    """Short description of a plan's model and training settings."""
    model = plan["model"]
    arch = "lr" if model["kind"] == "logistic_regression" else ",".join(map(str, model["hidden"]))
    t = plan["training"]
    text = f"{arch} {t['optimizer']} lr={t['lr']} bs={t['batch_size']} ep={t['local_epochs']}"
    if t.get("weight_decay"):
        text += f" wd={t['weight_decay']}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every combination and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", nargs="+", default=["healthcare"], choices=sorted(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=None, help="default: the plan's")
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--hidden", nargs="+", default=None, help="e.g. 32,16 or lr")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, nargs="+", default=None)
    parser.add_argument("--local-epochs", type=int, nargs="+", default=None)
    parser.add_argument("--optimizer", nargs="+", default=None, choices=["adam", "sgd"])
    parser.add_argument("--weight-decay", type=float, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-site", action="store_true", help="print each local-only AUC")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    header = (
        f"{'scenario':<10} {'settings':<38} {'seed':>4} {'fed':>6} {'central':>7} {'gap':>6} "
        f"{'localμ':>6} {'local min..max':>13} {'s/round':>7} {'max site':>8}"
    )
    print(header)
    print("-" * len(header))
    for name in args.scenario:
        grid = {
            "hidden": args.hidden or [None],
            "lr": args.lr or [None],
            "batch_size": args.batch_size or [None],
            "local_epochs": args.local_epochs or [None],
            "optimizer": args.optimizer or [None],
            "weight_decay": args.weight_decay or [None],
        }
        prepared_by_seed = {}
        for combo in itertools.product(*grid.values()):
            choice = dict(zip(grid, combo, strict=True))
            rows = []
            for seed in args.seed:
                if seed not in prepared_by_seed:
                    scenario = SCENARIOS[name](seed)
                    prepared_by_seed[seed] = (scenario.plan, baselines.prepare(scenario))
                base_plan, prepared = prepared_by_seed[seed]
                plan = copy.deepcopy(base_plan)
                if choice["hidden"] is not None:
                    plan["model"] = _model_spec(choice["hidden"], args.activation, args.dropout)
                for key in ("lr", "batch_size", "local_epochs", "optimizer", "weight_decay"):
                    if choice[key] is not None:
                        plan["training"][key] = choice[key]
                if args.rounds is not None:
                    plan["training"]["rounds"] = args.rounds
                state, sums, maxima = simulate(plan, prepared)
                result = baselines.compare(plan, prepared, state, seed=seed)
                fed = result["federated"]["auc"]
                central = result["centralized"]["auc"]
                local = [v["auc"] for v in result["local_only"].values()]
                local_mean = statistics.fmean(local)
                rows.append((fed, central, local_mean))
                print(
                    f"{name:<10} {_label(plan):<38} {seed:>4} {fed:>6.4f} {central:>7.4f} "
                    f"{fed - central:>+6.3f} {local_mean:>6.4f} "
                    f"{min(local):>6.3f}..{max(local):.3f} {statistics.fmean(sums):>7.3f} "
                    f"{statistics.fmean(maxima):>8.3f}",
                    flush=True,
                )
                if args.per_site:
                    sites = ", ".join(
                        f"{site} {v['auc']:.3f}" for site, v in result["local_only"].items()
                    )
                    print(f"{'':<10} local-only AUC: {sites}")
            ok = all(c - f <= 0.02 and f > m for f, c, m in rows)
            print(
                f"{'':<10} {'mean over seeds':<38} {'':>4} "
                f"{statistics.fmean(r[0] for r in rows):>6.4f} "
                f"{statistics.fmean(r[1] for r in rows):>7.4f} "
                f"{statistics.fmean(r[0] - r[1] for r in rows):>+6.3f} "
                f"{statistics.fmean(r[2] for r in rows):>6.4f}   "
                f"{'fed within 0.02 of central and above local mean' if ok else 'criterion NOT met'}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
