"""Steward approvals a site can verify: the steward's own signature over the plan hash.

The server's grant (:mod:`fedcore.signing`) says which approvals it holds, but the server writes
them: whoever holds its signing key or edits its database could claim a steward approved. A
*signed* approval is made with a key only the steward holds, and the site pins that key's public
half in its site.toml (``[governance] steward_keys``); the agent checks, before it reads any data,
that at least one approval the grant carries is signed by a pinned key over this exact plan hash
and consortium (:func:`verified_approval`).

The steward signs :func:`approval_message`, the canonical JSON of::

    {"purpose": "quorum.steward_approval", "v": 1, "consortium": ..., "organization": ...,
     "plan_hash": ..., "decision": "approve", "signed_at": ...}

The signature travels as a JSON object stored with the approval::

    {"kind": "ed25519", "key": "ed25519:<base64>", "signed_at": "<ISO time>",
     "signature": "<base64>"}

Ed25519 keys are the same ``ed25519:<base64>`` text as the server's (:mod:`fedcore.signing`). A
passkey approval (WebAuthn, :mod:`fedcore.webauthn`) is ``{"kind": "webauthn", "key":
"webauthn:<alg>:<base64 SPKI>", "signed_at", "credential_id", "authenticator_data",
"client_data_json", "signature", "rp_id"}`` (base64url), an assertion whose challenge is
SHA-256 of the approval message (:func:`approval_challenge`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcore import webauthn
from fedcore.plan import canonical_json
from fedcore.signing import AuthorizationError, parse_public_key, public_key_text

APPROVAL_PURPOSE = "quorum.steward_approval"
APPROVAL_VERSION = 1
ED25519_KIND = "ed25519"
WEBAUTHN_KIND = "webauthn"
SIGNATURE_KINDS = (ED25519_KIND, WEBAUTHN_KIND)
COMMON_FIELDS = ("kind", "key", "signed_at")
FIELDS = {
    ED25519_KIND: (*COMMON_FIELDS, "signature"),
    # base64url, as the browser's PublicKeyCredential gives them; rp_id is the dashboard's host.
    WEBAUTHN_KIND: (
        *COMMON_FIELDS,
        "credential_id",
        "authenticator_data",
        "client_data_json",
        "signature",
        "rp_id",
    ),
}
APPROVE = "approve"
MAX_SIGNATURE_FIELD = 4096  # characters of any one field of a signature object


class ApprovalSignatureError(ValueError):
    """A steward's approval signature is malformed, forged or not for this plan."""


def approval_message(
    *, consortium: str, organization: str, plan_hash: str, signed_at: str
) -> bytes:
    """The exact bytes a steward signs to approve ``plan_hash`` for ``organization``."""
    body = {
        "purpose": APPROVAL_PURPOSE,
        "v": APPROVAL_VERSION,
        "consortium": consortium,
        "organization": organization,
        "plan_hash": plan_hash,
        "decision": APPROVE,
        "signed_at": signed_at,
    }
    return canonical_json(body).encode("utf-8")


def approval_challenge(
    *, consortium: str, organization: str, plan_hash: str, signed_at: str
) -> bytes:
    """The WebAuthn challenge of an approval: SHA-256 of :func:`approval_message`."""
    message = approval_message(
        consortium=consortium, organization=organization, plan_hash=plan_hash, signed_at=signed_at
    )
    return hashlib.sha256(message).digest()


def check_steward_key(text: str) -> None:
    """Check a pinnable steward key: ``ed25519:<base64>`` or ``webauthn:<alg>:<base64 SPKI>``.

    Raises:
        ApprovalSignatureError: naming what is wrong.
    """
    try:
        if isinstance(text, str) and text.startswith(webauthn.KEY_PREFIX):
            webauthn.parse_public_key(text)
        else:
            parse_public_key(text)
    except (AuthorizationError, webauthn.WebAuthnError) as exc:
        raise ApprovalSignatureError(str(exc)) from None


def sign_approval(
    key: Ed25519PrivateKey,
    *,
    consortium: str,
    organization: str,
    plan_hash: str,
    now: datetime | None = None,
) -> dict[str, str]:
    """A steward's Ed25519 signature approving ``plan_hash`` (the object the approve API takes)."""
    signed_at = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
    message = approval_message(
        consortium=consortium, organization=organization, plan_hash=plan_hash, signed_at=signed_at
    )
    return {
        "kind": ED25519_KIND,
        "key": public_key_text(key),
        "signed_at": signed_at,
        "signature": base64.b64encode(key.sign(message)).decode("ascii"),
    }


def check_signature(signature: Any, *, consortium: str, organization: str, plan_hash: str) -> str:
    """Check a signature object approves this plan hash; return the signing key's text.

    It proves only that the holder of ``key`` signed; whether that key belongs to the steward
    is what the site's pinned ``steward_keys`` decide.

    Raises:
        ApprovalSignatureError: naming what is wrong.
    """
    if not isinstance(signature, Mapping):
        raise ApprovalSignatureError(
            "the approval signature must be an object with kind, key, signed_at and signature"
        )
    kind = signature.get("kind")
    if kind not in SIGNATURE_KINDS:
        raise ApprovalSignatureError(
            f"unknown approval signature kind {kind!r} (known: {', '.join(SIGNATURE_KINDS)})"
        )
    fields = FIELDS[kind]
    unknown = sorted(set(signature) - set(fields))
    if unknown:
        raise ApprovalSignatureError(f"the approval signature has unknown field {unknown[0]!r}")
    for name in fields:
        value = signature.get(name)
        if not isinstance(value, str) or not value or len(value) > MAX_SIGNATURE_FIELD:
            raise ApprovalSignatureError(
                f"the approval signature's {name} must be a non-empty string of at most "
                f"{MAX_SIGNATURE_FIELD} characters"
            )
    try:
        datetime.fromisoformat(signature["signed_at"])
    except ValueError:
        raise ApprovalSignatureError(
            f"the approval signature's signed_at {signature['signed_at']!r} is not an ISO time"
        ) from None
    if kind == WEBAUTHN_KIND:
        return _check_webauthn(
            signature, consortium=consortium, organization=organization, plan_hash=plan_hash
        )
    try:
        public = parse_public_key(signature["key"])
    except AuthorizationError as exc:
        raise ApprovalSignatureError(f"the approval signature's key: {exc}") from None
    message = approval_message(
        consortium=consortium,
        organization=organization,
        plan_hash=plan_hash,
        signed_at=signature["signed_at"],
    )
    try:
        public.verify(base64.b64decode(signature["signature"], validate=True), message)
    except (binascii.Error, ValueError, InvalidSignature):
        raise ApprovalSignatureError(
            f"the approval signature does not verify: it was not made by {signature['key']} "
            f"over plan {plan_hash[:12]}… for {organization!r} in consortium {consortium!r}"
        ) from None
    return signature["key"]


def _check_webauthn(
    signature: Mapping[str, str], *, consortium: str, organization: str, plan_hash: str
) -> str:
    challenge = approval_challenge(
        consortium=consortium,
        organization=organization,
        plan_hash=plan_hash,
        signed_at=signature["signed_at"],
    )
    try:
        webauthn.verify_assertion(
            public_key=signature["key"],
            authenticator_data=webauthn.b64url_decode(signature["authenticator_data"]),
            client_data_json=webauthn.b64url_decode(signature["client_data_json"]),
            signature=webauthn.b64url_decode(signature["signature"]),
            challenge=challenge,
            rp_id=signature["rp_id"],
        )
    except webauthn.WebAuthnError as exc:
        raise ApprovalSignatureError(
            f"the passkey approval does not verify over plan {plan_hash[:12]}… for "
            f"{organization!r} in consortium {consortium!r}: {exc}"
        ) from None
    return signature["key"]


def verified_approval(
    approvals: Iterable[Any],
    *,
    pinned_keys: Iterable[str],
    consortium: str,
    plan_hash: str,
) -> dict[str, Any]:
    """The first approval signed by a pinned steward key over this plan hash and consortium.

    Args:
        approvals: the grant's ``approvals`` (each with ``organization``, ``plan_hash`` and
            ``signature``; the others are ignored).
        pinned_keys: ``[governance] steward_keys`` from site.toml.
        consortium: the consortium the site works for.
        plan_hash: the hash of the plan received (already recomputed by the agent).

    Raises:
        ApprovalSignatureError: no approval is signed by a pinned key over this plan; the
            message says what was seen.
    """
    pinned = set(pinned_keys)
    unsigned = unpinned = invalid = 0
    for approval in approvals:
        if not isinstance(approval, Mapping) or approval.get("plan_hash") != plan_hash:
            continue
        signature = approval.get("signature")
        if signature is None:
            unsigned += 1
            continue
        if not isinstance(signature, Mapping) or signature.get("key") not in pinned:
            unpinned += 1
            continue
        organization = approval.get("organization")
        if not isinstance(organization, str):
            invalid += 1
            continue
        try:
            check_signature(
                signature, consortium=consortium, organization=organization, plan_hash=plan_hash
            )
        except ApprovalSignatureError:
            invalid += 1
            continue
        return dict(approval)
    raise ApprovalSignatureError(
        f"no approval of plan {plan_hash[:12]}… is signed by a steward key pinned in site.toml "
        f"([governance] steward_keys): the grant carries {unsigned} unsigned, {unpinned} signed "
        f"by other keys and {invalid} with a signature that does not verify"
    )
