"""Signed run authorizations: the server's Ed25519 grant that a silo may train on a plan hash.

The server signs ``{run, silo, consortium, plan_hash, approvals, silo_approvals, issued_at}`` with
its Ed25519 key; the site agent pins the server's public key in site.toml, verifies the signature,
recomputes the plan's hash from the plan it received and checks that the grant names its own silo
and carries an approval from its own data steward. A compromised relay or a forged task cannot
make a site train on a plan its steward did not approve.

Each grant is also bound to one message (:func:`request_scope`, checked by
:func:`check_request_scope`): its kind, the run's total rounds and an expiry, and for a task its
round and attempt and the SHA-256 of the global weights payload and of the canonical
preprocessing JSON. A relay cannot change the weights or the preprocessing, renumber the round,
or re-deliver a task after it expired.

Keys travel as text: ``ed25519:<base64 of the 32 raw bytes>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcore.plan import canonical_json, plan_hash

KEY_PREFIX = "ed25519:"
AUTHORIZATION_VERSION = 1


class AuthorizationError(ValueError):
    """An authorization is missing, malformed, forged or does not cover this task."""


def generate_private_key() -> Ed25519PrivateKey:
    """A new Ed25519 private key (from the OS's cryptographic random source)."""
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM of a private key, for the server's key file."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """Load a PEM private key; refuse anything that is not Ed25519."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AuthorizationError("the server signing key is not an Ed25519 key")
    return key


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The ``ed25519:<base64>`` text of a public key, as pinned in site.toml."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Parse ``ed25519:<base64>``.

    Raises:
        AuthorizationError: the text is not an Ed25519 public key in that form.
    """
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise AuthorizationError(f"a public key must look like '{KEY_PREFIX}<base64>'")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise AuthorizationError(f"not a valid Ed25519 public key: {exc}") from exc


def sign_authorization(key: Ed25519PrivateKey, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Sign a grant.

    Args:
        key: the server's private key.
        payload: JSON-compatible grant with at least run, silo, plan_hash, silo_approvals.

    Returns:
        ``{"payload": payload, "signature": <base64>, "key": <public key text>}``.
    """
    body = {"v": AUTHORIZATION_VERSION, **payload}
    signature = key.sign(canonical_json(body).encode("utf-8"))
    return {
        "payload": body,
        "signature": base64.b64encode(signature).decode("ascii"),
        "key": public_key_text(key),
    }


DEFAULT_MAX_AGE_SECONDS = 24 * 3600


def _verified_payload(
    signed: Any, public_key: str, *, missing: str, malformed: str, forged: str
) -> Mapping[str, Any]:
    """The payload of ``{"payload", "signature"}`` if the pinned key signed its canonical JSON;
    AuthorizationError with the caller's words for each way it can fail."""
    if not isinstance(signed, Mapping):
        raise AuthorizationError(missing)
    payload, signature = signed.get("payload"), signed.get("signature")
    if not isinstance(payload, Mapping) or not isinstance(signature, str):
        raise AuthorizationError(malformed)
    try:
        raw_signature = base64.b64decode(signature, validate=True)
        parse_public_key(public_key).verify(raw_signature, canonical_json(payload).encode("utf-8"))
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise AuthorizationError(forged) from exc
    return payload


def verify_authorization(
    authorization: Mapping[str, Any],
    *,
    public_key: str,
    plan: Mapping[str, Any],
    silo: str,
    run: int,
    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Check a grant covers this task for this silo; return its payload.

    Args:
        authorization: the ``authorization`` field of a task or stats_request.
        public_key: the server key pinned in site.toml (``ed25519:<base64>``).
        plan: the plan received with the task; its hash is recomputed here.
        silo: this site's silo name (from the server's welcome).
        run: the run the task belongs to.
        max_age_seconds: how old a grant may be (the server signs one per message it sends,
            so an old grant is a replayed one); clocks may differ by a few minutes.
        now: the current time (tests); defaults to the system clock.

    Raises:
        AuthorizationError: naming what does not hold.
    """
    payload = _verified_payload(
        authorization,
        public_key,
        missing="the task carries no authorization",
        malformed="the authorization has no payload or signature",
        forged="the authorization's signature does not verify with the server key pinned in "
        "site.toml (a forged task, or the server's key changed: check [server] public_key)",
    )
    if payload.get("v") != AUTHORIZATION_VERSION:
        raise AuthorizationError(f"unsupported authorization version {payload.get('v')!r}")
    if "purpose" in payload:  # a signed plan offer is not a grant to train
        raise AuthorizationError(
            f"the authorization is a signed {payload.get('purpose')!r}, not a grant to train"
        )
    expected_hash = plan_hash(plan)
    if payload.get("plan_hash") != expected_hash:
        raise AuthorizationError(
            f"the plan received hashes to {expected_hash[:12]}…, but the authorization is for "
            f"{str(payload.get('plan_hash'))[:12]}…"
        )
    if payload.get("silo") != silo:
        raise AuthorizationError(
            f"the authorization is for silo {payload.get('silo')!r}, not {silo!r}"
        )
    if payload.get("run") != run:
        raise AuthorizationError(f"the authorization is for run {payload.get('run')!r}, not {run}")
    try:
        issued = datetime.fromisoformat(str(payload.get("issued_at")))
    except ValueError as exc:
        raise AuthorizationError("the authorization has no valid issued_at time") from exc
    if issued.tzinfo is None:
        raise AuthorizationError("the authorization's issued_at has no time zone")
    age = ((now or datetime.now(UTC)) - issued).total_seconds()
    if age > max_age_seconds or age < -300:
        raise AuthorizationError(
            f"the authorization was issued {age:.0f} s ago; a grant older than "
            f"{max_age_seconds:.0f} s (or from the future) is refused as a replay -- check the "
            "site's clock"
        )
    approvals = payload.get("silo_approvals")
    if not isinstance(approvals, list) or not approvals:
        raise AuthorizationError(
            f"no data steward of silo {silo!r} approved plan {expected_hash[:12]}…"
        )
    return dict(payload)


OFFER_PURPOSE = "plan_offer"


def sign_offer(key: Ed25519PrivateKey, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Sign a plan offer (``purpose`` marks it, so it can never pass as a grant to train).

    Args:
        key: the server's private key.
        payload: ``silo``, ``consortium``, ``plan_hash``, ``name``, ``version``, ``status``,
            ``issued_at``.

    Returns:
        ``{"payload": ..., "signature": <base64>, "key": <public key text>}``.
    """
    return sign_authorization(key, {**payload, "purpose": OFFER_PURPOSE})


def verify_offer(
    signed: Mapping[str, Any],
    *,
    public_key: str,
    offer: Mapping[str, Any],
    silo: str | None,
) -> dict[str, Any]:
    """Check a plan offer was signed by the pinned server key for this silo; return its payload.

    Args:
        signed: the ``authorization`` field of the ``plan_offer``.
        public_key: the server key pinned in site.toml.
        offer: the ``plan_offer`` fields: its plan must hash to the signed ``plan_hash``, and its
            name, version, consortium and status must be the signed ones.
        silo: this site's silo name from the welcome (None: not checked, before the welcome).

    Raises:
        AuthorizationError: naming what does not hold.
    """
    payload = _verified_payload(
        signed,
        public_key,
        missing="the offer carries no signature",
        malformed="the offer's signature has no payload or signature",
        forged="the offer's signature does not verify with the server key pinned in site.toml",
    )
    if payload.get("purpose") != OFFER_PURPOSE:
        raise AuthorizationError("the signature is not for a plan offer")
    expected_hash = plan_hash(offer["plan"])
    if payload.get("plan_hash") != expected_hash or offer.get("plan_hash") != expected_hash:
        raise AuthorizationError(
            f"the plan offered hashes to {expected_hash[:12]}…, but the signed offer is for "
            f"{str(payload.get('plan_hash'))[:12]}…"
        )
    for name in ("name", "version", "consortium", "status"):
        if payload.get(name) != offer.get(name):
            raise AuthorizationError(f"the offer's {name} is not the one the server signed")
    named = offer["plan"].get("name") if isinstance(offer["plan"], Mapping) else None
    if named is not None and named != offer.get("name"):
        # Since the name is part of the hashed plan, the name shown must be the hashed one.
        raise AuthorizationError(
            f"the offer is named {offer.get('name')!r} but its plan is named {named!r}"
        )
    if silo is not None and payload.get("silo") != silo:
        raise AuthorizationError(f"the offer is for silo {payload.get('silo')!r}, not {silo!r}")
    return dict(payload)


# -- the scope of one signed message: which request, which round, which bytes, until when ---------

STATS_KIND = "stats"
TASK_KIND = "task"
EVALUATE_KIND = "evaluate"  # the final model, sent to be evaluated (no training)
ANALYSIS_KIND = "analysis"  # one step of an analysis plan (fedcore.analytics.steps)
# How long after its deadline a signed task stays valid (the agent's clock may lag the server's).
TASK_EXPIRY_MARGIN_SECONDS = 600.0
# Clocks may differ by a few minutes: an expiry is judged with this much slack.
CLOCK_SKEW_SECONDS = 300.0


def sha256_canonical(value: Any) -> str:
    """Hex SHA-256 of a JSON value's canonical form (the preprocessing a task is signed over)."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def request_scope(
    *,
    kind: str,
    rounds: int,
    expires_at: datetime,
    round: int | None = None,
    attempt: int | None = None,
    weights_sha256: str | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    model_version: int | None = None,
    step: str | None = None,
    params: Mapping[str, Any] | None = None,
    example_weights: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The grant fields that bind a grant to one stats_request, one round's task or the final
    evaluation.

    A task that carries ``example_weights`` (a weighted bias mitigation) also binds their
    canonical SHA-256 (``example_weights_sha256``): weights changed or added in transit are
    refused like changed preprocessing.

    A task's grant names its round and attempt, the run's total rounds, the SHA-256 of the global
    weights payload and of the canonical preprocessing JSON, and an expiry; an evaluate's names
    the model version instead of a round; a stats_request's names the total rounds and an
    expiry. Merged into the payload :func:`sign_authorization` signs; checked by
    :func:`check_request_scope`.
    """
    if expires_at.tzinfo is None:
        raise ValueError("expires_at needs a time zone")
    scope: dict[str, Any] = {
        "kind": kind,
        "rounds": rounds,
        "expires_at": expires_at.astimezone(UTC).isoformat(),
    }
    if kind == TASK_KIND:
        if round is None or attempt is None or weights_sha256 is None or preprocessing is None:
            raise ValueError("a task's scope needs round, attempt, weights and preprocessing")
        scope.update(
            round=round,
            attempt=attempt,
            weights_sha256=weights_sha256,
            preprocessing_sha256=sha256_canonical(preprocessing),
        )
        if example_weights is not None:
            scope["example_weights_sha256"] = sha256_canonical(example_weights)
    if kind == ANALYSIS_KIND:
        if step is None or params is None:
            raise ValueError("an analysis request's scope needs its step and parameters")
        scope.update(step=step, params_sha256=sha256_canonical(params))
    if kind == EVALUATE_KIND:
        if model_version is None or weights_sha256 is None or preprocessing is None:
            raise ValueError("an evaluate's scope needs model_version, weights and preprocessing")
        scope.update(
            model_version=model_version,
            weights_sha256=weights_sha256,
            preprocessing_sha256=sha256_canonical(preprocessing),
        )
    return scope


def _short(value: Any) -> str:
    return f"{str(value)[:12]}…"


def _received_digest(value: Any) -> str:
    """SHA-256 of what a request carries, as its grant names it; a value that is not canonical
    JSON gets a marker no grant holds, so the comparison refuses it."""
    try:
        return sha256_canonical(value)
    except (TypeError, ValueError):
        return "not canonical JSON"


def check_request_scope(
    grant: Mapping[str, Any],
    *,
    kind: str,
    plan_rounds: int,
    round: int | None = None,
    rounds: int | None = None,
    weights_sha256: str | None = None,
    preprocessing: Any = None,
    now: datetime | None = None,
    check_expiry: bool = True,
    model_version: int | None = None,
    step: str | None = None,
    params: Any = None,
    example_weights: Any = None,
) -> None:
    """Check a verified grant's scope covers exactly the request received.

    Args:
        grant: the payload :func:`verify_authorization` returned.
        kind: ``"stats"``, ``"task"`` or ``"evaluate"``: what was received.
        plan_rounds: the total rounds of the plan received (its hash already checked).
        round: the task's round number (tasks).
        rounds: the total rounds the task's fields state (tasks).
        weights_sha256: SHA-256 of the global weights payload received (tasks).
        preprocessing: the preprocessing received (tasks).
        now: the current time (tests).
        check_expiry: False only when checking again a task already accepted on arrival.
        model_version: the model version an evaluate says it carries (evaluates).
        step, params: an analysis request's step and parameters (analysis requests).
        example_weights: the example weights a task carries (None: it carries none).

    Raises:
        AuthorizationError: naming what the grant does not cover.
    """
    if grant.get("kind") != kind:
        raise AuthorizationError(
            f"the authorization is for a {grant.get('kind')!r} message, not a {kind!r} "
            "(a grant signed without a round scope, or one moved onto another message)"
        )
    if grant.get("rounds") != plan_rounds:
        raise AuthorizationError(
            f"the authorization is for a run of {grant.get('rounds')!r} rounds, but the plan "
            f"has {plan_rounds}"
        )
    if kind == TASK_KIND:
        if rounds != plan_rounds:
            raise AuthorizationError(
                f"the task says the run has {rounds!r} rounds, but the plan has {plan_rounds}"
            )
        if grant.get("round") != round:
            raise AuthorizationError(
                f"the task says round {round!r}, but the authorization is for round "
                f"{grant.get('round')!r}"
            )
        attempt = grant.get("attempt")
        if not isinstance(round, int) or isinstance(round, bool) or not 1 <= round <= plan_rounds:
            raise AuthorizationError(f"round {round!r} is beyond the plan's {plan_rounds} rounds")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise AuthorizationError(
                f"the authorization's attempt {attempt!r} is not a number >= 1"
            )
        carried = None if example_weights is None else _received_digest(example_weights)
        if grant.get("example_weights_sha256") != carried:
            raise AuthorizationError(
                f"the task's example weights hash to {_short(carried)}, but the authorization "
                f"is for {_short(grant.get('example_weights_sha256'))} (added, removed or "
                "changed in transit)"
            )
    if kind == EVALUATE_KIND:
        if rounds != plan_rounds:
            raise AuthorizationError(
                f"the evaluate says the run has {rounds!r} rounds, but the plan has {plan_rounds}"
            )
        if grant.get("model_version") != model_version:
            raise AuthorizationError(
                f"the evaluate says model v{model_version!r}, but the authorization is for "
                f"v{grant.get('model_version')!r}"
            )
    if kind == ANALYSIS_KIND:
        if grant.get("step") != step:
            raise AuthorizationError(
                f"the request says step {step!r}, but the authorization is for step "
                f"{grant.get('step')!r}"
            )
        received = _received_digest(params)
        if grant.get("params_sha256") != received:
            raise AuthorizationError(
                f"the analysis parameters received hash to {_short(received)}, but the "
                f"authorization is for {_short(grant.get('params_sha256'))} (changed in transit)"
            )
    if kind in (TASK_KIND, EVALUATE_KIND):
        if grant.get("weights_sha256") != weights_sha256:
            raise AuthorizationError(
                f"the global weights received hash to {_short(weights_sha256)}, but the "
                f"authorization is for {_short(grant.get('weights_sha256'))} (changed in transit)"
            )
        received = _received_digest(preprocessing)
        if grant.get("preprocessing_sha256") != received:
            raise AuthorizationError(
                f"the preprocessing received hashes to {_short(received)}, but the authorization "
                f"is for {_short(grant.get('preprocessing_sha256'))} (changed in transit)"
            )
    if not check_expiry:
        return
    try:
        expires = datetime.fromisoformat(str(grant.get("expires_at")))
    except ValueError:
        raise AuthorizationError("the authorization has no valid expires_at time") from None
    if expires.tzinfo is None:
        raise AuthorizationError("the authorization's expires_at has no time zone")
    late = ((now or datetime.now(UTC)) - expires).total_seconds()
    if late > CLOCK_SKEW_SECONDS:
        raise AuthorizationError(
            f"the authorization expired at {expires.isoformat()} ({late:.0f} s ago): a replayed "
            "or stale message -- if the site's clock is wrong, fix it"
        )
