"""The server's Ed25519 signing key and the run authorizations it signs for agents.

The key lives in QUORUM_SIGNING_KEY_FILE (PKCS#8 PEM, mode 0600), created on first use. Sites pin
its public key (``manage.py server_key`` or GET /api/v1/server-key/) in their site.toml.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.utils import timezone

from config.files import private_folder
from fedcore import signing
from federation.models import Approval, PlanVersion, Role, Run, Silo

_lock = threading.Lock()
_cache: dict[Path, Ed25519PrivateKey] = {}


def server_private_key() -> Ed25519PrivateKey:
    """The server's signing key, created (0600) on first use."""
    path = Path(settings.QUORUM_SIGNING_KEY_FILE)
    with _lock:
        if path in _cache:
            return _cache[path]
        if not path.exists():
            _create_key_file(path)
        key = signing.private_key_from_pem(path.read_bytes())
        _cache[path] = key
        return key


def _create_key_file(path: Path) -> None:
    """Write a new key, atomically and without replacing one another process wrote meanwhile.

    Production runs several processes that may all start with no key file: each writes its own
    complete temporary file, and the first hard link to the real name wins; the others read it.
    """
    private_folder(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(signing.private_key_to_pem(signing.generate_private_key()))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)


def server_public_key_text() -> str:
    """The public key sites pin: ``ed25519:<base64>``."""
    return signing.public_key_text(server_private_key())


def _approval_json(approval: Approval) -> dict[str, Any]:
    return {
        "user": approval.user.get_username(),
        "organization": approval.organization.name,
        "role": approval.role,
        "plan_hash": approval.plan_hash,
        "at": approval.created_at.isoformat(),
        # The steward's own signature (fedcore.approvals): what a site pinning the key checks.
        "signature": approval.signature,
    }


def run_approvals(run: Run) -> list[Approval]:
    """The approvals of the run's exact plan hash that every grant of the run lists."""
    return list(
        Approval.objects.filter(
            version=run.version, plan_hash=run.plan_hash, decision=Approval.Decision.APPROVE
        )
        .select_related("user", "organization")
        .order_by("created_at", "pk")
    )


def authorization_for(
    *,
    run: Run,
    silo: Silo,
    scope: Mapping[str, Any],
    approvals: list[Approval] | None = None,
) -> dict[str, Any]:
    """A signed grant that this silo may answer one message of this run's plan hash.

    ``silo_approvals`` lists the approvals by data stewards of the silo's organisation for the
    run's exact plan hash; an agent refuses a grant where it is empty. ``scope``
    (:func:`fedcore.signing.request_scope`) binds the grant to one stats_request or to one round
    attempt's task: its round, the run's total rounds, the hashes of the weights and the
    preprocessing sent with it, and an expiry. ``approvals``: :func:`run_approvals`, read once
    by a caller that signs the grants of many silos.
    """
    if approvals is None:
        approvals = run_approvals(run)
    payload = {
        "run": run.pk,
        "silo": silo.name,
        "consortium": run.plan.consortium.name,
        "plan_hash": run.plan_hash,
        "approvals": [_approval_json(a) for a in approvals],
        "silo_approvals": [
            _approval_json(a)
            for a in approvals
            if a.organization_id == silo.organization_id and a.role == Role.DATA_STEWARD
        ],
        "issued_at": timezone.now().isoformat(),
        **scope,
    }
    return signing.sign_authorization(server_private_key(), payload)


def offer_authorization(*, version: PlanVersion, silo: Silo, status: str) -> dict[str, Any]:
    """The server's signature over a plan offer to this silo, with the status it carries (the
    agent refuses an unsigned or altered one before storing it)."""
    return signing.sign_offer(
        server_private_key(),
        {
            "silo": silo.name,
            "consortium": version.plan.consortium.name,
            "plan_hash": version.spec_hash,
            "name": version.plan.name,
            "version": version.number,
            "status": status,
            "issued_at": timezone.now().isoformat(),
        },
    )
