"""The agent's side of analysis plans: [disclosure] in site.toml, and a grant scoped to one step
and its parameters (fedcore.signing, clientagent.policy)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from clientagent.config import ConfigError, load_config
from clientagent.policy import check_authorization
from clientagent.trainer import TaskError
from fedcore import signing
from fedcore.analytics import DisclosurePolicy
from fedcore.plan import plan_hash
from tests.unit.test_agent_config import GOOD, write_site

PLAN = {
    "kind": "analysis",
    "schema": {"columns": [{"name": "age", "type": "numeric"}], "target": {"column": "y"}},
    "analysis": {"kind": "moments", "columns": ["age"]},
}


def test_disclosure_defaults_and_a_site_s_own_table(tmp_path):
    assert load_config(write_site(tmp_path, GOOD)).disclosure == DisclosurePolicy()
    text = GOOD + '\n[disclosure]\nmin_cell_count = 10\nallowed_analyses = ["count"]\n'
    config = load_config(write_site(tmp_path, text))
    assert config.disclosure.min_cell_count == 10
    assert config.disclosure.allowed_analyses == ("count",)


def test_a_bad_disclosure_table_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[disclosure\].*min_cel"):
        load_config(write_site(tmp_path, GOOD + "\n[disclosure]\nmin_cel = 3\n"))


def request(key, *, step="summary", params=None, signed_params=None) -> dict:
    scope = signing.request_scope(
        kind=signing.ANALYSIS_KIND,
        rounds=1,
        expires_at=datetime.now(UTC) + timedelta(minutes=10),
        step="summary",
        params={} if signed_params is None else signed_params,
    )
    grant = signing.sign_authorization(
        key,
        {
            "run": 7,
            "silo": "site-a",
            "consortium": "c",
            "plan_hash": plan_hash(PLAN),
            "approvals": [{"user": "s"}],
            "silo_approvals": [{"user": "s"}],
            "issued_at": datetime.now(UTC).isoformat(),
            **scope,
        },
    )
    return {
        "run": 7,
        "plan_hash": plan_hash(PLAN),
        "plan": PLAN,
        "step": step,
        "params": {} if params is None else params,
        "authorization": grant,
    }


def check(fields, key):
    return check_authorization(
        fields, public_key=signing.public_key_text(key), silo="site-a", consortium="c"
    )


def test_a_grant_covers_only_its_step_and_its_parameters():
    key = signing.generate_private_key()
    assert check(request(key), key)["step"] == "summary"
    with pytest.raises(TaskError, match="step 'event_times'"):
        check(request(key, step="event_times"), key)
    with pytest.raises(TaskError, match="changed in transit"):
        check(request(key, params={"grid": [1.0]}, signed_params={"grid": [2.0]}), key)
