"""FLamby's Fed-Heart-Disease benchmark, reproduced through a real Quorum federation.

    .venv/bin/python bench/flamby_heart.py --data /path/to/heart_disease      # 5 seeds, ~3 min
    .venv/bin/python bench/flamby_heart.py --data /path/to/heart_disease --quick

``--data`` holds UCI's processed.{cleveland,hungarian,switzerland,va}.data (the only way this
script reads data). Reference: du Terrail et al., "FLamby: Datasets and Benchmarks for
Cross-Silo Federated Learning in Realistic Healthcare Settings", NeurIPS 2022 Datasets and
Benchmarks; code at github.com/owkin/FLamby.

What runs where
---------------
* FedAvg, FedProx, FedAdam, FedYogi: through the REAL federation (``bench/_federation.py``):
  the ASGI server in this process and four ``quorum-agent run`` processes, one per hospital,
  each with its own folder, ``site.toml`` and data file, over real websockets, with the plans
  proposed, approved by every steward and run by the orchestrator. The four agents stay
  connected and run the 4 strategies x N seeds plans one after another. The final global
  model of each run is read from the server's model store and evaluated here on each
  hospital's test rows (the same prepared rows the agent holds) with ``fedcore.training.
  evaluate``: accuracy at threshold 0.5.
* Local-only and pooled training involve no federation, so they are computed in this process
  with the same training code the agents run (``fedcore.training.train_local``).

Data protocol (FLamby's ``flamby/datasets/fed_heart_disease/dataset.py``, the version with
per-centre normalisation; /work/shared/datasets/README.md states the same): replace "?" by
missing, drop columns 10, 11, 12, drop rows with a missing value (740 rows: 303/261/46/130);
label = column 13 > 0; per hospital ``train_test_split(train_size=0.66, test_size=0.34,
random_state=43, shuffle=True, stratify=label)``, stratified only when both classes have more
than 2 rows (Switzerland has one negative: not stratified); one-hot columns 2 (chest pain type,
1-4) and 6 (resting ECG, 0-2) with drop_first, which leaves 13 features; standardise all 13
with the hospital's own TRAIN mean and std (torch's std: ddof 1; divided by std + 1e-9).
Pooled training standardises with the pooled train statistics. Every test set is standardised
with its own hospital's statistics, as FLamby's per-centre test loaders are, for every method.

How the sites see it: each hospital prepares its own file, as a site would (its own one-hot
with the data dictionary's categories, its own standardisation, its own fixed split), into the
agent's folder: columns f0..f12, the label y and ``part`` ("train"/"test"). The plan declares
the 13 features numeric with ``"scale": "none"`` (used as prepared: no federated
re-standardisation) and ``"evaluation": {"split_column": "part"}`` (the site's split, not our
seeded holdout split); the agents only ever train on the train rows.

Hyper-parameters (all FLamby's; where each comes from)
-------------------------------------------------------
* ``flamby/datasets/fed_heart_disease/common.py``: BATCH_SIZE = 4, LR = 0.001 (Adam, for
  pooled and local training), NUM_EPOCHS_POOLED = 50, NUM_CLIENTS = 4, and
  ``get_nb_max_rounds(num_updates) = (486 // 4 // 4) * 50 // num_updates`` = 15 rounds.
* ``flamby/benchmarks/fed_benchmark.py``: num_updates = 100 local steps per round; strategies
  train with ``torch.optim.SGD`` (no momentum) on the clients; local i and pooled are
  ``train_single_centric`` for NUM_EPOCHS_POOLED epochs with Adam(LR); one shared initial
  model per seed for every method.
* ``flamby/config_heart_disease.json`` (the strategies' tuned values): FedAvg lr 0.001;
  FedProx lr 0.001, mu 0.01; FedAdam lr 0.01, server_learning_rate 0.01, beta1 0.9,
  beta2 0.999, tau 1e-8; FedYogi lr 0.003162, server_learning_rate 0.01, beta1 0.9,
  beta2 0.999, tau 1e-8.
* ``flamby/strategies/fed_opt.py``: the server step of FedAdam / FedYogi (weighted mean delta
  by train size, m and v without bias correction, ``w += eta * m / (sqrt(v) + tau)``), which
  is ``fedcore.aggregation``'s (Reddi et al. Algorithm 2; v starts at tau^2 = 1e-16 there,
  at 0 in FLamby). FedProx adds ``mu / 2 * ||w - w_global||^2`` at the sites (as ours).
* Model: ``nn.Linear(13, 1)`` + sigmoid with BCE: our ``logistic_regression``.

FedProx with FLamby's mu (0.01) and client lr (0.001) ends within about 1e-4 of FedAvg's
weights, so the two give the same accuracies to 4 decimals (FLamby's published values are
equal too).

Known differences: FLamby's client data loader keeps its position across rounds (a round's 100
steps continue the previous round's pass); our agents reshuffle at the start of each round
(seed ``plan seed * 1000 + round``). Seeds: FLamby's runs use its own seed list; ours are
0..N-1 (plan seed = init, batch order). The published values below are FLamby's figure; the bar
compares our mean over seeds with each, within 2 standard deviations of OURS (sample sd over
the seeds, ddof 1): FLamby's per-seed spread is not published with the figure.

Metric: "client-averaged accuracy" = the mean of the four hospitals' test accuracies (each
hospital's test rows, threshold 0.5). Local i = the model trained on hospital i alone,
evaluated on all four test sets, averaged the same way (FLamby's Local i rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import Table, bar, write_results  # noqa: E402

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
CATEGORIES = {2: (1.0, 2.0, 3.0, 4.0), 6: (0.0, 1.0, 2.0)}  # UCI data dictionary: cp, restecg
NUMERIC = (0, 1, 3, 4, 5, 7, 8, 9)
FEATURES = [f"f{i}" for i in range(13)]

# common.py
BATCH_SIZE = 4
LR = 0.001
NUM_EPOCHS_POOLED = 50
NUM_UPDATES = 100  # fed_benchmark.py
ROUNDS = (486 // 4 // BATCH_SIZE) * NUM_EPOCHS_POOLED // NUM_UPDATES  # get_nb_max_rounds: 15

# config_heart_disease.json: the client optimiser is SGD for every strategy.
STRATEGIES: dict[str, dict[str, Any]] = {
    "FedAvg": {"lr": 0.001, "aggregation": {"strategy": "fedavg"}},
    "FedProx": {"lr": 0.001, "aggregation": {"strategy": "fedprox", "mu": 0.01}},
    "FedAdam": {
        "lr": 0.01,
        "aggregation": {
            "strategy": "fedadam",
            "server_lr": 0.01,
            "beta1": 0.9,
            "beta2": 0.999,
            "tau": 1e-8,
        },
    },
    "FedYogi": {
        "lr": 0.003162,
        "aggregation": {
            "strategy": "fedyogi",
            "server_lr": 0.01,
            "beta1": 0.9,
            "beta2": 0.999,
            "tau": 1e-8,
        },
    },
}
# FLamby's published client-averaged test accuracies (its Fed-Heart-Disease results figure).
PUBLISHED: dict[str, float] = {
    "Pooled": 0.7353,
    "FedAvg": 0.6850,
    "FedProx": 0.6850,
    "FedAdam": 0.7255,
    "FedYogi": 0.7314,
    "Local cleveland": 0.7221,
    "Local hungarian": 0.6287,
    "Local switzerland": 0.5670,
    "Local va": 0.6366,
}

SCHEMA: dict[str, Any] = {
    "columns": [
        {"name": name, "type": "numeric", "scale": "none", "missing": "error"} for name in FEATURES
    ],
    "target": {"column": "y", "positive": ["1"]},
}


# --------------------------------------------------------------------------------------------
# Data, as each hospital prepares its own


def raw_hospital(data_dir: Path, hospital: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(13 unscaled features, labels, is_test) of one hospital, FLamby's rows and split."""
    from sklearn.model_selection import train_test_split

    path = data_dir / f"processed.{hospital}.data"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: --data must hold the four processed.*.data files")
    df = pd.read_csv(path, header=None, na_values=["?"])
    df = df.drop(columns=[10, 11, 12]).dropna(axis=0).apply(pd.to_numeric)
    y = (df[13].to_numpy() > 0).astype(np.int64)
    n = len(df)
    counts = np.bincount(y, minlength=2)
    stratify = y if (counts > 2).all() else None
    _, test_idx = train_test_split(
        np.arange(n),
        test_size=1.0 - 0.66,
        train_size=0.66,
        random_state=43,
        shuffle=True,
        stratify=stratify,
    )
    is_test = np.isin(np.arange(n), test_idx)
    columns = [df[c].to_numpy(dtype=np.float64) for c in NUMERIC]
    for col, values in CATEGORIES.items():  # one-hot, the first category dropped
        columns += [(df[col].to_numpy() == v).astype(np.float64) for v in values[1:]]
    return np.stack(columns, axis=1), y, is_test


def standardise(X: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """FLamby's normalisation: (x - mean) / (std + 1e-9), torch's std (ddof 1), float32."""
    X32 = X.astype(np.float32)
    mean = X32[fit_rows].mean(axis=0)
    std = X32[fit_rows].std(axis=0, ddof=1)
    return ((X32 - mean) / (std + np.float32(1e-9))).astype(np.float32)


def prepare(data_dir: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Write each hospital's site file; return its arrays for the in-process baselines."""
    sites: dict[str, dict[str, Any]] = {}
    raws = {h: raw_hospital(data_dir, h) for h in HOSPITALS}
    for hospital, (X, y, is_test) in raws.items():
        Z = standardise(X, ~is_test)
        frame = pd.DataFrame(Z, columns=FEATURES)
        frame["y"] = y
        frame["part"] = np.where(is_test, "test", "train")
        path = out / f"{hospital}.csv"
        frame.to_csv(path, index=False, float_format="%.9g")
        back = pd.read_csv(path)  # exactly what the agent will read
        Zf = back[FEATURES].to_numpy(dtype=np.float32)
        sites[hospital] = {
            "path": path,
            "X_train": Zf[~is_test],
            "y_train": y[~is_test],
            "X_test": Zf[is_test],
            "y_test": y[is_test],
            "raw": X,
            "is_test": is_test,
        }
    # Pooled: the pooled train rows standardised with the pooled train statistics.
    X_all = np.concatenate([raws[h][0] for h in HOSPITALS])
    train_all = np.concatenate([~raws[h][2] for h in HOSPITALS])
    y_all = np.concatenate([raws[h][1] for h in HOSPITALS])
    pooled = standardise(X_all, train_all)
    sites["__pooled__"] = {"X_train": pooled[train_all], "y_train": y_all[train_all]}
    return sites


# --------------------------------------------------------------------------------------------
# Evaluation and the in-process baselines


def client_averaged(state_or_model: Any, sites: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each hospital's test accuracy and their mean (FLamby's client-averaged accuracy)."""
    import torch

    from fedcore import models, training

    if isinstance(state_or_model, torch.nn.Module):
        model = state_or_model
    else:
        model = models.build_model({"kind": "logistic_regression"}, 13, seed=0)
        model.load_state_dict(state_or_model)
    per = {h: training.evaluate(model, sites[h]["X_test"], sites[h]["y_test"]) for h in HOSPITALS}
    result = {h: float(m["accuracy"]) for h, m in per.items()}
    result["mean"] = float(np.mean([result[h] for h in HOSPITALS]))
    return result


def train_centrally(X: np.ndarray, y: np.ndarray, seed: int) -> Any:
    """FLamby's train_single_centric: Adam(LR), batch 4, NUM_EPOCHS_POOLED epochs, BCE."""
    from fedcore import models, training

    model = models.build_model({"kind": "logistic_regression"}, 13, seed=seed)
    training.train_local(
        model, X, y, epochs=NUM_EPOCHS_POOLED, batch_size=BATCH_SIZE, lr=LR, seed=seed
    )
    return model


def plan_spec(strategy: str, seed: int, rounds: int) -> dict[str, Any]:
    """The plan a data scientist proposes for one strategy and seed."""
    settings = STRATEGIES[strategy]
    return {
        "model": {"kind": "logistic_regression"},
        "schema": SCHEMA,
        "training": {
            "rounds": rounds,
            "local_epochs": 1,  # required; local_steps replaces it
            "local_steps": NUM_UPDATES,
            "batch_size": BATCH_SIZE,
            "optimizer": "sgd",
            "lr": settings["lr"],
        },
        "evaluation": {"split_column": "part"},
        "aggregation": settings["aggregation"],
        "min_silos": len(HOSPITALS),
        "round_deadline_seconds": 120,
        "seed": seed,
    }


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return float(np.mean(values)), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    """Prepare the sites, run the federation and the baselines, print and save the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="folder of processed.*.data")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"default FLamby's {ROUNDS}")
    parser.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES)
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, FedAvg and FedAdam, 5 rounds: a smoke run"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.strategies = 1, 5, ["FedAvg", "FedAdam"]
    seeds = list(range(args.seeds))
    started = time.monotonic()
    import torch

    # One thread: these models are tiny, and on a shared machine a second intra-op thread
    # makes each optimizer step ~40x slower (the agents run with OMP_NUM_THREADS=1 too).
    torch.set_num_threads(1)

    from bench._federation import LiveFederation, configure_django

    home = configure_django()
    out = Path(tempfile.mkdtemp(prefix="flamby-heart-", dir=home))
    sites = prepare(args.data.resolve(), out)
    sizes = {h: (len(sites[h]["y_train"]), len(sites[h]["y_test"])) for h in HOSPITALS}
    print(
        "Fed-Heart-Disease: "
        + ", ".join(f"{h} {tr}+{te}" for h, (tr, te) in sizes.items())
        + f" (train+test); {args.rounds} rounds x {NUM_UPDATES} local steps, seeds {seeds}",
        flush=True,
    )

    accuracies: dict[str, list[float]] = {}
    per_site: dict[str, list[dict[str, float]]] = {}
    runs: list[dict[str, Any]] = []

    # Pooled and local-only: no federation, in this process, same training code.
    for seed in seeds:
        pooled = train_centrally(
            sites["__pooled__"]["X_train"], sites["__pooled__"]["y_train"], seed
        )
        scores = client_averaged(pooled, sites)
        accuracies.setdefault("Pooled", []).append(scores["mean"])
        per_site.setdefault("Pooled", []).append(scores)
        for h in HOSPITALS:
            local = train_centrally(sites[h]["X_train"], sites[h]["y_train"], seed)
            scores = client_averaged(local, sites)
            accuracies.setdefault(f"Local {h}", []).append(scores["mean"])
            per_site.setdefault(f"Local {h}", []).append(scores)
    baseline_seconds = time.monotonic() - started

    fed = LiveFederation.start({h: (sites[h]["path"], SCHEMA) for h in HOSPITALS})
    fed_started = time.monotonic()
    try:
        for strategy in args.strategies:
            for seed in seeds:
                result = fed.run_plan(
                    plan_spec(strategy, seed, args.rounds), name=f"{strategy} seed {seed}"
                )
                scores = client_averaged(result.state, sites)
                accuracies.setdefault(strategy, []).append(scores["mean"])
                per_site.setdefault(strategy, []).append(scores)
                runs.append(
                    {
                        "strategy": strategy,
                        "seed": seed,
                        "run": result.run.pk,
                        "rounds": result.run.rounds,
                        "seconds": round(result.seconds, 2),
                        **{f"acc {k}": v for k, v in scores.items()},
                    }
                )
                print(
                    f"  {strategy:<8} seed {seed}: client-averaged accuracy {scores['mean']:.4f} "
                    f"({result.run.rounds} rounds, {result.seconds:.1f} s, run {result.run.pk})",
                    flush=True,
                )
    finally:
        fed.close()
    fed_seconds = time.monotonic() - fed_started

    table = Table(
        f"Fed-Heart-Disease, client-averaged test accuracy over {len(seeds)} seed(s)",
        ["method", "where", "ours mean", "ours sd", "FLamby", "diff", "2 sd", "bar"],
    )
    order = [*args.strategies, "Pooled", *(f"Local {h}" for h in HOSPITALS)]
    bars: dict[str, bool] = {}
    for method in order:
        mean, sd = summary(accuracies[method])
        published = PUBLISHED[method]
        ok = abs(mean - published) <= 2 * sd
        bars[method] = ok
        where = "federation" if method in STRATEGIES else "in-process"
        table.row(method, where, mean, sd, published, mean - published, 2 * sd, bar(ok))
    table.note(
        "bar: |ours mean - FLamby| <= 2 x OUR sample sd over the seeds (FLamby publishes no "
        "per-seed spread with the figure); with 1 seed the sd is 0 and the bar is only a smoke"
    )
    table.note(
        "federation = 4 real agent processes over websockets; in-process = no federation "
        "involved, same fedcore.training code"
    )
    table.print()

    sites_table = Table(
        "per-hospital test accuracy (mean over seeds)", ["method", *HOSPITALS, "mean"]
    )
    for method in order:
        rows = per_site[method]
        sites_table.row(
            method,
            *(float(np.mean([r[h] for r in rows])) for h in HOSPITALS),
            accuracies_mean(rows),
        )
    sites_table.print()

    total = time.monotonic() - started
    print(
        f"{len(runs)} federated runs in {fed_seconds:.1f} s, baselines {baseline_seconds:.1f} s, "
        f"{total:.1f} s in all",
        flush=True,
    )
    write_results(
        "flamby_heart",
        {
            "accuracy": table,
            "per_hospital": sites_table,
            "runs": runs,
            "settings": {
                "seeds": seeds,
                "rounds": args.rounds,
                "local_steps": NUM_UPDATES,
                "batch_size": BATCH_SIZE,
                "strategies": {s: STRATEGIES[s] for s in args.strategies},
                "pooled_local": {"optimizer": "adam", "lr": LR, "epochs": NUM_EPOCHS_POOLED},
                "quick": args.quick,
            },
            "bars_met": {k: v for k, v in bars.items()},
            "seconds": {"total": total, "federation": fed_seconds, "baselines": baseline_seconds},
        },
    )


def accuracies_mean(rows: list[dict[str, float]]) -> float:
    """Mean over seeds of the client-averaged accuracy."""
    return float(np.mean([r["mean"] for r in rows]))


if __name__ == "__main__":
    main()
