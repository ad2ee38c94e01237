"""`manage.py demo` serving the dashboard leaves a working federation, and stops it cleanly.

The demo runs its plan, then keeps its site agents (real `quorum-agent` processes) connected
while it serves: a data scientist who signs in and presses "Start a run" on the plan the demo
left approved gets a run that trains at once. SIGTERM then stops the agents and the server, and
no agent process outlives the demo.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from federation.server import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


class Demo:
    """A `manage.py demo` process whose stdout is read line by line as it comes."""

    def __init__(self, home: Path, port: int) -> None:
        env = {**os.environ, "QUORUM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        env.pop("DATABASE_URL", None)
        env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "demo",
                "--scenario",
                "finance",
                "--rounds",
                "1",
                "--sites",
                "2",
                "--max-rows",
                "200",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"the demo never printed {text!r}:\n{self.output[-4000:]}")


class Browser:
    """A signed-in dashboard session over plain HTTP (cookies and CSRF as a browser has them)."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def csrf(self) -> str:
        return next(c.value for c in self.jar if c.name == "csrftoken")

    def get(self, path: str) -> tuple[int, str, bytes]:
        with self.opener.open(self.base + path, timeout=30) as response:
            return response.status, response.url, response.read()

    def post(self, path: str, data: dict[str, str]) -> tuple[int, str, bytes]:
        body = urllib.parse.urlencode({**data, "csrfmiddlewaretoken": self.csrf()}).encode()
        request = urllib.request.Request(
            self.base + path, data=body, headers={"Referer": self.base + path}
        )
        with self.opener.open(request, timeout=30) as response:
            return response.status, response.url, response.read()

    def login(self, username: str, password: str) -> None:
        self.get("/login/")
        _, url, _ = self.post("/login/", {"username": username, "password": password})
        assert "/login/" not in url, f"login as {username} failed"


def alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_demo_keeps_its_agents_so_a_dashboard_run_trains_and_sigterm_stops_everything(
    tmp_path: Path,
) -> None:
    port = free_port()
    demo = Demo(tmp_path, port)
    try:
        demo.wait_for("Dashboard: ", timeout=240)
        out = demo.output
        pids = [int(p) for p in re.findall(r"^\s+\w+\s+pid (\d+)\s+log ", out, re.M)]
        assert len(pids) == 2 and all(alive(pid) for pid in pids), out
        assert "-m clientagent run --config" in out and "manage.py serve" in out
        password = re.search(r"^scientist\s+data_scientist\s+.*\s(\S+)$", out, re.M).group(1)
        plan_path = re.search(r"open http://127\.0\.0\.1:\d+(/plans/\d+/) and press", out).group(1)

        base = f"http://127.0.0.1:{port}"
        status, _, body = Browser(base).get("/api/v1/")
        assert status == 200 and json.loads(body)["endpoints"], body[:500]

        # The scientist presses "Start a run" on the plan the demo left approved.
        scientist = Browser(base)
        scientist.login("scientist", password)
        _, _, page = scientist.get(plan_path)
        assert b'id="start-run"' in page
        _, run_url, _ = scientist.post(plan_path + "start/", {})
        run_path = urllib.parse.urlparse(run_url).path
        assert re.fullmatch(r"/runs/\d+/", run_path), run_url

        def finished() -> bool:
            data = json.loads(scientist.get(run_path + "live.json")[2])
            return not data["active"]

        deadline = time.monotonic() + 180
        while not finished():
            assert time.monotonic() < deadline, f"the run did not finish:\n{demo.output[-3000:]}"
            assert demo.proc.poll() is None, demo.output[-3000:]
            time.sleep(0.5)
        live = json.loads(scientist.get(run_path + "live.json")[2])
        assert live["status"] == "completed" and live["rounds_completed"] == 1, live["summary"]

        demo.proc.send_signal(signal.SIGTERM)
        assert demo.proc.wait(timeout=60) == 0, demo.output[-3000:]
        demo.reader.join(timeout=10)
        assert "Stopping 2 site agents and the server..." in demo.output
        assert demo.lines[-1] == "Stopped."
        assert [pid for pid in pids if alive(pid)] == []
        for site in ("northgate", "riverside"):
            log = (tmp_path / "demo" / "finance" / "sites" / site / "agent.log").read_text()
            assert "Traceback" not in log, log[-2000:]
    finally:
        if demo.proc.poll() is None:
            demo.proc.kill()
            demo.proc.wait()
