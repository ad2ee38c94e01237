"""Cryptographic primitives: X25519 agreement, HKDF-SHA256 contexts, ChaCha20 masks, AEAD.

Every key and seed is 256 bits from the OS's cryptographic random source (through ``cryptography``
or ``os.urandom``), and every mask is a ChaCha20 keystream read as little-endian uint32 words.
Flower's SecAgg+ primitives seed numpy's ``RandomState`` with 32 bits, so a mask can be found by
trying 2^32 seeds; numpy and torch generators are never used here.

Each derived key has its own HKDF context: a protocol label, a purpose, the round id and the client
ids it is bound to, so a key from one round, pair or direction is useless in another.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcore.secagg.errors import ProtocolError

PROTOCOL_LABEL = b"quorum/secagg/v1"
KEY_BYTES = 32
SEED_BYTES = 32
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16
# A mask key is derived fresh for one (round, pair) or (round, self-mask seed) and expands exactly
# one keystream, so a constant nonce never repeats under one key. ChaCha20 in ``cryptography`` takes
# 16 bytes: a 4-byte little-endian block counter (starting at 0) and a 12-byte nonce.
_MASK_NONCE = bytes(16)


def generate_key_pair() -> X25519PrivateKey:
    """A fresh X25519 private key from the OS's cryptographic random source."""
    return X25519PrivateKey.generate()


def random_seed() -> bytes:
    """A fresh 32-byte seed (a self-mask seed b_u) from ``os.urandom``."""
    return os.urandom(SEED_BYTES)


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (the secret that is Shamir-shared)."""
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def load_public(raw: object) -> X25519PublicKey:
    """Parse 32 raw bytes as an X25519 public key; ProtocolError otherwise."""
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise ProtocolError(f"an X25519 public key is {KEY_BYTES} raw bytes")
    return X25519PublicKey.from_public_bytes(raw)


def load_private(raw: bytes) -> X25519PrivateKey:
    """Parse 32 raw bytes as an X25519 private key; ProtocolError otherwise."""
    if len(raw) != KEY_BYTES:
        raise ProtocolError(f"an X25519 private key is {KEY_BYTES} raw bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer: X25519PublicKey) -> bytes:
    """X25519 shared secret; ProtocolError for a low-order peer key (all-zero secret)."""
    try:
        return private.exchange(peer)
    except ValueError as exc:  # cryptography refuses the all-zero output of small-order points
        raise ProtocolError(f"key agreement failed: {exc}") from exc


def context(purpose: bytes, round_id: str, *client_ids: int) -> bytes:
    """HKDF info / AEAD associated data binding a purpose, a round and client ids."""
    rid = round_id.encode("utf-8")
    ids = b"".join(struct.pack(">I", cid) for cid in client_ids)
    return PROTOCOL_LABEL + b"/" + purpose + b"\x00" + struct.pack(">H", len(rid)) + rid + ids


def hkdf(secret: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` into 32 bytes for the given context."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def pairwise_mask_key(shared_s: bytes, round_id: str, u: int, v: int) -> bytes:
    """Key of the pairwise mask between u and v: the same for both ends (ids ordered)."""
    low, high = sorted((u, v))
    return hkdf(shared_s, context(b"pairwise-mask", round_id, low, high))


def self_mask_key(seed: bytes, round_id: str, client_id: int) -> bytes:
    """Key of a client's self mask, derived from its 32-byte seed b_u."""
    return hkdf(seed, context(b"self-mask", round_id, client_id))


def share_key(shared_c: bytes, round_id: str, sender: int, receiver: int) -> bytes:
    """AEAD key for shares sent from ``sender`` to ``receiver``.

    The direction is part of the context: u -> v and v -> u use different keys, so the random
    nonces of the two directions can never collide under one key.
    """
    return hkdf(shared_c, context(b"share-encryption", round_id, sender, receiver))


def expand_mask(key: bytes, length: int) -> np.ndarray:
    """ChaCha20 keystream of ``key`` as ``length`` little-endian uint32 words (uniform mod 2^32)."""
    if len(key) != KEY_BYTES:
        raise ValueError("a mask key is 32 bytes")
    encryptor = Cipher(algorithms.ChaCha20(key, _MASK_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption: random 12-byte nonce || ciphertext || 16-byte tag."""
    nonce = os.urandom(AEAD_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """Decrypt what ``seal`` produced; ProtocolError if it was forged, altered or redirected."""
    if len(blob) < AEAD_NONCE_BYTES + AEAD_TAG_BYTES:
        raise ProtocolError("ciphertext too short")
    nonce, body = blob[:AEAD_NONCE_BYTES], blob[AEAD_NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, associated_data)
    except InvalidTag as exc:
        raise ProtocolError("share ciphertext failed authentication") from exc
