"""The same plan through Flower 1.42's deployment engine, on loopback, timed per round.

    flower = FlowerDeployment.start(folder, sites)      # a SuperLink and one SuperNode per site
    try:
        ends = flower.run(rounds)                        # wall time of each round's end
    finally:
        flower.close()

Everything runs from ``.venv-bench`` (``make install-bench``: flwr==1.42.0 beside this project,
installed there in editable mode so the apps import ``clientagent`` and ``fedcore``):

* ``flower-superlink --insecure --host 127.0.0.1 --port P`` (one HTTP port for the Fleet,
  Control and Runtime APIs in 1.42; runtime dependency installation off: the app's
  dependencies are already installed). It starts the ServerApp of each run in a subprocess.
* per site ``flower-supernode --insecure --superlink 127.0.0.1:P --port Q_i --node-config
  'site="..." bench-dir="..."'``, which starts a ClientApp subprocess per message it receives;
* ``flwr run bench/flower_app <connection>`` with a throw-away ``FLWR_HOME`` whose
  ``config.toml`` names the SuperLink (insecure, 127.0.0.1).

``folder`` holds what the apps read: ``settings.json`` (the plan, its hash, the fitted
preprocessing, the rounds), ``initial.safetensors`` (the initial model) and one ``<site>.csv``
per site; the ServerApp appends each round's end to ``rounds.jsonl`` (round 0: before round 1).
Nothing listens on anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = Path(os.environ.get("QUORUM_BENCH_VENV", ROOT / ".venv-bench"))
APP_DIR = ROOT / "bench" / "flower_app"


def available() -> str | None:
    """None when Flower's commands are installed, else why not (what to run)."""
    for command in ("flower-superlink", "flower-supernode", "flwr"):
        if not (BENCH_VENV / "bin" / command).exists():
            return f"{BENCH_VENV / 'bin' / command} is missing: run `make install-bench`"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited:\n{log.read_text(errors='replace')[-2000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@dataclass
class FlowerDeployment:
    """A SuperLink and its SuperNodes, the processes this object started."""

    folder: Path
    sites: list[str]
    port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, folder: Path, sites: list[str], *, timeout: float = 60.0) -> FlowerDeployment:
        """Start the SuperLink, then one SuperNode per site (each a separate process)."""
        deployment = cls(folder=folder, sites=sites)
        home = folder / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        deployment.port = _free_port()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
            f'address = "127.0.0.1:{deployment.port}"\ninsecure = true\n'
        )
        bin_dir = BENCH_VENV / "bin"
        deployment.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        deployment.env.pop("VIRTUAL_ENV", None)
        try:
            log = folder / "superlink.log"
            link = deployment._spawn(
                [
                    str(bin_dir / "flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(deployment.port),
                    "--disable-runtime-dependency-installation",
                ],
                log,
            )
            _wait_port(deployment.port, link, log, timeout)
            for site in sites:
                deployment._spawn(
                    [
                        str(bin_dir / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{deployment.port}",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        f'site="{site}" bench-dir="{folder}"',
                    ],
                    folder / f"supernode-{site}.log",
                )
        except BaseException:
            deployment.close()
            raise
        return deployment

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.folder,
                start_new_session=True,  # its ServerApp/ClientApp children go with it
            )
        self.procs.append(proc)
        return proc

    def run(self, rounds: int, *, timeout: float = 3600.0) -> list[dict[str, float]]:
        """``flwr run`` the app for ``rounds`` rounds; each round's end as the ServerApp saw it.

        Returns rounds + 1 stamps ``{"round", "time", "slowest_clientapp_seconds"}``: [0] is
        just before round 1, [k] the end of round k (``time``: wall clock).
        """
        stamps = self.folder / "rounds.jsonl"
        stamps.unlink(missing_ok=True)
        overrides = (
            f'bench-dir="{self.folder}" num-server-rounds={rounds} min-nodes={len(self.sites)}'
        )
        submitted = subprocess.run(
            [str(BENCH_VENV / "bin" / "flwr"), "run", str(APP_DIR), "bench", "-c", overrides],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if submitted.returncode != 0:
            raise RuntimeError(
                f"flwr run failed ({submitted.returncode}):\n{submitted.stdout}\n{submitted.stderr}"
            )
        deadline = time.monotonic() + timeout
        ends: list[dict[str, float]] = []
        while time.monotonic() < deadline:
            if stamps.exists():
                ends = [json.loads(line) for line in stamps.read_text().splitlines()]
            if len(ends) >= rounds + 1:
                return ends
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited; logs in {self.folder}")
            time.sleep(0.2)
        raise RuntimeError(
            f"Flower finished {max(0, len(ends) - 1)} of {rounds} rounds in {timeout:.0f} s; "
            f"logs in {self.folder}"
        )

    def close(self) -> None:
        """Stop every process this object started (and their process groups)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self.procs.clear()


def write_inputs(
    folder: Path,
    *,
    site_files: dict[str, Path],
    plan: dict,
    plan_hash: str,
    preprocessing: dict,
    initial: bytes,
    rounds: int,
) -> None:
    """The apps' inputs: the very files, plan, preprocessing and initial model Quorum used."""
    folder.mkdir(parents=True, exist_ok=True)
    for site, path in site_files.items():
        if Path(path).resolve() != (folder / f"{site}.csv").resolve():
            shutil.copyfile(path, folder / f"{site}.csv")
    (folder / "settings.json").write_text(
        json.dumps(
            {"plan": plan, "plan_hash": plan_hash, "preprocessing": preprocessing, "rounds": rounds}
        )
    )
    (folder / "initial.safetensors").write_bytes(initial)
