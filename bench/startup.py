"""Start-up time of the commands an operator types: fresh processes, median of several runs.

Each command runs ``--repeat`` times in a fresh interpreter with PYTHONPATH = the checkout
measured. ``--root`` may be given more than once (e.g. an older commit extracted with
``git archive``): the checkouts then take turns run by run, so a load that comes and goes on a
shared machine weighs on all of them alike. The table shows the median wall time and the median
CPU time (user + system of the child: what the start-up costs, much less sensitive to other
jobs than wall time), and which heavy libraries the import loaded. The agent's commands that
train nothing should load no torch.

    .venv/bin/python bench/startup.py [--repeat 5] [--root DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT, Table, write_results

HEAVY = ("torch", "opacus", "scipy", "pandas")
# A plan with a non-default strategy and parameters: validating it checks them.
PLAN = {
    "model": {"kind": "mlp", "hidden": [8]},
    "schema": {
        "columns": [{"name": "age", "type": "numeric"}, {"name": "sex", "type": "categorical"}],
        "target": {"column": "y", "positive": ["yes"]},
    },
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 32, "lr": 0.01},
    "aggregation": {"strategy": "fedadam", "server_lr": 0.1, "beta1": 0.8, "tau": 0.01},
}
PLAN_FILE = Path(tempfile.gettempdir()) / "quorum-bench-startup-plan.json"
VALIDATE = "python -m quorum plan validate PLAN"
COMMANDS: dict[str, list[str]] = {
    "import fedcore.plan": ["-c", "import fedcore.plan"],
    "import clientagent.cli": ["-c", "import clientagent.cli"],
    "python -m clientagent --help": ["-m", "clientagent", "--help"],
    "python -m quorum --help": ["-m", "quorum", "--help"],
    VALIDATE: ["-m", "quorum", "plan", "validate", str(PLAN_FILE)],
}
# What runs before the heavy libraries are listed: an import, or the check the command does.
LOADED = {
    "import fedcore.plan": "import fedcore.plan",
    "import clientagent.cli": "import clientagent.cli",
    VALIDATE: f"from quorum.planfile import read_plan_file; read_plan_file({str(PLAN_FILE)!r})",
}


def run_once(root: Path, args: list[str]) -> tuple[float, float]:
    """One run of ``python ARGS`` with ``root`` first on the path: (wall s, CPU s)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} in {root} exited with {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def heavy_loaded(root: Path, work: str) -> str:
    """The heavy libraries running ``work`` loads, comma-separated ('-' for none)."""
    code = f"import sys\n{work}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip() or "-"


def main() -> None:
    """Run every command, print the table, write bench/results/startup.json."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--root",
        type=Path,
        action="append",
        help="a checkout to measure (repeatable; default: this one)",
    )
    args = parser.parse_args()
    roots = [root.resolve() for root in args.root or [ROOT]]
    PLAN_FILE.write_text(json.dumps(PLAN))

    load_before = os.getloadavg()[0]
    table = Table(
        f"start-up: {args.repeat} runs each, {os.cpu_count()} CPUs",
        ["command", "checkout", "wall median s", "wall min s", "CPU median s", "loads"],
    )
    for name, command in COMMANDS.items():
        runs: dict[Path, list[tuple[float, float]]] = {root: [] for root in roots}
        for _ in range(args.repeat):
            for root in roots:
                runs[root].append(run_once(root, command))
        for root in roots:
            walls = [wall for wall, _ in runs[root]]
            cpus = [cpu for _, cpu in runs[root]]
            loads = heavy_loaded(root, LOADED[name]) if name in LOADED else ""
            table.row(
                name,
                str(root),
                statistics.median(walls),
                min(walls),
                statistics.median(cpus),
                loads,
            )
    table.note("a fresh process each run, interpreter start-up included")
    table.note(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    table.print()
    write_results("startup", {"startup": table})


if __name__ == "__main__":
    main()
