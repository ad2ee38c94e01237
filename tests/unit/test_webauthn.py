"""Passkey approvals: the WebAuthn assertion check in fedcore, used by the server when an approval
is stored and by the agent before it trains. Assertions are made here by a software authenticator
(ES256 and EdDSA keys from `cryptography`) exactly as a browser and an authenticator build them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientagent.config import ConfigError, load_config
from clientagent.trainer import TaskError
from fedcore import approvals, webauthn
from fedcore.plan import plan_hash
from tests.unit.test_agent_policy import NOWHERE, WEIGHTS_SHA
from tests.unit.test_agent_session import PLAN, write_site
from tests.unit.test_steward_approvals import approval, pinned_agent, task_with

RP_ID = "quorum.example.org"
ORIGIN = f"https://{RP_ID}"
HASH = plan_hash(PLAN)
SIGNED_AT = "2026-12-05T20:00:00+00:00"


class SoftAuthenticator:
    """A passkey: a private key, its credential id and its public key as the dashboard pins it."""

    def __init__(self, alg: int = webauthn.ES256):
        self.alg = alg
        self.key: Any = (
            ec.generate_private_key(ec.SECP256R1())
            if alg == webauthn.ES256
            else Ed25519PrivateKey.generate()
        )
        spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public = webauthn.public_key_text(alg, spki)

    def assert_(
        self,
        challenge: bytes,
        *,
        rp_id: str = RP_ID,
        origin: str = ORIGIN,
        type_: str = "webauthn.get",
        flags: int = 0x05,
    ) -> dict[str, str]:
        client = json.dumps(
            {"type": type_, "challenge": webauthn.b64url_encode(challenge), "origin": origin}
        ).encode()
        auth = hashlib.sha256(rp_id.encode()).digest() + bytes([flags]) + (1).to_bytes(4, "big")
        signed = auth + hashlib.sha256(client).digest()
        if self.alg == webauthn.ES256:
            sig = self.key.sign(signed, ec.ECDSA(hashes.SHA256()))
        else:
            sig = self.key.sign(signed)
        return {
            "kind": "webauthn",
            "key": self.public,
            "signed_at": SIGNED_AT,
            "credential_id": webauthn.b64url_encode(b"credential-1"),
            "authenticator_data": webauthn.b64url_encode(auth),
            "client_data_json": webauthn.b64url_encode(client),
            "signature": webauthn.b64url_encode(sig),
            "rp_id": rp_id,
        }


def challenge(plan: str = HASH, org: str = "Hospital A", consortium: str = "thyroid") -> bytes:
    return approvals.approval_challenge(
        consortium=consortium, organization=org, plan_hash=plan, signed_at=SIGNED_AT
    )


def check(signature: dict[str, str]) -> str:
    return approvals.check_signature(
        signature, consortium="thyroid", organization="Hospital A", plan_hash=HASH
    )


@pytest.mark.parametrize("alg", [webauthn.ES256, webauthn.EDDSA])
def test_a_passkey_assertion_over_the_approval_verifies(alg: int) -> None:
    passkey = SoftAuthenticator(alg)
    assert check(passkey.assert_(challenge())) == passkey.public


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.assert_(challenge(plan="0" * 64)), "challenge is not the hash"),
        (lambda p: p.assert_(challenge(org="Hospital B")), "challenge is not the hash"),
        (lambda p: p.assert_(challenge(), type_="webauthn.create"), "not 'webauthn.get'"),
        (lambda p: p.assert_(challenge(), flags=0x04), "UP flag"),
        (lambda p: p.assert_(challenge(), origin="https://evil.example"), "origin"),
        (lambda p: p.assert_(challenge(), origin=f"http://{RP_ID}"), "origin"),
        (
            lambda p: {**p.assert_(challenge(), rp_id="evil.example"), "rp_id": RP_ID},
            "rpIdHash differs",
        ),
        (
            lambda p: {**p.assert_(challenge()), "key": SoftAuthenticator().public},
            "signature does not verify",
        ),
        (
            lambda p: {**p.assert_(challenge()), "signed_at": "2026-01-01T00:00:00+00:00"},
            "challenge",
        ),
        (lambda p: {**p.assert_(challenge()), "authenticator_data": "AAAA"}, "too short"),
        (lambda p: {**p.assert_(challenge()), "extra": "x"}, "unknown field 'extra'"),
        (lambda p: {**p.assert_(challenge()), "key": "webauthn:-257:AAAA"}, "not supported"),
    ],
)
def test_a_tampered_or_foreign_assertion_is_refused_by_name(make: Any, message: str) -> None:
    with pytest.raises(approvals.ApprovalSignatureError, match=message):
        check(make(SoftAuthenticator()))


def test_the_agent_trains_on_a_passkey_approval_pinned_in_site_toml(tmp_path: Path) -> None:
    passkey = SoftAuthenticator()
    agent = pinned_agent(tmp_path, keys=(passkey.public,))
    signature = passkey.assert_(challenge())
    grant = agent.check_request(task_with(approval(signature)), weights_sha256=WEIGHTS_SHA)
    assert grant["plan_hash"] == HASH


def test_the_agent_refuses_a_passkey_it_did_not_pin(tmp_path: Path) -> None:
    agent = pinned_agent(tmp_path, keys=(SoftAuthenticator().public,))
    signature = SoftAuthenticator().assert_(challenge())
    with pytest.raises(TaskError, match="1 signed by other keys"):
        agent.check_request(task_with(approval(signature)), weights_sha256=WEIGHTS_SHA)


def test_a_malformed_passkey_key_in_site_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write_site(tmp_path, NOWHERE)
    path.write_text(path.read_text() + '\n[governance]\nsteward_keys = ["webauthn:-7:AAAA"]\n')
    with pytest.raises(ConfigError, match="does not load"):
        load_config(path)
