"""Browser tests: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright against a
real `manage.py serve` process that shares the test database (as the e2e tests do).

Every page is loaded with the network cut to localhost: any request to another host is aborted
and recorded, and the test fails if a page asked for one (no CDN, works offline). Console errors
and uncaught page errors fail the test too.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.e2e import harness

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"  # gitignored
DOC_SCREENSHOTS = ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder `browser`; skip them all when Chromium is not installed."""
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.browser)
            if not CHROMIUM.exists():
                item.add_marker(
                    pytest.mark.skip(
                        reason=f"{CHROMIUM} is not installed (apt-get install chromium); "
                        "Playwright's own browser download is not used"
                    )
                )


ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium for a module's tests; every context in it has a fresh profile.

    Playwright's sync API keeps an asyncio loop set on this thread, which makes Django refuse
    ORM calls here ("async context"). The test thread never shares a connection with that loop,
    so the refusal is lifted while the browser lives; servers started meanwhile do not inherit
    it (see ``server_env``).
    """
    from playwright.sync_api import sync_playwright

    previous = os.environ.get(ASYNC_UNSAFE)
    os.environ[ASYNC_UNSAFE] = "true"
    try:
        with sync_playwright() as playwright:
            # launch() runs Chromium on a new temporary user data dir, removed when it closes.
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop(ASYNC_UNSAFE, None)
        else:
            os.environ[ASYNC_UNSAFE] = previous


def without_async_unsafe(proc: harness.Proc) -> harness.Proc:
    """A child process keeps Django's async-safety checks, whatever this test process set."""
    proc.env.pop(ASYNC_UNSAFE, None)
    return proc


@dataclass
class Watch:
    """What pages of a context did wrong: console errors, page errors, off-host requests."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return (
            [f"console error: {e}" for e in self.console_errors]
            + [f"page error: {e}" for e in self.page_errors]
            + [f"request off localhost: {u}" for u in self.blocked]
        )


class Session:
    """A browser context for one user, offline but for 127.0.0.1, watched for errors."""

    def __init__(self, browser: Any, base_url: str, *, viewport: dict[str, int] = VIEWPORT):
        self.base_url = base_url.rstrip("/")
        self.watch = Watch()
        self.context = browser.new_context(viewport=viewport, accept_downloads=True)
        self.context.set_default_timeout(20_000)
        self.context.route("**/*", self._only_localhost)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.watch.page_errors.append(str(exc)))

    def _only_localhost(self, route: Any) -> None:
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.watch.blocked.append(route.request.url)
            route.abort()

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.watch.console_errors.append(f"{message.text} ({self.page.url})")

    def goto(self, path: str) -> Any:
        """Open a page and wait until its network is quiet; returns the response."""
        response = self.page.goto(self.base_url + path)
        self.page.wait_for_load_state("networkidle")
        return response

    def login(self, username: str, password: str) -> None:
        """Sign in through the login form."""
        self.goto("/login/")
        self.page.fill("#id_username", username)
        self.page.fill("#id_password", password)
        with self.page.expect_navigation():
            self.page.click("form.form button[type=submit]")
        self.page.wait_for_load_state("networkidle")
        assert "/login/" not in self.page.url, f"login as {username} failed"

    def screenshot(self, name: str, *, docs: bool = False, docs_from: str = "") -> None:
        """Save the whole page into tests/browser/screenshots; with `docs`, also the viewport
        (1280x800) into docs/screenshots for the README, scrolled to `docs_from` if given."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
        if docs:
            DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            if docs_from:
                self.page.eval_on_selector(
                    docs_from,
                    "el => window.scrollTo(0, el.getBoundingClientRect().top + scrollY - 12)",
                )
            self.page.screenshot(path=str(DOC_SCREENSHOTS / f"{name}.png"))
            self.page.evaluate("window.scrollTo(0, 0)")

    def close(self) -> None:
        self.context.close()


def _wait_for_port(port: int, proc: harness.Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.popen is not None and proc.popen.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"the server did not listen on {port}\n{proc.tail()}")


@pytest.fixture
def live_server_proc(tmp_path: Path) -> Iterator[tuple[str, int, harness.Proc]]:
    """`manage.py serve` on a free port, on this test's database (transactional tests only)."""
    from federation.server import free_port

    port = free_port()
    proc = without_async_unsafe(harness.server(tmp_path, port)).start()
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}", port, proc
    finally:
        proc.stop()
