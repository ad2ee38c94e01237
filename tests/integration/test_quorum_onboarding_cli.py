"""`quorum` onboarding commands against a live server: organisations, invitations accepted from
the command line, a token for a username and password, silo registration and admission.

main() runs in-process against pytest-django's live_server, over HTTP, as in test_quorum_cli.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache

from federation import models
from federation.services.silos import hash_token
from tests.factories import SCHEMA
from tests.governance_factories import Governed, governed_consortium
from tests.integration.test_quorum_cli import Cli

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "a-long-enough-passphrase"


@pytest.fixture
def gov() -> Governed:
    return governed_consortium(1, name="Onboarding consortium")


@pytest.fixture
def cli(capsys: Any, monkeypatch: pytest.MonkeyPatch, live_server: Any, tmp_path: Path) -> Cli:
    cache.clear()  # the sign-in lock-out counters
    monkeypatch.setenv("QUORUM_CONFIG", str(tmp_path / "quorum" / "config.json"))
    monkeypatch.delenv("QUORUM_URL", raising=False)
    monkeypatch.delenv("QUORUM_TOKEN", raising=False)
    return Cli(capsys, monkeypatch, live_server.url)


def config_of(tmp_path: Path) -> dict[str, str]:
    return json.loads((tmp_path / "quorum" / "config.json").read_text())


def test_an_organisation_its_first_admin_and_a_steward_from_the_command_line(
    cli: Cli, gov: Governed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = cli.as_user(gov.admin)("org", "create", "North clinic", "--kind", "hospital")
    assert code == 0 and "North clinic" in out
    code, _, err = cli("org", "create", "North clinic")
    assert code == 1 and err.count("\n") == 1 and "(409)" in err

    code, link, err = cli(
        "invite", "ann@north.example", "--org", "north clinic", "--role", "org_admin"
    )
    assert code == 0 and link.strip().startswith(cli.url + "/invite/") and "\n" not in link.strip()
    assert "ann@north.example" in err

    # The newcomer: a weak password creates nothing, then a good one creates and logs in.
    monkeypatch.delenv("QUORUM_URL")
    monkeypatch.delenv("QUORUM_TOKEN")
    code, _, err = cli(
        "invitation",
        "accept",
        link.strip(),
        "--username",
        "ann",
        "--password-stdin",
        stdin="123\n",
    )
    assert code == 1 and "password" in err and "(400)" in err
    assert not get_user_model().objects.filter(username="ann").exists()
    code, out, _ = cli(
        "invitation",
        "accept",
        link.strip(),
        "--username",
        "ann",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert code == 0 and "org_admin of North clinic" in out and "logged in" in out
    assert config_of(tmp_path)["url"] == cli.url
    code, _, err = cli(
        "invitation",
        "accept",
        link.strip(),
        "--username",
        "ann2",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert code == 1 and "(409)" in err and "works once" in err

    # Ann (logged in by the stored file) appoints her steward; the consortium admin may not.
    code, link, _ = cli(
        "invite", "sam@north.example", "--org", "North clinic", "--role", "data_steward"
    )
    assert code == 0
    code, _, err = cli.as_user(gov.admin)(
        "invite", "sam2@north.example", "--org", "North clinic", "--role", "data_steward"
    )
    assert code == 1 and "(403)" in err
    monkeypatch.delenv("QUORUM_URL")
    monkeypatch.delenv("QUORUM_TOKEN")
    code, out, _ = cli(
        "invitation",
        "accept",
        link.strip(),
        "--username",
        "sam",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert code == 0
    sam = get_user_model().objects.get(username="sam")
    assert models.Membership.objects.filter(user=sam, role="data_steward").exists()
    actions = set(models.AuditEvent.objects.values_list("action", flat=True))
    assert {"invitation.created", "invitation.accepted", "api_token.created"} <= actions


def test_login_with_a_password_and_the_lock_out(
    cli: Cli, gov: Governed, tmp_path: Path, settings: Any
) -> None:
    settings.QUORUM_LOGIN_FAILURE_LIMIT = 3
    user = gov.scientists[0]
    user.set_password(PASSWORD)
    user.save()
    name = user.username
    code, _, err = cli("login", cli.url, "--username", name, "--password-stdin", stdin="wrong\n")
    assert code == 1 and "(401)" in err and err.count("\n") == 1
    assert not (tmp_path / "quorum" / "config.json").exists()
    code, out, _ = cli("login", cli.url, "--username", name, "--password-stdin", stdin=PASSWORD)
    assert code == 0 and f"as {name}" in out
    assert config_of(tmp_path)["token"].startswith("qrm_")
    for _ in range(3):
        code, _, err = cli("login", cli.url, "--username", name, "--password-stdin", stdin="x\n")
    assert code == 1 and "(429)" in err
    # Locked out: even the right password is refused until the lock-out ends.
    code, _, err = cli("login", cli.url, "--username", name, "--password-stdin", stdin=PASSWORD)
    assert code == 1 and "(429)" in err


def test_a_steward_registers_a_silo_and_the_admin_admits_it(
    cli: Cli, gov: Governed, tmp_path: Path
) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({**SCHEMA, "columns": [{"name": "age", "type": "int"}]}))
    code, _, err = cli.as_user(gov.stewards[0])(
        "silo", "register", "--name", "ward-b", "--schema", str(schema), "--rows", "10"
    )
    assert code == 1 and "schema" in err and "'int'" in err
    assert not models.Silo.objects.filter(name="ward-b").exists()

    schema.write_text(json.dumps(SCHEMA))
    data = tmp_path / "data.csv"
    data.write_text('age,note\n1,"two\nlines"\n2,x\n')
    code, out, _ = cli(
        "silo", "register", "--name", "ward-b", "--schema", str(schema), "--data", str(data)
    )
    assert code == 0
    silo = models.Silo.objects.get(pk=int(out))
    assert silo.row_count == 2 and silo.admission == "pending"

    code, _, err = cli("silo", "admit", str(silo.pk))
    assert code == 1 and "(403)" in err
    code, token, _ = cli.as_user(gov.admin)("silo", "admit", str(silo.pk))
    assert code == 0
    silo.refresh_from_db()
    assert silo.admission == "admitted"
    assert silo.token_hash == hash_token(token.strip())
