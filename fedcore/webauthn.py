"""Verify a WebAuthn assertion (a passkey's signature) without a browser or a server framework.

A steward who approves a plan in the dashboard with a passkey produces an assertion over a
challenge derived from the canonical approval message (:func:`fedcore.approvals.approval_message`).
The server checks it when the approval is stored and every site that pins the passkey's public key
checks it again, with this same code.

Checked (WebAuthn Level 2, section 7.2, the parts that matter without a relying-party session):

- ``clientDataJSON``: ``type`` is ``webauthn.get``, ``challenge`` is the base64url of the expected
  challenge, ``origin`` is an https origin (or http on localhost) whose host is the RP ID or
  under it;
- ``authenticatorData``: the first 32 bytes are SHA-256 of the RP ID and the UP (user present)
  flag is set;
- the signature over ``authenticatorData || SHA-256(clientDataJSON)`` with the credential's
  public key: ES256 (ECDSA P-256 with SHA-256, DER signature) or EdDSA (Ed25519).

Public keys travel as text: ``webauthn:<alg>:<base64 of the SubjectPublicKeyInfo DER>``, with
``<alg>`` the COSE algorithm number (-7 ES256, -8 EdDSA), as the browser's
``AuthenticatorAttestationResponse.getPublicKey()`` and ``getPublicKeyAlgorithm()`` give them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

KEY_PREFIX = "webauthn:"
ES256 = -7
EDDSA = -8
ALGORITHMS = {ES256: "ES256", EDDSA: "EdDSA"}
FLAG_USER_PRESENT = 0x01
FLAG_USER_VERIFIED = 0x04
MIN_AUTHENTICATOR_DATA = 37  # rpIdHash (32) + flags (1) + signCount (4)


class WebAuthnError(ValueError):
    """An assertion or a passkey's public key is malformed or does not verify."""


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (the encoding of clientDataJSON's challenge)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Base64url with or without padding; WebAuthnError if it is not."""
    if not isinstance(text, str):
        raise WebAuthnError("expected base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise WebAuthnError(f"not base64url: {exc}") from None


def public_key_text(alg: int, spki_der: bytes) -> str:
    """The pinned text of a passkey's public key (checked: it must load and match ``alg``)."""
    text = f"{KEY_PREFIX}{alg}:{base64.b64encode(spki_der).decode('ascii')}"
    parse_public_key(text)
    return text


def parse_public_key(text: str) -> tuple[int, ec.EllipticCurvePublicKey | Ed25519PublicKey]:
    """Parse ``webauthn:<alg>:<base64 SPKI>``; WebAuthnError naming what is wrong."""
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise WebAuthnError(f"a passkey's public key must look like '{KEY_PREFIX}<alg>:<base64>'")
    alg_text, _, body = text[len(KEY_PREFIX) :].partition(":")
    try:
        alg = int(alg_text)
    except ValueError:
        raise WebAuthnError(f"the passkey's algorithm {alg_text!r} is not a number") from None
    if alg not in ALGORITHMS:
        raise WebAuthnError(
            f"passkey algorithm {alg} is not supported (supported: -7 ES256, -8 EdDSA)"
        )
    try:
        key = serialization.load_der_public_key(base64.b64decode(body, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise WebAuthnError(f"the passkey's public key does not load: {exc}") from None
    if alg == ES256 and not (
        isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        raise WebAuthnError("an ES256 passkey must have a P-256 public key")
    if alg == EDDSA and not isinstance(key, Ed25519PublicKey):
        raise WebAuthnError("an EdDSA passkey must have an Ed25519 public key")
    return alg, key  # type: ignore[return-value]


def _origin_matches(origin: str, rp_id: str) -> bool:
    parts = urlsplit(origin)
    host = (parts.hostname or "").lower()
    if parts.scheme == "http" and host in ("localhost", "127.0.0.1"):
        return host == rp_id
    return parts.scheme == "https" and (host == rp_id or host.endswith("." + rp_id))


def verify_assertion(
    *,
    public_key: str,
    authenticator_data: bytes,
    client_data_json: bytes,
    signature: bytes,
    challenge: bytes,
    rp_id: str,
) -> str:
    """Check a WebAuthn assertion; return the origin it was made on.

    Args:
        public_key: the passkey's pinned public key text.
        authenticator_data: the assertion's authenticatorData.
        client_data_json: the assertion's clientDataJSON bytes, as the browser made them.
        signature: the assertion's signature.
        challenge: the challenge the caller expects (here: SHA-256 of the approval message).
        rp_id: the relying party ID (the dashboard's host name).

    Raises:
        WebAuthnError: naming the check that failed.
    """
    alg, key = parse_public_key(public_key)
    try:
        client = json.loads(client_data_json.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WebAuthnError("clientDataJSON is not JSON") from None
    if not isinstance(client, dict):
        raise WebAuthnError("clientDataJSON is not a JSON object")
    if client.get("type") != "webauthn.get":
        raise WebAuthnError(
            f"clientDataJSON type is {client.get('type')!r}, not 'webauthn.get' (an assertion)"
        )
    if client.get("challenge") != b64url_encode(challenge):
        raise WebAuthnError("the assertion's challenge is not the hash of this approval message")
    origin = client.get("origin")
    if not isinstance(origin, str) or not _origin_matches(origin, rp_id):
        raise WebAuthnError(f"the assertion's origin {origin!r} is not one of RP ID {rp_id!r}")
    if len(authenticator_data) < MIN_AUTHENTICATOR_DATA:
        raise WebAuthnError("authenticatorData is too short")
    if authenticator_data[:32] != hashlib.sha256(rp_id.encode("utf-8")).digest():
        raise WebAuthnError(f"authenticatorData is not for RP ID {rp_id!r} (rpIdHash differs)")
    if not authenticator_data[32] & FLAG_USER_PRESENT:
        raise WebAuthnError("the authenticator did not report the user present (UP flag)")
    signed = authenticator_data + hashlib.sha256(client_data_json).digest()
    try:
        if alg == ES256:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(key, Ed25519PublicKey)
            key.verify(signature, signed)
    except InvalidSignature:
        raise WebAuthnError("the assertion's signature does not verify with the passkey") from None
    return origin
