"""Writes for stewards' passkeys: register one (its public key only), audited."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from fedcore import webauthn
from federation.models import StewardPasskey
from federation.services.audit import actor_label, audit_append

MAX_CREDENTIAL_ID = 1023  # bytes (WebAuthn's limit); base64url of it fits the column


@transaction.atomic
def passkey_register(
    *, actor: Any, credential_id: str, algorithm: int, public_key_spki: str, name: str = ""
) -> StewardPasskey:
    """Store the public key of a passkey ``actor`` just created in the browser.

    Args:
        actor: the signed-in user, who owns the passkey.
        credential_id: the credential's raw id, base64url.
        algorithm: the COSE algorithm (-7 ES256, -8 EdDSA), from getPublicKeyAlgorithm().
        public_key_spki: base64 of the SubjectPublicKeyInfo DER, from getPublicKey().
        name: a label for the user.

    Raises:
        ValidationError: naming the field that is wrong; nothing is stored.
    """
    try:
        raw_id = webauthn.b64url_decode(credential_id)
    except webauthn.WebAuthnError as exc:
        raise ValidationError({"credential_id": str(exc)}) from None
    if not 1 <= len(raw_id) <= MAX_CREDENTIAL_ID:
        raise ValidationError({"credential_id": f"must be 1 to {MAX_CREDENTIAL_ID} bytes"})
    if len(name) > 100:
        raise ValidationError({"name": "at most 100 characters"})
    try:
        spki = base64.b64decode(public_key_spki, validate=True)
        public_key = webauthn.public_key_text(algorithm, spki)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError({"public_key": str(exc)}) from None
    if StewardPasskey.objects.filter(credential_id=credential_id).exists():
        raise ValidationError({"credential_id": "this passkey is already registered"})
    passkey = StewardPasskey.objects.create(
        user=actor, name=name, credential_id=credential_id, public_key=public_key
    )
    audit_append(
        actor=actor_label(actor),
        action="passkey.registered",
        object_type="user",
        object_id=actor.pk,
        data={"passkey": passkey.pk, "name": name, "public_key": public_key},
    )
    return passkey
