"""A real federation for benchmarks: the ASGI server in this process, one agent process per site.

Nothing is simulated: each site's data lives in its own folder with its own ``site.toml``; a real
``quorum-agent run`` process per site connects over a real websocket, verifies the server's
signed grants and trains locally; the server runs the orchestrator as in the embedded profile.
The consortium is built the way ``manage.py demo`` builds one (stewards register silos, the
admin admits them, a data scientist proposes, every steward approves the plan's hash), in a fresh
``QUORUM_HOME`` (a temporary folder: SQLite database, blobs, keys), so a bench never touches the
developer's ``var/``.

The agents stay connected between runs: :meth:`LiveFederation.run_plan` proposes, approves and
runs one plan after another on the same processes (what a consortium does over time).

    fed = LiveFederation.start({"site-a": (csv_path, schema), ...})
    try:
        result = fed.run_plan(spec, name="fedavg seed 0")   # RunResult: the run and final weights
    finally:
        fed.close()

Call :func:`configure_django` before importing anything from ``federation``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def configure_django(home: Path | None = None) -> Path:
    """Point Django at a fresh QUORUM_HOME (temporary unless given), set it up and migrate.

    A temporary home (database, blobs, keys, site folders) is removed when the process exits;
    set QUORUM_BENCH_KEEP=1 to keep it for a look at the agents' logs.
    """
    if home is None:
        home = Path(tempfile.mkdtemp(prefix="quorum-bench-"))
        if not os.environ.get("QUORUM_BENCH_KEEP"):
            atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["QUORUM_HOME"] = str(home)
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("QUORUM_BLOB_DIR", None)
    os.environ.pop("QUORUM_SIGNING_KEY_FILE", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("QUORUM_SWEEP_SECONDS", "0.5")
    os.environ.setdefault("QUORUM_HEARTBEAT_SECONDS", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    return home


@dataclass
class RunResult:
    """One finished run: the Run row and the final global weights."""

    run: Any  # federation.models.Run
    state: dict[str, Any]  # the last ModelVersion's tensors
    seconds: float  # run_start to the run's end, as this process saw it


class LiveFederation:
    """A consortium with one silo per site, the server thread and the agent processes."""

    def __init__(self) -> None:
        self.home = Path(os.environ["QUORUM_HOME"])
        self.server: Any = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.silos: list[Any] = []
        self.stewards: list[Any] = []
        self.scientist: Any = None
        self.consortium: Any = None

    @classmethod
    def start(
        cls,
        sites: dict[str, tuple[Path, dict[str, Any]]],
        *,
        timeout: float = 120.0,
        agents_per_process: int = 1,
    ) -> LiveFederation:
        """Create the consortium, start the server and one agent per site; wait until online.

        Args:
            sites: site name -> (its data file, the schema its steward registers).
            agents_per_process: 1 (default): a ``quorum-agent run`` process per site; more:
                that many agents share a process (``bench/_agents.py``), for many sites.
        """
        fed = cls()
        try:
            tokens = fed._create(sites)
            fed._serve()
            fed._launch(sites, tokens, agents_per_process=agents_per_process)
            fed._wait_online(timeout)
        except BaseException:
            fed.close()
            raise
        return fed

    def _create(self, sites: dict[str, tuple[Path, dict[str, Any]]]) -> dict[str, str]:
        from django.contrib.auth import get_user_model
        from django.db import transaction

        from federation.models import Consortium, Membership, Organization, Role
        from federation.services.members import membership_accept, membership_add
        from federation.services.silos import silo_admit, silo_register

        users = get_user_model()
        with transaction.atomic():
            self.consortium = Consortium.objects.create(
                name=f"bench consortium {os.getpid()}",
                description="benchmark",
                require_steward_unanimity=True,
                org_quorum_mode=Consortium.QuorumMode.FRACTION,
                org_quorum_value=0.5,
            )
            office = Organization.objects.create(
                consortium=self.consortium,
                name="Consortium office",
                kind=Organization.Kind.RESEARCH_LAB,
            )
            admin = users.objects.create(username="bench-admin", is_staff=True)
            Membership.objects.create(user=admin, organization=office, role=Role.CONSORTIUM_ADMIN)
            self.scientist = users.objects.create(username="bench-scientist")
            membership_add(
                actor=admin, user=self.scientist, organization=office, role=Role.DATA_SCIENTIST
            )
            tokens: dict[str, str] = {}
            for site, (path, schema) in sites.items():
                org = Organization.objects.create(
                    consortium=self.consortium,
                    name=f"{site} hospital",
                    kind=Organization.Kind.HOSPITAL,
                )
                # The org's own admin (invited by the consortium admin) grants the steward role.
                org_admin = users.objects.create(username=f"bench-orgadmin-{site}")
                membership_accept(
                    actor=org_admin,
                    membership=membership_add(
                        actor=admin, user=org_admin, organization=org, role=Role.ORG_ADMIN
                    ),
                )
                steward = users.objects.create(username=f"bench-steward-{site}")
                membership_add(
                    actor=org_admin, user=steward, organization=org, role=Role.DATA_STEWARD
                )
                with open(path, "rb") as fh:
                    rows = sum(1 for _ in fh) - 1  # data rows under the header
                silo = silo_register(
                    actor=steward,
                    organization=org,
                    name=site,
                    description=f"bench site {site}",
                    schema=schema,
                    row_count=rows,
                    location=str(path),
                )
                tokens[site] = silo_admit(actor=admin, silo=silo)
                self.silos.append(silo)
                self.stewards.append(steward)
        return tokens

    def _serve(self) -> None:
        from federation.server import ServerThread, free_port

        self.server = ServerThread("127.0.0.1", free_port("127.0.0.1"))
        self.server.start()
        import logging

        # The server's log is for operators; a benchmark prints its own lines.
        for name in ("quorum", "uvicorn", "django"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def _launch(
        self,
        sites: dict[str, tuple[Path, dict[str, Any]]],
        tokens: dict[str, str],
        *,
        agents_per_process: int = 1,
    ) -> None:
        from federation.signing import server_public_key_text

        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        key = server_public_key_text()
        group: list[tuple[str, Path]] = []
        for site, (path, _) in sites.items():
            folder = self.home / "sites" / site
            folder.mkdir(parents=True, exist_ok=True)
            data = folder / Path(path).name
            if Path(path).resolve() != data.resolve():
                shutil.copyfile(path, data)
            (folder / "token.txt").write_text(tokens[site] + "\n")
            os.chmod(folder / "token.txt", 0o600)
            (folder / "site.toml").write_text(
                f'[server]\nurl = "{self.server.ws_url}"\ntoken_file = "token.txt"\n'
                f'public_key = "{key}"\n\n[data]\npath = "{data.name}"\n\n'
                f'[agent]\nname = "{site}"\n'
            )
            if agents_per_process > 1:
                group.append((site, folder / "site.toml"))
                if len(group) == agents_per_process:
                    self._launch_group(group, env)
                    group = []
                continue
            log = open(folder / "agent.log", "wb")  # noqa: SIM115 - the child owns it
            self.agents[site] = subprocess.Popen(
                [sys.executable, "-m", "clientagent", "run", "--config", str(folder / "site.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
            )
            log.close()
        if group:
            self._launch_group(group, env)

    def _launch_group(self, group: list[tuple[str, Path]], env: dict[str, str]) -> None:
        """One process running the agents of several sites (bench/_agents.py)."""
        log = open(group[0][1].parent / "agent.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench._agents", *(str(path) for _, path in group)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
        log.close()
        for site, _ in group:
            self.agents[site] = proc  # the sites of one process share it

    def _wait_online(self, timeout: float) -> None:
        from federation.models import Silo

        deadline = time.monotonic() + timeout
        names = [silo.name for silo in self.silos]
        while time.monotonic() < deadline:
            online = Silo.objects.filter(
                consortium=self.consortium, name__in=names, connection_id__isnull=False
            ).count()
            if online == len(names):
                return
            self._check_agents()
            time.sleep(0.2)
        raise RuntimeError(f"not every agent connected within {timeout:.0f} s\n{self.log_tails()}")

    def _check_agents(self) -> None:
        dead = [site for site, proc in self.agents.items() if proc.poll() is not None]
        if dead:
            raise RuntimeError(f"agent(s) {', '.join(dead)} exited\n{self.log_tails()}")

    def run_plan(self, spec: dict[str, Any], *, name: str, timeout: float = 600.0) -> RunResult:
        """Propose ``spec`` for every silo, have every steward approve it, run it to the end."""
        from fedcore import tensors
        from federation.models import ModelVersion, Run
        from federation.services.plans import plan_approve, plan_propose
        from federation.services.runs import run_start
        from federation.storage import blob_store

        plan = plan_propose(
            actor=self.scientist,
            consortium=self.consortium,
            name=name,
            description="benchmark run",
            spec=spec,
            silos=self.silos,
            submit=True,
        )
        for steward in self.stewards:
            plan_approve(actor=steward, plan=plan, plan_hash=plan.current_version.spec_hash)
        plan.refresh_from_db()
        started = time.monotonic()
        run = run_start(actor=self.scientist, plan=plan)
        deadline = started + timeout
        while True:
            run.refresh_from_db()
            if not run.active:
                break
            self._check_agents()
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {name!r} did not finish in {timeout:.0f} s")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        if run.status != Run.Status.COMPLETED:
            raise RuntimeError(f"run {name!r} {run.status}: {run.error}\n{self.log_tails()}")
        final = ModelVersion.objects.filter(run=run).order_by("-number").first()
        state = tensors.decode_state_dict(blob_store().get(final.blob_key))
        return RunResult(run=run, state=state, seconds=seconds)

    def log_tails(self, lines: int = 10) -> str:
        """The end of every agent's log."""
        out = []
        for site in self.agents:
            path = self.home / "sites" / site / "agent.log"
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                tail = []
            out.append(f"--- {site} ({path}):\n" + "\n".join(tail))
        return "\n".join(out)

    def close(self) -> None:
        """Stop the agents (the processes this object started) and the server."""
        procs = list({id(proc): proc for proc in self.agents.values()}.values())
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.server is not None:
            self.server.stop()
