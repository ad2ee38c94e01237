"""JSON transport of secure-aggregation messages: bytes fields as base64 strings.

The stage messages of ``SecAggClient`` and ``SecAggServer`` are dicts of str, int, float, bytes
and lists of dicts. Quorum carries them in the ``payload`` of a ``secagg`` control message (JSON),
so the bytes fields (public keys, share ciphertexts, Shamir shares) travel as standard base64.
Only the fields named in :data:`BYTES_FIELDS` are converted back, strictly; anything else that
is not valid JSON, or a bytes field that is not canonical base64, is refused with
:class:`~fedcore.secagg.errors.ProtocolError`. The masked vector itself never travels here: it is
the payload of a binary ``masked_update`` message.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from fedcore.secagg.errors import ProtocolError

# The bytes-valued keys of the stage messages (fedcore.secagg.client / server).
BYTES_FIELDS = frozenset({"c_public", "s_public", "ciphertext", "share", "masked_vector"})
_MAX_DEPTH = 4  # message -> list -> record: three levels are used


def to_json(message: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``message`` with every bytes value as a base64 string (JSON-ready)."""
    return _encode(message, 0)


def from_json(message: object) -> dict[str, Any]:
    """The stage message carried in ``message``: base64 strings of :data:`BYTES_FIELDS` decoded.

    Raises:
        ProtocolError: not a mapping, too deep, or a bytes field that is not base64.
    """
    if not isinstance(message, Mapping):
        raise ProtocolError("a secure-aggregation payload is an object")
    return _decode(message, 0)


def _encode(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError("secure-aggregation message nests too deep")
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): _encode(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v, depth + 1) for v in value]
    return value


def _decode(value: Any, depth: int, key: str | None = None) -> Any:
    if depth > _MAX_DEPTH:
        raise ProtocolError("secure-aggregation payload nests too deep")
    if key in BYTES_FIELDS:
        if not isinstance(value, str):
            raise ProtocolError(f"field {key!r} must be a base64 string")
        try:
            decoded = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ProtocolError(f"field {key!r} is not valid base64") from None
        if base64.b64encode(decoded).decode("ascii") != value:
            raise ProtocolError(f"field {key!r} is not canonical base64")
        return decoded
    if isinstance(value, Mapping):
        return {str(k): _decode(v, depth + 1, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, depth + 1) for v in value]
    return value
