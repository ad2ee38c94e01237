"""Approvals the site can verify: a steward's signature over the plan hash, checked by the agent.

The server's grant lists approvals, but the site trains only when one of them is signed by a
steward key pinned in its own site.toml ([governance] steward_keys), over this exact plan hash
and consortium, or when the site operator approved the hash locally.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

import pytest

from clientagent import cli
from clientagent.config import ConfigError, load_config
from clientagent.connection import Agent
from clientagent.records import APPROVED
from clientagent.trainer import TaskError
from fedcore import approvals, signing
from fedcore.plan import plan_hash
from tests.unit.test_agent_policy import NOWHERE, WEIGHTS_SHA, task_fields, task_grant
from tests.unit.test_agent_session import PLAN, write_site

STEWARD = signing.generate_private_key()
STEWARD_KEY = signing.public_key_text(STEWARD)
HASH = plan_hash(PLAN)


def signed(
    key: Any = STEWARD, *, consortium: str = "thyroid", plan: str = HASH, org: str = "Hospital A"
) -> dict[str, str]:
    return approvals.sign_approval(key, consortium=consortium, organization=org, plan_hash=plan)


def approval(signature: Any, *, plan: str = HASH, org: str = "Hospital A") -> dict[str, Any]:
    """One entry of a grant's approvals list, as federation.signing writes it."""
    return {
        "user": "steward-a",
        "organization": org,
        "role": "data_steward",
        "plan_hash": plan,
        "at": "2026-01-01T00:00:00+00:00",
        "signature": signature,
    }


def pinned_agent(tmp_path: Path, keys: tuple[str, ...] = (STEWARD_KEY,), policy: str = "") -> Agent:
    path = write_site(tmp_path, NOWHERE, policy=policy)
    quoted = ", ".join(f'"{key}"' for key in keys)
    path.write_text(path.read_text() + f"\n[governance]\nsteward_keys = [{quoted}]\n")
    agent = Agent(load_config(path), progress_tty=False)
    agent.on_welcome({"silo": "site-a", "consortium": "thyroid"})
    return agent


def task_with(*entries: dict[str, Any]) -> dict[str, Any]:
    """A task whose (validly server-signed) grant carries these approvals."""
    authorization = task_grant(PLAN, approvals=list(entries), silo_approvals=list(entries))
    return task_fields(PLAN, authorization=authorization)


def test_a_signature_round_trips_and_names_its_key() -> None:
    signature = signed()
    assert signature["kind"] == "ed25519" and signature["key"] == STEWARD_KEY
    key = approvals.check_signature(
        signature, consortium="thyroid", organization="Hospital A", plan_hash=HASH
    )
    assert key == STEWARD_KEY


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"consortium": "other"}, "consortium"),
        ({"organization": "Hospital B"}, "organisation"),
        ({"plan_hash": "0" * 64}, "plan hash"),
    ],
)
def test_a_signature_does_not_verify_for_another_approval(
    change: dict[str, str], what: str
) -> None:
    target = {"consortium": "thyroid", "organization": "Hospital A", "plan_hash": HASH, **change}
    with pytest.raises(approvals.ApprovalSignatureError, match="does not verify"):
        approvals.check_signature(signed(), **target)


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        ("a string", "must be an object"),
        ({**signed(), "extra": "x"}, "unknown field 'extra'"),
        ({**signed(), "kind": "rsa"}, "unknown approval signature kind 'rsa'"),
        ({**signed(), "signed_at": "yesterday"}, "not an ISO time"),
        ({**signed(), "key": "ed25519:nope"}, "signature's key"),
        ({**signed(), "signature": "x" * 5000}, "at most 4096"),
        ({**signed(), "signed_at": "2020-01-01T00:00:00+00:00"}, "does not verify"),
    ],
)
def test_malformed_or_altered_signatures_are_refused_by_name(signature: Any, message: str) -> None:
    with pytest.raises(approvals.ApprovalSignatureError, match=message):
        approvals.check_signature(
            signature, consortium="thyroid", organization="Hospital A", plan_hash=HASH
        )


def test_the_agent_trains_on_an_approval_signed_by_a_pinned_key(tmp_path: Path) -> None:
    agent = pinned_agent(tmp_path)
    grant = agent.check_request(task_with(approval(signed())), weights_sha256=WEIGHTS_SHA)
    assert grant["plan_hash"] == HASH


@pytest.mark.parametrize(
    ("entry", "seen"),
    [
        # An Approval row inserted into the server's database: no signature at all.
        (approval(None), "1 unsigned"),
        # Signed, but by a key this site never pinned (the server's own, or an impostor's).
        (approval(signed(signing.generate_private_key())), "1 signed by other keys"),
        # The pinned steward's genuine signature of another plan, copied onto this one.
        (approval(signed(plan="1" * 64)), "1 with a signature that does not verify"),
        # The pinned steward's signature for another consortium.
        (approval(signed(consortium="other")), "1 with a signature that does not verify"),
    ],
)
def test_forged_approvals_in_a_valid_grant_are_refused_before_reading_data(
    tmp_path: Path, entry: dict[str, Any], seen: str
) -> None:
    agent = pinned_agent(tmp_path)
    with pytest.raises(TaskError) as info:
        agent.check_request(task_with(entry), weights_sha256=WEIGHTS_SHA)
    error = info.value
    assert error.code == "not_authorized"
    assert "refused before reading any local data" in error.reason
    assert "signed by a steward key pinned in site.toml" in error.shared_reason
    assert seen in error.shared_reason
    assert "quorum-agent approve" in error.reason


def test_a_local_approval_stands_in_for_a_missing_signature(tmp_path: Path) -> None:
    agent = pinned_agent(tmp_path)
    agent.records.decide(HASH, APPROVED, operator="ops", reason="reviewed")
    grant = agent.check_request(task_with(approval(None)), weights_sha256=WEIGHTS_SHA)
    assert grant["plan_hash"] == HASH


def test_without_steward_keys_the_agent_warns_that_it_trusts_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(load_config(write_site(tmp_path, NOWHERE)), progress_tty=False)
    agent.on_welcome({"silo": "site-a", "consortium": "thyroid"})
    assert not agent.config.approvals_verified
    with caplog.at_level(logging.WARNING):
        agent.check_request(task_with(approval(None)), weights_sha256=WEIGHTS_SHA)
    assert "trusting the server's word" in caplog.text


def test_require_local_approval_counts_as_verified(tmp_path: Path) -> None:
    config = load_config(write_site(tmp_path, NOWHERE, policy="require_local_approval = true"))
    assert config.approvals_verified


def test_a_steward_key_that_is_not_a_key_is_a_config_error(tmp_path: Path) -> None:
    path = write_site(tmp_path, NOWHERE)
    path.write_text(path.read_text() + '\n[governance]\nsteward_keys = ["ed25519:AAAA"]\n')
    with pytest.raises(
        ConfigError, match=r"\[governance\] steward_keys: 'ed25519:AAAA' is not a steward key"
    ):
        load_config(path)


def test_the_cli_writes_a_private_key_and_signs_an_approval_the_agent_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "steward.pem"
    assert cli.main(["steward-key", "new", "--out", str(key_file)]) == 0
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    printed = capsys.readouterr().out
    public = next(line for line in printed.splitlines() if line.startswith("steward_keys"))
    public_key = public.split('"')[1]
    assert cli.main(["steward-key", "new", "--out", str(key_file)]) == 2  # never overwritten

    capsys.readouterr()
    argv = ["steward-key", "sign", HASH, "--key", str(key_file), "--consortium", "thyroid"]
    assert cli.main([*argv, "--organization", "Hospital A"]) == 0
    signature = json.loads(capsys.readouterr().out)
    assert signature["key"] == public_key

    (tmp_path / "site").mkdir()
    agent = pinned_agent(tmp_path / "site", keys=(public_key,))
    assert agent.check_request(task_with(approval(signature)), weights_sha256=WEIGHTS_SHA)


def test_the_cli_refuses_a_short_hash_and_a_missing_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--consortium", "thyroid", "--organization", "Hospital A"]
    assert cli.main(["steward-key", "sign", HASH[:12], "--key", "k", *argv]) == 2
    assert "64 hex characters" in capsys.readouterr().err
    missing = str(tmp_path / "none.pem")
    assert cli.main(["steward-key", "sign", HASH, "--key", missing, *argv]) == 2
    assert "cannot read the steward key" in capsys.readouterr().err


def test_check_says_whether_approvals_are_proven_to_the_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = write_site(tmp_path, NOWHERE)
    assert cli.main(["check", "--config", str(bare)]) == 0
    assert "approvals: WARNING: no [governance] steward_keys" in capsys.readouterr().out
    (tmp_path / "pinned").mkdir()
    pinned = pinned_agent(tmp_path / "pinned").config.path
    assert cli.main(["check", "--config", str(pinned)]) == 0
    assert "approvals: signed by one of 1 pinned steward key(s)" in capsys.readouterr().out
