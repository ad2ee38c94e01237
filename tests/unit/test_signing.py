"""Signed run authorizations (fedcore.signing): what a site agent relies on to refuse forged tasks."""

from __future__ import annotations

import base64
import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcore import signing
from fedcore.plan import plan_hash

ISSUED = datetime.now(UTC).isoformat()  # grants older than a day are refused as replays

PLAN = {"model": {"kind": "logistic_regression"}, "training": {"lr": 0.1}, "seed": 0}
STEWARD = {"user": "steward-a", "organization": "Hospital A", "role": "data_steward"}


def payload(**changes: Any) -> dict[str, Any]:
    return {
        "run": 5,
        "silo": "site-a",
        "consortium": "thyroid",
        "plan_hash": plan_hash(PLAN),
        "approvals": [STEWARD],
        "silo_approvals": [STEWARD],
        "issued_at": ISSUED,
        **changes,
    }


@pytest.fixture(scope="module")
def key():
    return signing.generate_private_key()


def verify(authorization: dict[str, Any], key: Any, **changes: Any) -> dict[str, Any]:
    arguments = {
        "public_key": signing.public_key_text(key),
        "plan": PLAN,
        "silo": "site-a",
        "run": 5,
        **changes,
    }
    return signing.verify_authorization(authorization, **arguments)


def test_round_trip_returns_the_signed_payload(key):
    authorization = signing.sign_authorization(key, payload())

    verified = verify(authorization, key)

    assert verified == {"v": signing.AUTHORIZATION_VERSION, **payload()}
    assert authorization["key"] == signing.public_key_text(key)


def test_key_order_of_the_plan_does_not_matter(key):
    authorization = signing.sign_authorization(key, payload())
    reordered = dict(reversed(list(PLAN.items())))

    assert verify(authorization, key, plan=reordered)["run"] == 5


@pytest.mark.parametrize(
    "field, value",
    [("silo", "site-b"), ("run", 6), ("silo_approvals", []), ("consortium", "other")],
)
def test_a_tampered_payload_does_not_verify(key, field, value):
    authorization = signing.sign_authorization(key, payload())
    tampered = copy.deepcopy(authorization)
    tampered["payload"][field] = value

    with pytest.raises(signing.AuthorizationError, match="signature does not verify"):
        verify(tampered, key)


def test_a_tampered_signature_does_not_verify(key):
    authorization = signing.sign_authorization(key, payload())
    raw = bytearray(base64.b64decode(authorization["signature"]))
    raw[0] ^= 1
    authorization["signature"] = base64.b64encode(bytes(raw)).decode()

    with pytest.raises(signing.AuthorizationError, match="signature does not verify"):
        verify(authorization, key)


def test_a_grant_signed_by_another_key_does_not_verify_even_if_it_names_that_key(key):
    other = signing.generate_private_key()
    forged = signing.sign_authorization(other, payload())  # its "key" field names `other`

    with pytest.raises(signing.AuthorizationError, match="pinned in site.toml"):
        verify(forged, key)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"silo": "site-b"}, "for silo 'site-a', not 'site-b'"),
        ({"run": 6}, "for run 5, not 6"),
        ({"plan": {**PLAN, "seed": 1}}, "the plan received hashes to"),
    ],
)
def test_a_genuine_grant_for_another_task_is_refused(key, changes, message):
    authorization = signing.sign_authorization(key, payload())

    with pytest.raises(signing.AuthorizationError, match=message):
        verify(authorization, key, **changes)


def test_a_grant_without_the_silo_stewards_approval_is_refused(key):
    authorization = signing.sign_authorization(key, payload(silo_approvals=[]))

    with pytest.raises(signing.AuthorizationError, match="no data steward of silo 'site-a'"):
        verify(authorization, key)


def test_an_unknown_grant_version_is_refused(key):
    authorization = signing.sign_authorization(key, payload(v=2))

    with pytest.raises(signing.AuthorizationError, match="unsupported authorization version 2"):
        verify(authorization, key)


@pytest.mark.parametrize(
    "authorization",
    [None, {}, {"payload": payload()}, {"payload": "x", "signature": "AAAA"}],
)
def test_missing_parts_are_refused(key, authorization):
    with pytest.raises(signing.AuthorizationError):
        verify(authorization, key)


def test_public_key_text_round_trip(key):
    text = signing.public_key_text(key)

    assert text.startswith("ed25519:")
    assert signing.public_key_text(signing.parse_public_key(text)) == text
    assert signing.public_key_text(key.public_key()) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "AAAA",  # no prefix
        "rsa:AAAA",
        "ed25519:",
        "ed25519:not base64!",
        "ed25519:" + base64.b64encode(b"\0" * 31).decode(),  # one byte short
        "ed25519:" + base64.b64encode(b"\0" * 33).decode(),
    ],
)
def test_bad_key_text_is_refused(text):
    with pytest.raises(signing.AuthorizationError):
        signing.parse_public_key(text)


def test_pem_round_trip_and_non_ed25519_pem_refused(key):
    pem = signing.private_key_to_pem(key)

    loaded = signing.private_key_from_pem(pem)

    assert signing.public_key_text(loaded) == signing.public_key_text(key)
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(signing.AuthorizationError, match="not an Ed25519 key"):
        signing.private_key_from_pem(other)


def test_an_old_grant_is_refused_as_a_replay() -> None:
    from datetime import UTC, datetime, timedelta

    from fedcore import signing
    from fedcore.plan import plan_hash

    key = signing.generate_private_key()
    plan = {"model": {"kind": "logistic_regression"}}
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    grant = signing.sign_authorization(
        key,
        {
            "run": 1,
            "silo": "a",
            "plan_hash": plan_hash(plan),
            "silo_approvals": [{"user": "s"}],
            "issued_at": issued.isoformat(),
        },
    )
    common = {"public_key": signing.public_key_text(key), "plan": plan, "silo": "a", "run": 1}
    assert signing.verify_authorization(grant, now=issued + timedelta(hours=1), **common)
    with pytest.raises(signing.AuthorizationError, match="replay"):
        signing.verify_authorization(grant, now=issued + timedelta(days=2), **common)
