"""Update compression: bytes per round against the accuracy and AUC reached, per method.

For each method of a plan's ``compression`` (none, float16, int8, topk at 10 % and 1 %) this runs
FedAvg on two real data sets and reports what the agents upload per round and how good the
final global model is, on the union of the sites' held-out splits:

- thyroid: the healthcare demo scenario (five clinics, ``federation/demo/data/thyroid.csv``,
  the plan's MLP and training settings), prepared as ``federation/demo/baselines.py`` does;
- heart disease (FLamby's four hospitals, ``--heart-data DIR`` holding
  ``processed.{cleveland,hungarian,switzerland,va}.data``): columns 10, 11, 12 dropped, rows
  with a missing value dropped, columns 2 and 6 one-hot encoded (first category dropped), label
  ``column 13 > 0``, a 66/34 train/test split per hospital (``random_state=43``), each hospital
  standardised with its own train statistics; logistic regression.

The rounds are simulated in one process, as ``bench/fedavg_sim.py`` does (no server, no agent
processes), but the update path is the real one: every site's update is built by
``fedcore.compression.compress_update`` from its trained weights and the global model (with its
top-k residual carried across rounds, error feedback), wrapped in the ``update`` message the
agent sends (its real fields and metrics) and cut into frames by ``fedcore.protocol.
encode_binary``; "bytes/round" is the total length of those frames over the sites (upload only:
the task the server sends down is the same for every method). The server side reassembles the
frames, decodes them with ``decompress_update`` and aggregates with ``fedcore.aggregation.
fedavg``. int8's stochastic rounding draws its noise from the OS, as the agent does, so its
figures vary slightly between runs. tests/e2e/test_federation.py runs a real top-k run.

    python bench/compression.py --heart-data ../shared/datasets/heart_disease
    python bench/compression.py --heart-data DIR --quick     # 5 rounds
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import Table, write_results  # noqa: E402
from fedcore import compression, protocol, tensors, training  # noqa: E402
from fedcore.aggregation import fedavg  # noqa: E402
from fedcore.models import build_model  # noqa: E402
from federation.demo import baselines  # noqa: E402
from federation.demo.scenarios import SCENARIOS  # noqa: E402

METHODS: list[tuple[str, dict[str, Any] | None]] = [
    ("none", None),
    ("float16", {"method": "float16"}),
    ("int8", {"method": "int8"}),
    ("topk 10%", {"method": "topk", "ratio": 0.1}),
    ("topk 1%", {"method": "topk", "ratio": 0.01}),
]
HEART_FILES = ("cleveland", "hungarian", "switzerland", "va")
# Logistic regression on 13 features, trained as FLamby's heart benchmark roughly does (Adam,
# small batches); one local epoch per round.
HEART_TRAINING = {"rounds": 20, "local_epochs": 1, "batch_size": 8, "optimizer": "adam", "lr": 0.01}


# ------------------------------------------------------------------------------------- data


def heart_disease(folder: Path) -> tuple[dict[str, tuple[np.ndarray, ...]], int]:
    """The four hospitals: name -> (X_train, y_train, X_test, y_test), and the feature count."""
    from sklearn.model_selection import train_test_split

    sites = {}
    for name in HEART_FILES:
        frame = pd.read_csv(folder / f"processed.{name}.data", header=None, na_values=["?", "NaN"])
        frame = frame.drop(columns=[10, 11, 12]).dropna()
        # fixed category sets, so every hospital has the same columns (UCI codes)
        frame[2] = pd.Categorical(frame[2].astype(int), categories=[1, 2, 3, 4])
        frame[6] = pd.Categorical(frame[6].astype(int), categories=[0, 1, 2])
        y = (frame.pop(13) > 0).astype(np.float32).to_numpy()
        X = pd.get_dummies(frame, columns=[2, 6], drop_first=True).astype(np.float32).to_numpy()
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.34, random_state=43)
        mean, std = X_train.mean(axis=0), X_train.std(axis=0)
        std[std == 0] = 1.0
        sites[name] = ((X_train - mean) / std, y_train, (X_test - mean) / std, y_test)
    n_features = next(iter(sites.values()))[0].shape[1]
    return sites, n_features


def thyroid(seed: int) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, ...]], tuple]:
    """The healthcare demo: its plan, site -> (X_train, y_train) and the held-out union."""
    scenario = SCENARIOS["healthcare"](seed)
    prepared = baselines.prepare(scenario)
    sites = {name: (data.X, data.y) for name, data in prepared.train.items()}
    return scenario.plan, sites, (prepared.test.X, prepared.test.y)


# ------------------------------------------------------------------------------- simulation


def wire_update(
    local: dict[str, torch.Tensor],
    global_: dict[str, torch.Tensor],
    spec: compression.CompressionSpec,
    feedback: compression.ErrorFeedback,
    fields: dict[str, Any],
    rnd: int,
) -> tuple[list[bytes], int]:
    """The frames of the update the agent would send, and its payload's size (the residual is
    carried forward in ``feedback``)."""
    if not spec.compressed:
        payload = tensors.encode_state_dict(local)
    else:
        built = compression.compress_update(
            local, global_, spec, residual=feedback.residual_for(rnd)
        )
        if spec.method == "topk":
            feedback.advance(rnd, built.residual)
        payload = tensors.encode_state_dict(built.tensors)
        fields = {**fields, "compression": spec.method}
    frames = protocol.encode_binary(protocol.BinaryMessage("update", fields, payload))
    return frames, len(payload)


def received(
    frames: list[bytes], global_: dict[str, torch.Tensor], spec: compression.CompressionSpec
) -> dict[str, torch.Tensor]:
    """What the server does with the frames: reassemble, check, decode to full weights."""
    reassembler = protocol.Reassembler()
    message = None
    for frame in frames:
        message = reassembler.feed(frame)
    assert message is not None
    state = tensors.decode_state_dict(message.payload)
    if message.fields.get("compression"):
        state = compression.decompress_update(state, spec, global_)
    return state


def simulate(
    model_spec: dict[str, Any],
    settings: dict[str, Any],
    sites: dict[str, tuple[np.ndarray, ...]],
    test: tuple[np.ndarray, np.ndarray],
    section: dict[str, Any] | None,
    *,
    rounds: int,
    seed: int,
) -> dict[str, float]:
    """FedAvg with the given compression; bytes per round and the final model's scores."""
    spec = compression.CompressionSpec.from_section(section)
    n_features = next(iter(sites.values()))[0].shape[1]
    global_ = build_model(model_spec, n_features, seed=seed).state_dict()
    feedback = {name: compression.ErrorFeedback() for name in sites}
    upload: list[int] = []
    payloads: list[int] = []
    for rnd in range(1, rounds + 1):
        updates, sent, payload = [], 0, 0
        for name, (X, y, *_) in sites.items():
            model = build_model(model_spec, n_features, seed=0)
            model.load_state_dict(global_)
            result = training.train_local(
                model,
                X,
                y,
                epochs=int(settings["local_epochs"]),
                batch_size=int(settings["batch_size"]),
                lr=float(settings["lr"]),
                optimizer=settings.get("optimizer", "adam"),
                seed=seed * 1000 + rnd,
            )
            local_metrics = training.evaluate(model, X, y)
            fields = {
                "run": 1,
                "round": rnd,
                "nonce": secrets.token_hex(16),
                "num_examples": int(X.shape[0]),
                # the shape of the agent's metrics (global and local evaluation, train loss)
                "metrics": {
                    "global": local_metrics,
                    "local": local_metrics,
                    "train_loss": float(result["train_loss"]),
                },
                "silo": name,
            }
            frames, size = wire_update(
                model.state_dict(), global_, spec, feedback[name], fields, rnd
            )
            sent += sum(len(frame) for frame in frames)
            payload += size
            updates.append((received(frames, global_, spec), float(X.shape[0])))
        global_ = fedavg(updates)
        upload.append(sent)
        payloads.append(payload)
    final = build_model(model_spec, n_features, seed=0)
    final.load_state_dict(global_)
    scores = training.evaluate(final, *test)
    return {
        "bytes_per_round": float(np.mean(upload)),
        "payload_per_round": float(np.mean(payloads)),
        "accuracy": float(scores["accuracy"]),
        "auc": float(scores["auc"]),
    }


def run_dataset(
    title: str,
    model_spec: dict[str, Any],
    settings: dict[str, Any],
    sites: dict[str, tuple[np.ndarray, ...]],
    test: tuple[np.ndarray, np.ndarray],
    *,
    rounds: int,
    seeds: list[int],
) -> Table:
    """One table: every method, averaged over the seeds."""
    n_params = sum(
        t.numel() for t in build_model(model_spec, test[0].shape[1], seed=0).state_dict().values()
    )
    table = Table(
        f"compression: {title} ({len(sites)} sites, {n_params:,} parameters, {rounds} rounds)",
        ["method", "bytes/round", "vs none", "payload/round", "accuracy", "AUC", "s"],
    )
    dense = None
    for label, section in METHODS:
        started = time.perf_counter()
        runs = [
            simulate(model_spec, settings, sites, test, section, rounds=rounds, seed=seed)
            for seed in seeds
        ]
        mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
        dense = mean["bytes_per_round"] if dense is None else dense
        table.row(
            label,
            int(round(mean["bytes_per_round"])),
            mean["bytes_per_round"] / dense,
            int(round(mean["payload_per_round"])),
            mean["accuracy"],
            mean["auc"],
            time.perf_counter() - started,
        )
    table.note(
        "bytes/round: frames of every site's update message (fedcore.protocol.encode_binary), "
        "header and JSON fields included (payload/round: the safetensors payloads alone); "
        "accuracy/AUC of the final global model on the union "
        f"of held-out splits, mean over seeds {seeds}"
    )
    return table


def main(argv: list[str] | None = None) -> int:
    """Run both data sets, print the tables, write bench/results/compression.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heart-data", type=Path, required=True, help="FLamby heart files")
    parser.add_argument("--quick", action="store_true", help="5 rounds, one seed")
    parser.add_argument("--rounds", type=int, default=None, help="default 20 (5 with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = args.rounds or (5 if args.quick else 20)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])

    plan, thyroid_sites, thyroid_test = thyroid(seeds[0])
    thyroid_table = run_dataset(
        "thyroid (healthcare demo)",
        plan["model"],
        plan["training"],
        thyroid_sites,
        thyroid_test,
        rounds=rounds,
        seeds=seeds,
    )
    thyroid_table.print()

    heart_sites, _ = heart_disease(args.heart_data)
    heart_test = (
        np.concatenate([site[2] for site in heart_sites.values()]),
        np.concatenate([site[3] for site in heart_sites.values()]),
    )
    heart_table = run_dataset(
        "heart disease (FLamby, 4 hospitals)",
        {"kind": "logistic_regression"},
        HEART_TRAINING,
        heart_sites,
        heart_test,
        rounds=rounds,
        seeds=seeds,
    )
    sizes = ", ".join(f"{n} {len(s[1])}/{len(s[3])}" for n, s in heart_sites.items())
    heart_table.note(f"train/test rows per hospital: {sizes}")
    heart_table.note(
        "a 14-parameter model is 56 bytes of weights: the frame prefix, its JSON header (run, "
        "nonce, metrics) and the safetensors header dominate every method"
    )
    heart_table.print()
    write_results(
        "compression",
        {
            "rounds": rounds,
            "seeds": seeds,
            "thyroid": thyroid_table,
            "heart_disease": heart_table,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
