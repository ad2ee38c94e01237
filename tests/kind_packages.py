"""The example model-kind package (packages/quorum-resmlp) built into a wheel and installed into
a folder of its own, as a site operator would install it (never into the shared venv)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

RESMLP = Path(__file__).resolve().parents[1] / "packages" / "quorum-resmlp"


def build_wheel(out: Path, source: Path = RESMLP) -> Path:
    """``pip wheel`` of a copy of a package folder (offline, no build isolation: setuptools
    leaves build/ and egg-info behind, so never in the source tree); the wheel's path."""
    copy = out / "source"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "tests"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(out),
            str(copy),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def install(wheel: Path, target: Path) -> Path:
    """``pip install --target``: the installed folder, to put on ``sys.path``."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return target
