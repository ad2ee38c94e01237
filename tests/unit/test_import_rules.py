"""House rule: fedcore, clientagent and the quorum client never import Django, Channels,
Celery or the server apps."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "django",
    "rest_framework",
    "channels",
    "celery",
    "federation",
    "dashboard",
    "config",
    "pickle",
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", ["fedcore", "clientagent", "quorum"])
def test_pure_packages_import_nothing_forbidden(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN)
        for path in sorted((ROOT / package).rglob("*.py"))
        if imported_roots(path) & FORBIDDEN
    }
    assert offenders == {}


def test_importing_the_agent_loads_no_server_module() -> None:
    code = (
        "import sys, fedcore.protocol, fedcore.tensors, fedcore.tabular, fedcore.aggregation, "
        "fedcore.training, clientagent.cli, clientagent.connection, quorum.cli, quorum.client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'django', 'channels', 'celery', 'federation', 'dashboard'})\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == ""
