"""TLS with a pinned CA (issue 13 part 4): the real server behind a TLS-terminating proxy started
in the test (certificates made with ``cryptography``). A real agent whose ``[server] ca_file`` is
the consortium's CA connects; one pinning another CA refuses the server's certificate and never
says hello."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.server import free_port
from federation.services.silos import silo_issue_token
from tests.e2e import harness
from tests.factories import ConsortiumFactory, SiloFactory
from tests.tls_certs import TlsProxy, make_ca, make_server_cert, server_context

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[harness.Proc, TlsProxy, Path]]:
    """The server on a plain loopback port, reachable with TLS through the proxy; the CA file."""
    port = free_port()
    proc = harness.server(tmp_path, port)
    proc.start()
    ca = make_ca(tmp_path / "pki", "consortium-ca")
    proxy = TlsProxy(server_context(make_server_cert(tmp_path / "pki", ca)), port).start()
    try:
        harness.wait_until(
            lambda: harness.port_open(port), timeout=60, what="the server", procs=[proc]
        )
        yield proc, proxy, ca.cert_file
    finally:
        proxy.stop()
        proc.stop()


def _agent(tmp: Path, name: str, url: str, ca_file: Path) -> harness.Proc:
    data = tmp / "data.csv"
    data.write_text("age,outcome\n50,sick\n60,healthy\n")
    silo = SiloFactory(organization__consortium=ConsortiumFactory())
    proc = harness.agent(tmp, name, url=url, token=silo_issue_token(silo=silo), data_csv=data)
    site = tmp / name / "site.toml"
    lines = site.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("public_key"))
    lines.insert(at + 1, f'ca_file = "{ca_file}"')
    site.write_text("\n".join(lines) + "\n")
    return proc


def test_agent_connects_with_the_pinned_ca_and_refuses_another(tmp_path, tls_server) -> None:
    server, proxy, ca_file = tls_server
    url = f"wss://127.0.0.1:{proxy.port}/ws/agent/"
    good = _agent(tmp_path, "site-tls", url, ca_file)
    stranger_ca = make_ca(tmp_path / "other-pki", "some-other-ca")
    wrong = _agent(tmp_path, "site-wrong-ca", url, stranger_ca.cert_file)
    procs = [server, good, wrong]
    good.start()
    wrong.start()
    try:
        harness.wait_until(
            lambda: "connected to wss://" in good.log.read_text(),
            timeout=60,
            what="the agent pinning the consortium CA to connect over TLS",
            procs=procs,
        )
        harness.wait_until(
            lambda: "certificate verify failed" in wrong.log.read_text(),
            timeout=60,
            what="the agent pinning another CA to refuse the server's certificate",
            procs=procs,
        )
        refused = wrong.log.read_text()
        assert "connected to" not in refused
        assert "not from the CA in [server] ca_file" in refused
    finally:
        good.stop()
        wrong.stop()
