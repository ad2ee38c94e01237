"""Aggregation speed and memory: fedcore.aggregation against Flower 1.42's aggregate functions.

What is compared. N updates of P float32 parameters, each update a list of 4 layers (50%, 30%,
15% and 5% of P), generated from a fixed seed: a "global model" of uniform values and updates
that differ from it by uniform noise of amplitude 0.01; weights are example counts drawn from
50..5000. Both sides get the same bytes: Flower lists of numpy arrays, Quorum state dicts of
``torch.from_numpy`` views of those very arrays (no copy).

fedavg (weighted mean):

* ``numpy limit``: what the machine can do -- a preallocated float32 accumulator and, for each
  update, ``np.multiply(x, w_i, out=tmp)`` + ``np.add(acc, tmp, out=acc)`` on cache-sized
  chunks (one read of each update). Single-threaded, like numpy itself.
* ``Flower aggregate``: ``flwr.server.strategy.aggregate.aggregate([(ndarrays, n), ...])``.
* ``Flower aggregate_inplace``: takes ``(ClientProxy, FitRes)`` pairs whose parameters are bytes
  (built with ``ndarrays_to_parameters`` before the clock starts); the timing includes its
  ``parameters_to_ndarrays`` deserialisation, which it cannot skip. Compare it with
  ``Quorum strategy, blobs``.
* ``Quorum fedavg()``: ``fedcore.aggregation.fedavg`` over ``(state_dict, n)`` pairs.
* ``Quorum FedAvg strategy``: ``make_strategy({"strategy": "fedavg"}).aggregate(...)``: what the
  server runs, including screening (shape checks, NaN/Inf, each update's delta norm from the
  global model and the anomaly flags).
* ``Quorum strategy, blobs``: the production path: updates arrive as safetensors blobs (built
  before the clock starts) and are decoded one at a time inside the timing.

Robust rules: coordinate-wise median, trimmed mean (beta 0.1) and Krum (f = N // 10) against
``aggregate_median``, ``aggregate_trimmed_avg`` and ``aggregate_krum(..., to_keep=0)``. Quorum's
robust strategies stack the updates; beyond ``memory_budget_bytes`` (default 256 MiB) they spill
them to a file. Both settings are measured: ``default budget`` (what the server runs: it spills
when N x P x 4 bytes > 256 MiB) and ``in RAM`` (budget above the inputs, as Flower holds them).

Timing: best of ``--repeats`` calls (fewer once ``--time-cap`` seconds are spent; the first
call is the one whose memory is measured, so a slow method may run only once). Peak
extra memory: each measurement runs in its own process; after building the inputs it frees what
it can (``malloc_trim``), reads its resident set (VmRSS), resets the high-water mark
(``/proc/self/clear_refs``), runs one call and reads VmHWM: extra = VmHWM - VmRSS before, i.e.
everything the call allocated and touched at its peak, the result included, beyond the inputs.
torch runs with ``--torch-threads`` intra-op threads (default 1: numpy and Flower are
single-threaded; BLAS keeps its own threads for Krum's Gram matrix). ``err`` is the largest
absolute difference from a float64 reference on 8192 sampled coordinates per layer.

    .venv-bench/bin/python bench/aggregation.py               # the full grid (~20 min)
    .venv-bench/bin/python bench/aggregation.py --quick       # small sizes, seconds
    .venv-bench/bin/python bench/aggregation.py --n 20 --p 5e6 --sections fedavg --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import Table, bar, write_results  # noqa: E402

LAYER_SHARES = (0.50, 0.30, 0.15)  # the 4th layer takes the rest (5%)
GRID_N = (10, 50, 100)
GRID_P = (1_000_000, 10_000_000, 50_000_000)
TARGET = (20, 5_000_000)
QUICK_N = (5, 10)
QUICK_P = (200_000,)
QUICK_TARGET = (20, 200_000)
TRIM_BETA = 0.1
SAMPLE = 4096  # coordinates checked at each end of every layer

FEDAVG_METHODS = (
    "numpy limit",
    "Flower aggregate",
    "Flower aggregate_inplace",
    "Quorum fedavg()",
    "Quorum FedAvg strategy",
    "Quorum strategy, blobs",
)
ROBUST_RULES = ("median", "trimmed_mean", "krum")
ROBUST_METHODS = ("Flower", "Quorum default budget", "Quorum in RAM")


def flower_available() -> bool:
    """True when Flower's aggregate functions import."""
    try:
        import flwr.server.strategy.aggregate  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Inputs


def layer_sizes(p: int) -> list[int]:
    """P split into the 4 layers."""
    sizes = [int(p * share) for share in LAYER_SHARES]
    return [*sizes, p - sum(sizes)]


def make_inputs(n: int, p: int) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[int]]:
    """(global layers, N updates as lists of layers, N example counts), from a fixed seed."""
    rng = np.random.default_rng([n, p])
    sizes = layer_sizes(p)
    base = [rng.random(size, dtype=np.float32) for size in sizes]
    updates = []
    for _ in range(n):
        layers = []
        for size, b in zip(sizes, base, strict=True):
            x = rng.random(size, dtype=np.float32)
            x -= 0.5
            x *= 0.02
            x += b
            layers.append(x)
        updates.append(layers)
    weights = [int(w) for w in rng.integers(50, 5000, size=n)]
    return base, updates, weights


def as_state(layers: list[np.ndarray]) -> dict[str, Any]:
    """A state dict of torch views of the layers (no copy)."""
    import torch

    return {f"layer{i}": torch.from_numpy(layer) for i, layer in enumerate(layers)}


def samples(layer: np.ndarray) -> np.ndarray:
    """Indices of the checked coordinates of a layer."""
    if layer.size <= 2 * SAMPLE:
        return np.arange(layer.size)
    return np.r_[0:SAMPLE, layer.size - SAMPLE : layer.size]


def reference(
    rule: str, updates: list[list[np.ndarray]], weights: list[int], f: int
) -> list[np.ndarray]:
    """float64 reference of the rule on the sampled coordinates of each layer."""
    result = []
    for j in range(len(updates[0])):
        idx = samples(updates[0][j])
        rows = np.stack([u[j][idx].astype(np.float64) for u in updates])
        if rule == "fedavg":
            w = np.asarray(weights, dtype=np.float64)
            result.append((w[:, None] * rows).sum(axis=0) / w.sum())
        elif rule == "median":
            result.append(np.median(rows, axis=0))
        elif rule == "trimmed_mean":
            k = int(math.floor(TRIM_BETA * len(updates)))
            ordered = np.sort(rows, axis=0)
            result.append(ordered[k : len(updates) - k].mean(axis=0))
        else:
            result.append(np.full(idx.size, np.nan))  # Krum: checked by the chosen update
    return result


def max_error(output: list[np.ndarray], ref: list[np.ndarray], updates) -> float:
    """Largest |output - reference| over the sampled coordinates."""
    worst = 0.0
    for j, expected in enumerate(ref):
        got = np.asarray(output[j]).reshape(-1)[samples(updates[0][j])].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst


def chosen_update(output: list[np.ndarray], updates: list[list[np.ndarray]]) -> int:
    """Index of the update a Krum result equals (-1 if none)."""
    for i, update in enumerate(updates):
        if all(
            np.array_equal(np.asarray(o).reshape(-1), u)
            for o, u in zip(output, update, strict=True)
        ):
            return i
    return -1


# ---------------------------------------------------------------------------------------------
# Memory


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {
        key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024  # type: ignore[union-attr]
        for key in ("VmRSS", "VmHWM")
    }


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_peak(call: Callable[[], Any]) -> tuple[Any, int | None, float]:
    """Run ``call`` once; return its result, the peak bytes it added to the resident set and
    its wall time (which counts as the first timed call)."""
    _trim()
    before = _status()["VmRSS"]
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        started = time.perf_counter()
        result = call()
        return result, None, time.perf_counter() - started
    started = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - started
    return result, _status()["VmHWM"] - before, elapsed


def best_time(call: Callable[[], Any], repeats: int, cap: float, first: float) -> tuple[float, int]:
    """Best wall time of ``repeats`` calls, the first already made (``first`` seconds); stop
    early once ``cap`` seconds are spent."""
    times: list[float] = [first]
    spent = first
    while len(times) < repeats and spent < cap:
        started = time.perf_counter()
        out = call()
        elapsed = time.perf_counter() - started
        del out
        times.append(elapsed)
        spent += elapsed
    return min(times), len(times)


# ---------------------------------------------------------------------------------------------
# The measured calls (each runs in a child process)


def _numpy_limit(updates: list[list[np.ndarray]], weights: list[int]) -> list[np.ndarray]:
    total = float(sum(weights))
    acc = [np.zeros(layer.size, dtype=np.float32) for layer in updates[0]]
    chunk = 1 << 16
    tmp = np.empty(chunk, dtype=np.float32)
    for layers, weight in zip(updates, weights, strict=True):
        scale = np.float32(weight / total)
        for a, x in zip(acc, layers, strict=True):
            for start in range(0, x.size, chunk):
                t = tmp[: min(chunk, x.size - start)]
                np.multiply(x[start : start + chunk], scale, out=t)
                np.add(a[start : start + chunk], t, out=a[start : start + chunk])
    return acc


def _fit_results(updates: list[list[np.ndarray]], weights: list[int]) -> list[tuple[Any, Any]]:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    status = Status(code=Code.OK, message="")
    return [
        (
            None,
            FitRes(status=status, parameters=ndarrays_to_parameters(u), num_examples=w, metrics={}),
        )
        for u, w in zip(updates, weights, strict=True)
    ]


def _values(state: dict[str, Any]) -> list[np.ndarray]:
    return [state[f"layer{i}"].numpy() for i in range(len(state))]


def build_call(
    rule: str, method: str, inputs: tuple[Any, Any, Any], spill: str | None
) -> tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]:
    """The call for one measurement (with any input form it needs); and a result check."""
    base, updates, weights = inputs
    n, p = len(updates), sum(layer.size for layer in base)
    f = max(1, n // 10)
    ref = reference(rule, updates, weights, f)

    def check(result: list[np.ndarray]) -> dict[str, Any]:
        if rule == "krum":
            return {"chosen": chosen_update(result, updates)}
        return {"err": max_error(result, ref, updates)}

    if rule == "fedavg":
        if method == "numpy limit":
            return (lambda: _numpy_limit(updates, weights)), check
        if method == "Flower aggregate":
            from flwr.server.strategy.aggregate import aggregate

            pairs = list(zip(updates, weights, strict=True))
            return (lambda: aggregate(pairs)), check
        if method == "Flower aggregate_inplace":
            from flwr.server.strategy.aggregate import aggregate_inplace

            results = _fit_results(updates, weights)
            return (lambda: aggregate_inplace(results)), check
        from fedcore.aggregation import fedavg, make_strategy

        states = [as_state(u) for u in updates]
        global_state = as_state(base)
        if method == "Quorum fedavg()":
            return (lambda: _values(fedavg(zip(states, weights, strict=True)))), check
        if method == "Quorum FedAvg strategy":

            def run_strategy() -> list[np.ndarray]:
                strategy = make_strategy({"strategy": "fedavg"})
                pairs = zip(states, weights, strict=True)
                return _values(strategy.aggregate(global_state, pairs, round=1).state)

            return run_strategy, check
        if method == "Quorum strategy, blobs":
            from fedcore.aggregation import ClientUpdate
            from fedcore.tensors import decode_state_dict, encode_state_dict

            blobs = [encode_state_dict(s) for s in states]

            def decoded() -> Iterator[ClientUpdate]:
                for i, (blob, weight) in enumerate(zip(blobs, weights, strict=True)):
                    yield ClientUpdate(decode_state_dict(blob), float(weight), client_id=i)

            def run_blobs() -> list[np.ndarray]:
                strategy = make_strategy({"strategy": "fedavg"})
                return _values(strategy.aggregate(global_state, decoded(), round=1).state)

            return run_blobs, check
        raise ValueError(method)

    if method == "Flower":
        from flwr.server.strategy import aggregate as flower

        pairs = list(zip(updates, weights, strict=True))
        if rule == "median":
            return (lambda: flower.aggregate_median(pairs)), check
        if rule == "trimmed_mean":
            return (lambda: flower.aggregate_trimmed_avg(pairs, TRIM_BETA)), check
        return (lambda: flower.aggregate_krum(pairs, num_malicious=f, to_keep=0)), check
    from fedcore.aggregation import make_strategy

    states = [as_state(u) for u in updates]
    global_state = as_state(base)
    params: dict[str, Any] = {"strategy": rule}
    if rule == "trimmed_mean":
        params["beta"] = TRIM_BETA
    if rule == "krum":
        params["f"] = f
    if method == "Quorum in RAM":
        params["memory_budget_bytes"] = 2 * n * p * 4 + (1 << 20)

    def run_robust() -> list[np.ndarray]:
        strategy = make_strategy(params, spill_dir=spill)
        pairs = zip(states, weights, strict=True)
        return _values(strategy.aggregate(global_state, pairs, round=1).state)

    return run_robust, check


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure several (rule, method) pairs on one (N, P) in this process; return the figures.

    The inputs are built once. Each method first runs once on tiny inputs (so code pages and
    lazy initialisation are not counted as its memory), then gets its own input form, one
    measured call for the peak, and the timed calls; everything it built is dropped before the
    next method.
    """
    import torch

    torch.set_num_threads(spec["torch_threads"])
    inputs = make_inputs(spec["n"], spec["p"])
    tiny = make_inputs(5, 4096)
    out: dict[str, Any] = {}
    for rule, method in spec["pairs"]:
        warm, _ = build_call(rule, method, tiny, spec["spill_dir"])
        warm()
        del warm
        call, check = build_call(rule, method, inputs, spec["spill_dir"])
        result, extra, first = measure_peak(call)
        verdict = check(result)
        del result
        _trim()
        best, runs = best_time(call, spec["repeats"], spec["time_cap"], first)
        del call, check
        _trim()
        out[f"{rule}/{method}"] = {
            "best_s": best,
            "first_s": first,
            "runs": runs,
            "extra_bytes": extra,
            **verdict,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Orchestration


def estimated_bytes(rule: str, method: str, n: int, p: int) -> int:
    """Rough peak RSS of one measurement: inputs plus what the method allocates."""
    inputs, model = n * p * 4 + p * 4, p * 4  # the updates and the global model
    biggest_layer = max(layer_sizes(p)) * 4
    if rule == "fedavg":
        extra = {  # the child also holds the arrays the serialised forms were built from
            "numpy limit": model,
            "Flower aggregate": inputs + 2 * model,
            "Flower aggregate_inplace": 3 * model,
            "Quorum fedavg()": 2 * model,
            "Quorum FedAvg strategy": 2 * model,
            "Quorum strategy, blobs": 4 * model,
        }[method]
        build = inputs if method in ("Quorum strategy, blobs", "Flower aggregate_inplace") else 0
        return inputs + build + extra
    if method == "Flower":
        extra = inputs + model if rule == "krum" else 2 * n * biggest_layer + model
        return inputs + extra
    if method == "Quorum in RAM":
        return 2 * inputs + 2 * model
    return inputs + 256 * 2**20 + 3 * model


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small N and P: a smoke run")
    parser.add_argument("--n", type=int, nargs="+", help="numbers of updates (grid)")
    parser.add_argument("--p", type=float, nargs="+", help="parameters per update (grid)")
    parser.add_argument("--target", type=float, nargs=2, metavar=("N", "P"), help="bar point")
    parser.add_argument("--no-target", action="store_true", help="skip the target point")
    parser.add_argument("--sections", nargs="+", default=["fedavg", "robust"])
    parser.add_argument("--rules", nargs="+", default=list(ROBUST_RULES))
    parser.add_argument("--repeats", type=int, default=5, help="best of this many calls")
    parser.add_argument("--time-cap", type=float, default=8.0, help="stop repeating after (s)")
    parser.add_argument("--max-gib", type=float, default=9.0, help="skip above this peak")
    parser.add_argument(
        "--flower-krum-max",
        type=float,
        default=3e10,
        help="skip Flower's Krum when N*N*P exceeds this (its n² Python loop)",
    )
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--spill-dir", default=None, help="where robust rules spill")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    grid_n = tuple(args.n) if args.n else (QUICK_N if args.quick else GRID_N)
    grid_p = tuple(int(p) for p in args.p) if args.p else (QUICK_P if args.quick else GRID_P)
    cases = [(n, p) for n in grid_n for p in grid_p]
    if not args.no_target:
        target = (
            (int(args.target[0]), int(args.target[1]))
            if args.target
            else (QUICK_TARGET if args.quick else TARGET)
        )
        if target not in cases:
            cases.append(target)
    else:
        target = None
    repeats = 3 if args.quick and args.repeats == 5 else args.repeats
    has_flower = flower_available()
    if not has_flower:
        print(
            "Flower (flwr) is not importable in this interpreter: measuring Quorum's side only. "
            "Run under .venv-bench (make install-bench) for the comparison.\n",
            flush=True,
        )
    cap = int(args.max_gib * 2**30)

    def measure(pairs: list[tuple[str, str]], n: int, p: int) -> dict[tuple[str, str], Any]:
        """Measure the (rule, method) pairs on (N, P) in one child; skipped ones say why."""
        results: dict[tuple[str, str], Any] = {}
        limit = min(cap, int(0.85 * available_bytes()))
        runnable = []
        for rule, method in pairs:
            need = estimated_bytes(rule, method, n, p)
            if method.startswith("Flower") and not has_flower:
                results[rule, method] = {"skipped": "flwr not installed"}
            elif rule == "krum" and method == "Flower" and n * n * p > args.flower_krum_max:
                results[rule, method] = {
                    "skipped": f"N²P = {n * n * p:.1e} > --flower-krum-max "
                    f"{args.flower_krum_max:.1e} (its pairwise Python loop would take minutes)"
                }
            elif need > limit:
                results[rule, method] = {
                    "skipped": f"needs ~{need / 2**30:.1f} GiB > cap {limit / 2**30:.1f} GiB"
                }
            else:
                runnable.append((rule, method))
        if runnable:
            spec = {
                "pairs": runnable,
                "n": n,
                "p": p,
                "repeats": repeats,
                "time_cap": args.time_cap,
                "torch_threads": args.torch_threads,
                "spill_dir": args.spill_dir,
            }
            out = run_child(spec)
            for rule, method in runnable:
                results[rule, method] = out.get(f"{rule}/{method}", {"error": out.get("error")})
        return results

    data: dict[str, Any] = {}
    skipped: list[str] = []
    bars = Table("aggregation: bars", ["bar", "measured", "target", "result"])
    t0 = time.monotonic()

    if "fedavg" in args.sections:
        table = Table(
            "aggregation: fedavg (weighted mean) of N float32 updates of P parameters",
            [
                "N",
                "P",
                "method",
                "best s",
                "first s",
                "GB/s",
                "x limit",
                "Flower/this",
                "extra MiB",
                "x model",
                "max err",
            ],
        )
        fed: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
        for n, p in cases:
            got = measure([("fedavg", m) for m in FEDAVG_METHODS], n, p)
            row = fed.setdefault((n, p), {m: got["fedavg", m] for m in FEDAVG_METHODS})
            limit = row["numpy limit"].get("best_s")
            flower = row["Flower aggregate"].get("best_s")
            for method in FEDAVG_METHODS:
                r = row[method]
                if "best_s" not in r:
                    reason = r.get("skipped") or r.get("error")
                    skipped.append(f"fedavg N={n} P={p:,} {method}: {reason}")
                    continue
                extra = r.get("extra_bytes")
                table.row(
                    n,
                    p,
                    method,
                    r["best_s"],
                    r.get("first_s"),
                    n * p * 4 / r["best_s"] / 1e9,
                    None if limit is None else r["best_s"] / limit,
                    None if flower is None else flower / r["best_s"],
                    mib(extra),
                    None if extra is None else extra / (p * 4),
                    r.get("err"),
                )
            print(f"  fedavg N={n} P={p:,} done ({time.monotonic() - t0:.0f} s)", flush=True)
        table.note(
            "best s: best of the repeated calls. first s: the first call on these inputs, whose"
            " allocations are fresh pages (page faults), as in a server's first round."
        )
        table.note("GB/s: input bytes (N x P x 4) / best time. x limit: time / numpy limit's time.")
        table.note("Flower/this: Flower aggregate's time / this method's time (the speed-up).")
        table.note(
            "extra: peak resident memory beyond the inputs during one call, result included;"
            " x model: in model sizes (P x 4 bytes)."
        )
        table.note(
            "Flower aggregate_inplace and 'Quorum strategy, blobs' start from serialised "
            "updates (npy bytes / safetensors blobs) and deserialise inside the timing."
        )
        table.note(
            f"torch intra-op threads: {args.torch_threads}; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other processes add noise)."
        )
        table.print()
        data["fedavg"] = table
        data["fedavg_raw"] = {f"{n}x{p}": v for (n, p), v in fed.items()}

        if target is not None and target in fed:
            r = fed[target]
            ours = r["Quorum fedavg()"].get("best_s")
            flower = r["Flower aggregate"].get("best_s")
            limit = r["numpy limit"].get("best_s")
            tn, tp = target
            if ours and flower:
                bars.row(
                    f"fedavg N={tn} P={tp:,}: speed-up vs Flower aggregate",
                    f"{flower / ours:.2f}x",
                    ">= 8x",
                    bar(flower / ours >= 8),
                )
            if ours and limit:
                bars.row(
                    f"fedavg N={tn} P={tp:,}: time / numpy limit",
                    f"{ours / limit:.2f}x",
                    "<= 1.5x",
                    bar(ours / limit <= 1.5),
                )
            # Flower against the limit: what any implementation reading each update once can
            # reach; first calls: fresh pages, as in a server's first round.
            info = [
                (f"Flower aggregate N={tn} P={tp:,}: time / numpy limit", flower, limit),
                (
                    f"fedavg N={tn} P={tp:,}: speed-up vs Flower, first calls",
                    r["Flower aggregate"].get("first_s"),
                    r["Quorum fedavg()"].get("first_s"),
                ),
                (
                    f"FedAvg strategy N={tn} P={tp:,}: time / numpy limit",
                    r["Quorum FedAvg strategy"].get("best_s"),
                    limit,
                ),
            ]
            for label, top, bottom in info:
                if top and bottom:
                    bars.row(f"(info) {label}", f"{top / bottom:.2f}x", "-", "-")
        worst = [
            (r["Quorum fedavg()"]["extra_bytes"] / (p * 4), n, p)
            for (n, p), r in fed.items()
            if r["Quorum fedavg()"].get("extra_bytes") is not None
        ]
        if worst:
            ratio, wn, wp = max(worst)
            bars.row(
                "fedavg peak extra memory, worst over all N and P",
                f"{ratio:.2f}x model (N={wn}, P={wp:,})",
                "<= 1.5x model",
                bar(ratio <= 1.5),
            )

    if "robust" in args.sections:
        table = Table(
            "aggregation: robust rules on N float32 updates of P parameters",
            ["N", "P", "rule", "method", "best s", "Flower/this", "extra MiB", "x model", "check"],
        )
        rob: dict[str, dict[str, Any]] = {}
        for n, p in cases:
            got = measure([(r, m) for r in args.rules for m in ROBUST_METHODS], n, p)
            for rule in args.rules:
                row = {m: got[rule, m] for m in ROBUST_METHODS}
                rob[f"{rule} {n}x{p}"] = row
                flower = row["Flower"].get("best_s")
                for method in ROBUST_METHODS:
                    r = row[method]
                    if "best_s" not in r:
                        reason = r.get("skipped") or r.get("error")
                        skipped.append(f"{rule} N={n} P={p:,} {method}: {reason}")
                        continue
                    extra = r.get("extra_bytes")
                    checked = (
                        f"update #{r['chosen']}" if "chosen" in r else f"err {r.get('err', 0):.1e}"
                    )
                    table.row(
                        n,
                        p,
                        rule,
                        method,
                        r["best_s"],
                        None if flower is None else flower / r["best_s"],
                        mib(extra),
                        None if extra is None else extra / (p * 4),
                        checked,
                    )
                if rule == "krum" and n == 50 and flower:
                    for method in ("Quorum default budget", "Quorum in RAM"):
                        ours = row[method].get("best_s")
                        if ours:
                            bars.row(
                                f"Krum N=50 P={p:,} ({method}): speed-up vs Flower",
                                f"{flower / ours:.1f}x",
                                ">= 5x",
                                bar(flower / ours >= 5),
                            )
            print(f"  robust N={n} P={p:,} done ({time.monotonic() - t0:.0f} s)", flush=True)
        table.note(
            "Flower/this: Flower's time / this method's time. check: max |error| from a "
            "float64 reference (median, trimmed mean), or the update Krum chose."
        )
        table.note(
            f"trimmed mean beta = {TRIM_BETA}; Krum f = N // 10 (Flower num_malicious = f, "
            "to_keep = 0). Quorum's times include screening (delta norms, flags)."
        )
        table.note(
            "default budget: 256 MiB of stacked updates in RAM, beyond that spilled to a "
            "file (page cache, not counted as resident); in RAM: budget above the inputs."
        )
        table.print()
        data["robust"] = table
        data["robust_raw"] = rob

    for line in skipped:
        bars.note(f"skipped {line}")
    bars.note(
        f"memory cap per measurement: {args.max_gib:g} GiB (the machine's 24 GiB are "
        "shared); estimates count inputs + what each method allocates."
    )
    bars.print()
    data["bars"] = bars
    data["settings"] = {
        "cases": cases,
        "repeats": repeats,
        "time_cap_s": args.time_cap,
        "torch_threads": args.torch_threads,
        "max_gib": args.max_gib,
        "flower_available": has_flower,
        "quick": args.quick,
        "layer_shares": [*LAYER_SHARES, round(1 - sum(LAYER_SHARES), 4)],
    }
    if has_flower:
        import flwr

        data["settings"]["flwr"] = flwr.__version__
    write_results("aggregation", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
