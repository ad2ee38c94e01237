"""The plan language and the agent's command line load without torch, Opacus or scipy.

An operator's ``quorum-agent --help``, ``init`` or ``check`` and every ``fedcore.plan`` read
would otherwise pay torch's start-up (seconds per process; the quickstart starts a dozen). The
plan language takes its constants from the torch-free modules the torch code imports too
(fedcore.model_spec, fedcore.compression_spec, fedcore.aggregation_names, ...).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIGHT = (
    "fedcore.plan",
    "fedcore.approvals",
    "clientagent.config",
    "clientagent.onboarding",
    "clientagent.cli",
)
HEAVY = ("torch", "opacus", "scipy")  # scipy: about a second, only for p-values


def _chain(importtime: str, heavy: str) -> str:
    """The import chain that first reached ``heavy``, from ``python -X importtime`` output.

    importtime prints a module after its imports, indented by depth; the chain is ``heavy``
    followed by the first module below it in each shallower level (its importers).
    """
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        name = line.rsplit("|", 1)[1]
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((depth, name.strip()))
    for index, (depth, name) in enumerate(rows):
        if name == heavy:
            chain = [name]
            for later_depth, later in rows[index + 1 :]:
                if later_depth < depth:
                    chain.append(later)
                    depth = later_depth
            return " <- ".join(chain)
    return f"{heavy} (not found in the importtime output)"


def test_the_plan_language_and_the_agent_cli_import_no_torch() -> None:
    code = (
        f"import sys\nimport {', '.join(LIGHT)}\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    loaded = [name for name in done.stdout.strip().split(",") if name]
    chains = "\n".join(_chain(done.stderr, name) for name in loaded)
    assert loaded == [], f"importing {', '.join(LIGHT)} loaded {loaded}:\n{chains}"


def test_the_chain_names_who_imported_the_heavy_module() -> None:
    importtime = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:        10 |         10 |       torch\n"
        "import time:        10 |         20 |     fedcore.models\n"
        "import time:        10 |         10 |     fedcore.tabular\n"
        "import time:        10 |         40 |   fedcore.plan.spec\n"
        "import time:        10 |         50 | fedcore.plan\n"
    )
    assert (
        _chain(importtime, "torch")
        == "torch <- fedcore.models <- fedcore.plan.spec <- fedcore.plan"
    )


# A plan with a non-default strategy and parameters, and one whose parameter is out of range: the
# strategies' parameter checks (fedcore.aggregation_params) run without torch.
CHECK_PLANS = """
import json, sys
from fedcore.plan import json_schema, key_table, openapi_schema, parse_plan, plan_errors

spec = {
    "model": {"kind": "mlp", "hidden": [8]},
    "schema": {
        "columns": [{"name": "age", "type": "numeric"}, {"name": "sex", "type": "categorical"}],
        "target": {"column": "y", "positive": ["yes"]},
    },
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 32, "lr": 0.01},
    "aggregation": {"strategy": "fedadam", "server_lr": 0.1, "beta1": 0.8, "tau": 0.01},
}
plan = parse_plan(spec)
bad = plan_errors({**spec, "aggregation": {"strategy": "trimmed_mean", "beta": 0.5}})
print(json.dumps({
    "strategy": plan.aggregation.strategy,
    "params": plan.aggregation.params,
    "bad": bad,
    "schema": "multi_krum" in json.dumps(json_schema()) and bool(openapi_schema()),
    "table": "| `aggregation.*` (krum) | number | strategy default | f," in key_table(),
    "heavy": [m for m in HEAVY if m in sys.modules],
}))
"""


def test_checking_a_plans_aggregation_section_and_building_its_schema_load_no_torch() -> None:
    code = f"HEAVY = {HEAVY!r}\n{CHECK_PLANS}"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    result = json.loads(done.stdout)
    chains = "\n".join(_chain(done.stderr, name) for name in result["heavy"])
    assert result["heavy"] == [], f"checking a plan loaded {result['heavy']}:\n{chains}"
    assert result["strategy"] == "fedadam"
    assert result["params"] == {"server_lr": 0.1, "beta1": 0.8, "tau": 0.01}
    assert result["bad"] == {
        "aggregation": "trimmed_mean: beta must be a finite number in [0, 0.5), got 0.5"
    }
    assert result["schema"] is True
    assert result["table"] is True
