"""The client side of secure aggregation: one object per site per round, one method per stage.

Each stage method takes the server's message for that stage and returns the reply to send. Any
refusal or error aborts the client for the rest of the round and drops its secrets, so a server
cannot retry a refused request with a variant of it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcore.secagg import primitives as crypto
from fedcore.secagg.errors import (
    NotEnoughSurvivorsError,
    ProtocolError,
    RevealRefusedError,
    StageError,
)
from fedcore.secagg.messages import (
    SecAggConfig,
    Stage,
    client_id_list,
    expect_stage,
    field,
    records,
)
from fedcore.secagg.quantize import as_float_vector
from fedcore.secagg.shamir import share_length, split_secret

if TYPE_CHECKING:
    import torch

SHARE_BYTES = share_length(crypto.SEED_BYTES)  # 64: both secrets are 32 bytes
_PLAINTEXT_BYTES = 8 + 2 * SHARE_BYTES  # sender id, receiver id, s-key share, self-mask share
CIPHERTEXT_BYTES = crypto.AEAD_NONCE_BYTES + _PLAINTEXT_BYTES + crypto.AEAD_TAG_BYTES


def _count_tail(counts: Sequence[int], config: SecAggConfig) -> np.ndarray:
    """The round's K integer counts as uint32, each in [0, L] so that n of them never wrap."""
    values = list(counts)
    if len(values) != config.count_length:
        raise ValueError(f"{len(values)} counts given, the round expects {config.count_length}")
    top = config.quantizer.levels
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"count {value!r} is not an integer")
        if not 0 <= value <= top:
            raise ValueError(f"count {value} is outside [0, {top}] for this round")
    return np.asarray(values, dtype=np.uint32)


class SecAggClient:
    """A site's state machine for one round: advertise keys, share keys, mask, unmask.

    Call the stage methods in order, each with the server's message for that stage; each returns
    the message to send back. Nothing here does I/O or keeps time: the transport does both.
    """

    def __init__(self, client_id: int, *, min_threshold: int = 2) -> None:
        """Create the client.

        Args:
            client_id: this site's id in the round's roster (assigned by the server per round).
            min_threshold: the smallest threshold this site accepts (its local policy); a round
                asking for less is refused at the first stage.
        """
        self.client_id = client_id
        self.min_threshold = max(2, min_threshold)
        self._stage = Stage.ADVERTISE_KEYS
        self._config: SecAggConfig | None = None
        self._c_key: X25519PrivateKey | None = None
        self._s_key: X25519PrivateKey | None = None
        self._self_seed: bytes | None = None
        self._neighbours: frozenset[int] = frozenset()
        self._peer_s_public: dict[int, X25519PublicKey] = {}
        self._shared_c: dict[int, bytes] = {}
        # Shares this client holds, by owner (itself included): kept until unmasking.
        self._held_s: dict[int, bytes] = {}
        self._held_b: dict[int, bytes] = {}
        # Whose s-key share and whose self-mask share this client has revealed: never both.
        self._revealed_s: set[int] = set()
        self._revealed_b: set[int] = set()

    @property
    def stage(self) -> Stage:
        """The stage whose message the client expects next (or DONE / ABORTED)."""
        return self._stage

    @property
    def config(self) -> SecAggConfig:
        """The round's parameters, once the advertise-keys request has been accepted."""
        if self._config is None:
            raise StageError("the round's configuration has not arrived yet")
        return self._config

    @contextmanager
    def _stage_guard(self, stage: Stage) -> Iterator[None]:
        if self._stage is not stage:
            raise StageError(
                f"client {self.client_id} is at {self._stage.value!r}, not {stage.value!r}"
            )
        try:
            yield
        except BaseException:
            self._abort()
            raise

    def abort(self) -> None:
        """Give up the round (e.g. the transport lost its session): drop every secret."""
        self._abort()

    def _abort(self) -> None:
        self._stage = Stage.ABORTED
        self._forget_secrets()

    def _forget_secrets(self) -> None:
        # Python cannot zero memory; dropping every reference is the best a pure library can do.
        self._c_key = self._s_key = None
        self._self_seed = None
        self._shared_c.clear()
        self._held_s.clear()
        self._held_b.clear()

    def advertise_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 0: accept the round's parameters and advertise two fresh X25519 public keys.

        Args:
            request: the server's advertise-keys message (``SecAggConfig.to_message()``).

        Returns:
            ``{"stage", "c_public", "s_public"}``: the key for encrypting shares to this client and
            the key for its pairwise masks, 32 raw bytes each.

        Raises:
            ProtocolError: malformed parameters, this client not on the roster, or a threshold
                below this site's ``min_threshold``.
            StageError: called out of order.
        """
        with self._stage_guard(Stage.ADVERTISE_KEYS):
            config = SecAggConfig.from_message(request)
            if self.client_id not in config.client_ids:
                raise ProtocolError(f"client {self.client_id} is not on this round's roster")
            if config.threshold < self.min_threshold:
                raise ProtocolError(
                    f"threshold {config.threshold} is below this site's minimum "
                    f"{self.min_threshold}"
                )
            self._config = config
            self._c_key = crypto.generate_key_pair()
            self._s_key = crypto.generate_key_pair()
            self._stage = Stage.SHARE_KEYS
            return {
                "stage": Stage.ADVERTISE_KEYS.value,
                "c_public": crypto.public_bytes(self._c_key),
                "s_public": crypto.public_bytes(self._s_key),
            }

    def share_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 1: Shamir-share the s-key and a fresh self-mask seed, encrypted to each neighbour.

        The neighbourhood is recomputed here from the public roster of clients that advertised
        keys, not taken from the server. Shares go to every neighbour and to this client itself.

        Args:
            request: ``{"stage", "clients": ids that advertised keys, "public_keys": [{"client",
                "c_public", "s_public"}] for exactly this client's neighbours}``.

        Returns:
            ``{"stage", "ciphertexts": [{"to", "ciphertext"}]}``, one per neighbour; the server
            relays each to its recipient and cannot read it.

        Raises:
            ProtocolError: the roster or keys are inconsistent (wrong neighbours, repeated keys).
            NotEnoughSurvivorsError: fewer than t clients in the neighbourhood.
            StageError: called out of order.
        """
        with self._stage_guard(Stage.SHARE_KEYS):
            config = self.config
            assert self._c_key is not None and self._s_key is not None
            expect_stage(request, Stage.SHARE_KEYS)
            roster = client_id_list(field(request, "clients", list), "clients")
            if self.client_id not in roster or not set(roster) <= set(config.client_ids):
                raise ProtocolError("the key roster must be a subset of the round's clients")
            self._neighbours = config.graph(roster)[self.client_id]
            if len(self._neighbours) + 1 < config.threshold:
                raise NotEnoughSurvivorsError(
                    Stage.SHARE_KEYS.value, len(self._neighbours) + 1, config.threshold
                )
            c_keys = records(request, "public_keys", "client", "c_public", crypto.KEY_BYTES)
            s_keys = records(request, "public_keys", "client", "s_public", crypto.KEY_BYTES)
            if set(c_keys) != self._neighbours:
                raise ProtocolError(
                    "public keys must be given for exactly this client's neighbours"
                )
            every_key = [*c_keys.values(), *s_keys.values()]
            every_key += [crypto.public_bytes(self._c_key), crypto.public_bytes(self._s_key)]
            if len(set(every_key)) != len(every_key):
                # Bonawitz et al.: a repeated key would let the server reflect or merge identities.
                raise ProtocolError("advertised public keys must all be distinct")
            self._peer_s_public = {v: crypto.load_public(key) for v, key in s_keys.items()}
            self._self_seed = crypto.random_seed()
            holders = sorted(self._neighbours | {self.client_id})
            s_shares = split_secret(crypto.private_bytes(self._s_key), config.threshold, holders)
            b_shares = split_secret(self._self_seed, config.threshold, holders)
            self._held_s[self.client_id] = s_shares[self.client_id]
            self._held_b[self.client_id] = b_shares[self.client_id]
            ciphertexts = []
            for v in sorted(self._neighbours):
                shared = crypto.agree(self._c_key, crypto.load_public(c_keys[v]))
                self._shared_c[v] = shared
                key = crypto.share_key(shared, config.round_id, self.client_id, v)
                plaintext = struct.pack(">II", self.client_id, v) + s_shares[v] + b_shares[v]
                aad = crypto.context(b"share", config.round_id, self.client_id, v)
                ciphertexts.append({"to": v, "ciphertext": crypto.seal(key, plaintext, aad)})
            self._stage = Stage.MASKED_INPUT
            return {"stage": Stage.SHARE_KEYS.value, "ciphertexts": ciphertexts}

    def masked_input(
        self,
        request: Mapping[str, Any],
        vector: np.ndarray | torch.Tensor,
        counts: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Stage 2: store neighbours' shares, then send the quantised vector under all masks.

        y_u = q(x_u) + PRG(b_u) + sum over neighbours v that shared keys of
        (+PRG(s_uv) if u < v else -PRG(s_uv)), all modulo 2^32.

        Args:
            request: ``{"stage", "ciphertexts": [{"from", "ciphertext"}]}``: the shares addressed
                to this client by the neighbours that completed the share-keys stage.
            vector: this site's update, ``P - K`` values (any shape; flattened), clipped to
                [-c, c].
            counts: the round's K integer counts (``config.count_length``), each in [0, L]:
                appended after the quantised vector as they are, summed exactly.

        Returns:
            ``{"stage", "masked_vector"}``: 4 * P bytes of little-endian uint32.

        Raises:
            ProtocolError: a ciphertext from a non-neighbour, forged, altered or redirected.
            ValueError: a vector of the wrong length or not finite (the client aborts: to the
                server it dropped out).
            NotEnoughSurvivorsError: fewer than t clients of the neighbourhood shared keys.
            StageError: called out of order.
        """
        with self._stage_guard(Stage.MASKED_INPUT):
            config = self.config
            assert self._s_key is not None and self._self_seed is not None
            expect_stage(request, Stage.MASKED_INPUT)
            received = records(request, "ciphertexts", "from", "ciphertext", CIPHERTEXT_BYTES)
            if not set(received) <= self._neighbours:
                raise ProtocolError("a share ciphertext came from a client that is not a neighbour")
            if len(received) + 1 < config.threshold:
                raise NotEnoughSurvivorsError(
                    Stage.MASKED_INPUT.value, len(received) + 1, config.threshold
                )
            values = as_float_vector(vector)
            if values.size != config.float_length:
                raise ValueError(
                    f"vector has {values.size} values, the round expects {config.float_length}"
                )
            tail = _count_tail(counts, config)
            for v, blob in received.items():
                key = crypto.share_key(self._shared_c[v], config.round_id, v, self.client_id)
                aad = crypto.context(b"share", config.round_id, v, self.client_id)
                plaintext = crypto.open_sealed(key, blob, aad)
                addressed = struct.unpack(">II", plaintext[:8]) if len(plaintext) >= 8 else None
                if len(plaintext) != _PLAINTEXT_BYTES or addressed != (v, self.client_id):
                    raise ProtocolError(f"the share ciphertext from {v} is not addressed to us")
                self._held_s[v] = plaintext[8 : 8 + SHARE_BYTES]
                self._held_b[v] = plaintext[8 + SHARE_BYTES :]
            masked = np.concatenate([config.quantizer.quantize(values), tail])
            masked += crypto.expand_mask(
                crypto.self_mask_key(self._self_seed, config.round_id, self.client_id),
                config.vector_length,
            )
            for v in sorted(received):  # the neighbours that shared keys: U2 in the paper
                mask = crypto.expand_mask(
                    crypto.pairwise_mask_key(
                        crypto.agree(self._s_key, self._peer_s_public[v]),
                        config.round_id,
                        self.client_id,
                        v,
                    ),
                    config.vector_length,
                )
                if self.client_id < v:
                    masked += mask  # uint32 arrays wrap modulo 2^32
                else:
                    masked -= mask
            # The keys and the self-mask seed are no longer needed: only their shares are.
            self._c_key = self._s_key = None
            self._self_seed = None
            self._shared_c.clear()
            self._stage = Stage.UNMASKING
            return {
                "stage": Stage.MASKED_INPUT.value,
                "masked_vector": masked.astype("<u4").tobytes(),
            }

    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 3: reveal the shares that remove the masks: never both kinds for one client.

        For a neighbour that dropped before its masked vector arrived, the share of its s-key
        (so the server can recompute and remove the pairwise masks it left in our vectors); for
        a survivor, the share of its self-mask seed. Revealing both for one client would let the
        server unmask that client's individual vector, so such a request is refused (Bonawitz et
        al.), as is a request with fewer than t survivors in the neighbourhood.

        Args:
            request: ``{"stage", "survivors": ids, "dropped": ids}``, partitioning the clients
                whose shares this client holds (itself and the neighbours that shared keys).

        Returns:
            ``{"stage", "s_shares": [{"of", "share"}], "b_shares": [{"of", "share"}]}``.

        Raises:
            RevealRefusedError: a client is listed both as survivor and dropped, a survivor's
                s-share or a dropped client's b-share was already revealed, this client is listed
                as dropped, or the lists do not partition the held shares.
            NotEnoughSurvivorsError: fewer than t survivors in this client's neighbourhood.
            StageError: called out of order.
        """
        with self._stage_guard(Stage.UNMASKING):
            config = self.config
            expect_stage(request, Stage.UNMASKING)
            survivors = set(client_id_list(field(request, "survivors", list), "survivors"))
            dropped = set(client_id_list(field(request, "dropped", list), "dropped"))
            both = survivors & dropped
            if both:
                raise RevealRefusedError(
                    f"refusing to reveal both the s-key share and the self-mask share of "
                    f"client(s) {sorted(both)}: that would unmask their individual vectors"
                )
            if conflict := (survivors & self._revealed_s) | (dropped & self._revealed_b):
                raise RevealRefusedError(
                    f"the other share of client(s) {sorted(conflict)} was already revealed"
                )
            if self.client_id in dropped:
                raise RevealRefusedError("this client is alive; it cannot be listed as dropped")
            if survivors | dropped != set(self._held_s):
                raise RevealRefusedError(
                    "survivors and dropped must partition the clients whose shares we hold"
                )
            if len(survivors) < config.threshold:
                raise NotEnoughSurvivorsError(
                    Stage.UNMASKING.value, len(survivors), config.threshold
                )
            self._revealed_s |= dropped
            self._revealed_b |= survivors
            reply = {
                "stage": Stage.UNMASKING.value,
                "s_shares": [{"of": v, "share": self._held_s[v]} for v in sorted(dropped)],
                "b_shares": [{"of": v, "share": self._held_b[v]} for v in sorted(survivors)],
            }
            self._stage = Stage.DONE
            self._forget_secrets()
            return reply
