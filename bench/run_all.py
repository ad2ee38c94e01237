"""Run every benchmark in turn (`make bench`): each prints its tables and writes bench/results/.

Each benchmark runs in its own process (so one's memory peak or imports never colour another's
figures), in the order below, with this interpreter (.venv-bench, where Flower is installed).
A benchmark that fails does not stop the others; the summary at the end names it and the exit
status is 1.

    .venv-bench/bin/python bench/run_all.py                 # everything
    .venv-bench/bin/python bench/run_all.py aggregation     # only the names given
    .venv-bench/bin/python bench/run_all.py --quick         # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEART_DATA = ROOT.parent / "shared" / "datasets" / "heart_disease"

# name -> (script, full arguments, --quick arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "aggregation": ("bench/aggregation.py", [], ["--quick"]),
    "serialization": ("bench/serialization.py", [], ["--quick"]),
    "secagg": ("bench/secagg_vs_flower.py", [], ["--quick"]),
    "round_split": ("bench/round_split.py", [], ["--quick"]),
    "flamby_heart": (
        "bench/flamby_heart.py",
        ["--data", str(HEART_DATA)],
        ["--data", str(HEART_DATA), "--quick"],
    ),
    "compression": (
        "bench/compression.py",
        ["--heart-data", str(HEART_DATA)],
        ["--heart-data", str(HEART_DATA), "--quick"],
    ),
    "load": ("bench/load.py", [], ["--quick"]),
    "fuzz_frames": ("bench/fuzz_frames.py", [], ["--quick"]),
    "hostile_flood": ("bench/hostile_flood.py", [], ["--quick"]),
    "demo_time": ("bench/demo_time.py", [], ["--rounds", "5"]),
    "poisoning": ("bench/poisoning.py", [], ["--rounds", "3"]),
    "fairness": ("bench/fairness.py", [], ["--seeds", "1", "--rounds", "5"]),
    "startup": ("bench/startup.py", [], ["--repeat", "2"]),
}


# Benchmarks that start the production stack (Celery with its Redis transport) run with the test
# venv's interpreter when there is one: in .venv-bench, Flower's pins leave pip with an older
# Celery whose kombu refuses the redis-py it got ("Redis transport requires redis-py 6.1.0").
# They do not use Flower.
PRODUCTION_STACK = {"load"}
TEST_VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def main() -> int:
    """Run the chosen benchmarks; return 0 when all of them succeeded."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help=f"a subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    outcomes: list[tuple[str, int, float]] = []
    for name in names:
        script, full, quick = BENCHMARKS[name]
        python = sys.executable
        if name in PRODUCTION_STACK and TEST_VENV_PYTHON.exists():
            python = str(TEST_VENV_PYTHON)
        cmd = [python, script, *(quick if args.quick else full)]
        print(f"=== {name}: {' '.join(cmd[1:])} ({python})", flush=True)
        started = time.monotonic()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        outcomes.append((name, rc, time.monotonic() - started))
        print(flush=True)

    print("=== summary")
    for name, rc, seconds in outcomes:
        print(f"{name:>14}  {'ok' if rc == 0 else f'FAILED (exit {rc})':<16} {seconds:8.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
