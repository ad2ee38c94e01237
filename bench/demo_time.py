"""Time the healthcare demo end to end and check its accuracy bars; prints a table.

Runs `manage.py demo --rounds 20 --no-serve --json` (real server, one real agent process per
site) in a fresh QUORUM_HOME for each seed, and reports the wall time of the whole command (from
process start: imports, migrations, agent start-up, 20 rounds, baselines) with the AUCs.

    .venv/bin/python bench/demo_time.py [--seeds 0 1 2] [--rounds 20] [--scenario healthcare]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(scenario: str, rounds: int, seed: int) -> dict:
    """Run the demo once in a fresh home; return its JSON result plus the measured wall time."""
    with tempfile.TemporaryDirectory(prefix="quorum-bench-") as home:
        env = {**os.environ, "QUORUM_HOME": home}
        env.pop("DATABASE_URL", None)
        started = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "manage.py",
                "demo",
                "--scenario",
                scenario,
                "--rounds",
                str(rounds),
                "--seed",
                str(seed),
                "--no-serve",
                "--json",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(
            f"demo failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    return result


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", default="healthcare", choices=["healthcare", "finance"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()

    print(f"demo benchmark: scenario {args.scenario}, {args.rounds} rounds, {os.cpu_count()} CPUs")
    header = f"{'seed':>4} {'wall s':>7} {'federation s':>12} {'fed AUC':>8} {'central AUC':>11} {'gap':>7} {'local mean':>10}  bars"
    print(header)
    print("-" * len(header))
    for seed in args.seeds:
        r = run_demo(args.scenario, args.rounds, seed)
        fed, central = r["federated"]["auc"], r["centralized"]["auc"]
        local_mean = sum(m["auc"] for m in r["local_only"].values()) / len(r["local_only"])
        bars = []
        bars.append("time<120s " + ("ok" if r["wall_seconds"] < 120 else "MISSED"))
        bars.append("|gap|<=0.02 " + ("ok" if abs(fed - central) <= 0.02 else "MISSED"))
        bars.append(">local mean " + ("ok" if fed > local_mean else "MISSED"))
        print(
            f"{seed:>4} {r['wall_seconds']:>7.1f} {r['federation_seconds']:>12.1f} {fed:>8.4f} "
            f"{central:>11.4f} {fed - central:>+7.4f} {local_mean:>10.4f}  {', '.join(bars)}"
        )


if __name__ == "__main__":
    main()
