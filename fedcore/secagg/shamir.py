"""Shamir secret sharing (Shamir, 1979) of byte strings over the prime field GF(2^255 - 19).

A secret is cut into 16-byte chunks, each read as an integer below 2^128 (so below the prime) and
shared with its own random polynomial of degree ``threshold - 1``; every polynomial is evaluated at
the recipient's client id, which must be in [1, 2^32). A share is the concatenation of the chunk
values as 32-byte big-endian field elements: a 32-byte secret (an X25519 private key or a self-mask
seed) gives 64-byte shares. Any ``threshold`` shares recover the secret by Lagrange interpolation at
zero; fewer reveal nothing about it (information-theoretically). Coefficients come from
``secrets.randbelow``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from functools import lru_cache

from fedcore.secagg.errors import ProtocolError

PRIME = 2**255 - 19
CHUNK_BYTES = 16
ELEMENT_BYTES = 32
MAX_SHARE_INDEX = 2**32 - 1


def share_length(secret_length: int) -> int:
    """Bytes in one share of a secret of ``secret_length`` bytes."""
    return (secret_length // CHUNK_BYTES) * ELEMENT_BYTES


def _check_indices(xs: Iterable[int]) -> list[int]:
    indices = list(xs)
    if len(set(indices)) != len(indices):
        raise ValueError("share indices must be distinct")
    if any(not 1 <= x <= MAX_SHARE_INDEX for x in indices):
        raise ValueError(f"share indices must be in [1, {MAX_SHARE_INDEX}]")
    return indices


def split_secret(secret: bytes, threshold: int, indices: Iterable[int]) -> dict[int, bytes]:
    """Split ``secret`` so that any ``threshold`` of the returned shares recover it.

    Args:
        secret: the bytes to share; a non-empty multiple of 16 bytes long.
        threshold: shares needed to reconstruct, at least 1 and at most the number of indices.
        indices: distinct evaluation points in [1, 2^32), one per recipient (its client id).

    Returns:
        The share of each index.

    Raises:
        ValueError: bad secret length, threshold or indices.
    """
    xs = _check_indices(indices)
    if not secret or len(secret) % CHUNK_BYTES:
        raise ValueError(f"a shared secret is a non-empty multiple of {CHUNK_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} needs between 1 and {len(xs)} shares")
    shares: dict[int, list[bytes]] = {x: [] for x in xs}
    for start in range(0, len(secret), CHUNK_BYTES):
        constant = int.from_bytes(secret[start : start + CHUNK_BYTES], "big")
        coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
        for x in xs:
            value = 0
            for coefficient in reversed(coefficients):  # Horner, highest degree first
                value = (value + coefficient) * x % PRIME
            shares[x].append(((value + constant) % PRIME).to_bytes(ELEMENT_BYTES, "big"))
    return {x: b"".join(parts) for x, parts in shares.items()}


@lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    # lambda_i = prod_{j != i} x_j / (x_j - x_i): the basis polynomials evaluated at zero.
    weights = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)


def combine_shares(shares: Mapping[int, bytes], threshold: int, secret_length: int) -> bytes:
    """Recover a secret from at least ``threshold`` shares.

    Args:
        shares: share bytes by index (the holder's client id); extra shares are ignored.
        threshold: the threshold the secret was split with.
        secret_length: bytes in the secret (a multiple of 16).

    Returns:
        The secret. Shares that were not made together interpolate to a random field element,
        which falls below 2^128 (a valid chunk) with probability 2^-127: such sets are refused
        almost surely. Callers still check the secret against a public commitment (an
        advertised public key) where they have one.

    Raises:
        ProtocolError: fewer than ``threshold`` shares, a share of the wrong size or out of the
            field, or shares that do not interpolate to a valid secret.
        ValueError: a bad index.
    """
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} share(s), threshold needs {threshold}")
    xs = tuple(sorted(_check_indices(shares))[:threshold])
    size = share_length(secret_length)
    values: list[list[int]] = []
    for x in xs:
        share = shares[x]
        if not isinstance(share, bytes) or len(share) != size:
            raise ProtocolError(f"a share of a {secret_length}-byte secret is {size} bytes")
        elements = [
            int.from_bytes(share[i : i + ELEMENT_BYTES], "big")
            for i in range(0, size, ELEMENT_BYTES)
        ]
        if any(e >= PRIME for e in elements):
            raise ProtocolError("a share element is outside the field")
        values.append(elements)
    weights = _lagrange_at_zero(xs)
    chunks = []
    for c in range(size // ELEMENT_BYTES):
        constant = sum(w * v[c] for w, v in zip(weights, values, strict=True)) % PRIME
        if constant >= 1 << (8 * CHUNK_BYTES):
            raise ProtocolError("shares do not reconstruct a valid secret")
        chunks.append(constant.to_bytes(CHUNK_BYTES, "big"))
    return b"".join(chunks)
