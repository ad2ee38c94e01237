"""Client-level differential privacy: clipped updates, Gaussian noise, adaptive clipping.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, 2018, "Learning Differentially Private Recurrent
Language Models"): every silo's update delta is clipped to L2 norm ``C``; the server sums the
clipped deltas, adds ``N(0, (z C)^2)`` to every coordinate of the sum and divides by the
*expected* number of silos ``m`` -- the fixed-denominator estimator (their eq. for
``f_f`` with all weights 1). Adding or removing one silo changes the sum by at most ``C``, so
the released mean has L2 sensitivity ``C / m`` and carries noise ``z C / m``: a Gaussian
mechanism with noise multiplier ``z``, accounted per round by
``fedcore.privacy.accounting`` with ``sample_rate`` = the probability a silo takes part.
Example counts are never used as weights: a weight would make the sensitivity depend on the
silo's data (and a silo's size is itself what client-level DP hides).

Noise comes from :class:`NoiseSource`, a ChaCha20 keystream under a fresh 256-bit key from the
operating system. numpy's and torch's generators are not cryptographic: their output is
predictable from a small seed (torch takes 64 bits) or from enough past output (Mersenne
Twister's state is recoverable from 624 words), and an adversary who can predict the noise can
subtract it. Gaussians come from the Box-Muller transform, and every released value is the sum
of four of them divided by two (Holohan & Braghin, 2021, "Secure Random Sampling in
Differential Privacy", section 5.1, as Opacus's secure mode does) against floating-point attacks
on the low bits of a single Gaussian sample (Mironov, 2012; Jin et al., 2022).

Adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy, 2021, "Differentially Private
Learning with Adaptive Clipping") tracks a target quantile of the update norms with a noised
count; distributed noise (each silo adds its share before secure aggregation) keeps the server
from ever seeing the un-noised sum.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import TypeGuard

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

from fedcore.tensors import IncompatibleStateDict, check_compatible, signature

__all__ = [
    "AdaptiveClip",
    "DPFedAvg",
    "DistributedNoise",
    "NoiseSource",
    "add_noise",
    "clip_update",
    "distributed_noise_share",
]

_KEY_BYTES = 32
# Values generated per chunk: bounds the temporary memory (about 40 bytes per value) whatever
# the model size.
_CHUNK_VALUES = 1 << 18
_CHUNK_BYTES = 4 * 2 * 8 * _CHUNK_VALUES  # 4 Gaussians per value, 2 uniforms per pair of them
_ZEROS = bytes(_CHUNK_BYTES)
# ChaCha20's 32-bit block counter: one stream holds at most 2**32 blocks of 64 bytes.
_MAX_STREAM_BYTES = (1 << 32) * 64
_TWO_PI = 2.0 * math.pi
_INV_2_53 = 2.0**-53


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shape(shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in dims):
        raise ValueError(f"shape must be non-negative integers, got {shape!r}")
    return dims


class NoiseSource:
    """Cryptographically strong uniform and Gaussian samples from a ChaCha20 keystream.

    Each call reads a fresh stream (a new nonce under the key), so no keystream is ever used
    twice; threads may share a source. Processes must not: a fork copies the key and the
    nonce counter, and two copies would draw the same noise (which then cancels out of a
    difference). Create the source in the process that uses it.
    """

    def __init__(self, key: bytes | None = None) -> None:
        """Start a source under a fresh random key, or under ``key`` to reproduce (tests only).

        Args:
            key: 32 bytes. Leave it None in production: anyone who knows the key can recompute
                and subtract the noise, which voids the privacy guarantee.

        Raises:
            ValueError: ``key`` is not 32 bytes.
        """
        if key is None:
            key = secrets.token_bytes(_KEY_BYTES)
        if not isinstance(key, bytes | bytearray) or len(key) != _KEY_BYTES:
            raise ValueError(f"key must be {_KEY_BYTES} bytes")
        self._key = bytes(key)
        self._streams = 0
        self._lock = threading.Lock()

    def _new_stream(self, nbytes: int) -> CipherContext:
        # A fresh 96-bit nonce per call (cryptography's 16-byte ChaCha20 nonce is the 32-bit
        # block counter followed by the nonce), so no keystream byte is ever used twice.
        if nbytes > _MAX_STREAM_BYTES:
            raise ValueError("too many values for one call; split the request")
        with self._lock:
            stream, self._streams = self._streams, self._streams + 1
        nonce = (0).to_bytes(4, "little") + stream.to_bytes(12, "little")
        return Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()

    @staticmethod
    def _words(stream: CipherContext, count: int) -> np.ndarray:
        data = stream.update(memoryview(_ZEROS)[: 8 * count])
        return np.frombuffer(data, dtype="<u8")

    def uniform(self, shape: int | Sequence[int] | torch.Size) -> torch.Tensor:
        """Return independent uniform float64 values in [0, 1) with 53 random bits each.

        Args:
            shape: the output shape.
        """
        dims = _shape(shape)
        count = math.prod(dims)
        stream = self._new_stream(8 * count)
        out = np.empty(count, dtype=np.float64)
        chunk = _CHUNK_BYTES // 8
        for start in range(0, count, chunk):
            words = self._words(stream, min(chunk, count - start))
            out[start : start + words.size] = (words >> np.uint64(11)) * _INV_2_53
        return torch.from_numpy(out).reshape(dims)

    def gaussian(
        self,
        shape: int | Sequence[int] | torch.Size,
        std: float,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Return independent ``N(0, std^2)`` samples.

        Args:
            shape: the output shape.
            std: standard deviation, a finite number >= 0 (0 gives zeros).
            dtype: a floating dtype; values are computed in float64 and rounded to it.

        Raises:
            ValueError: ``std`` is negative or not finite, or ``dtype`` is not floating.
        """
        dims = _shape(shape)
        if not _is_number(std) or std < 0:
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        count = math.prod(dims)
        if std == 0 or count == 0:
            return torch.zeros(dims, dtype=dtype)
        stream = self._new_stream(32 * count)
        out = np.empty(count, dtype=np.float64)
        for start in range(0, count, _CHUNK_VALUES):
            size = min(_CHUNK_VALUES, count - start)
            words = self._words(stream, 4 * size).reshape(2, 2 * size)
            # Box-Muller: u1 in (0, 1] keeps log finite, u2 in [0, 1).
            u1 = ((words[0] >> np.uint64(11)) + np.uint64(1)) * _INV_2_53
            u2 = (words[1] >> np.uint64(11)) * _INV_2_53
            radius = np.sqrt(-2.0 * np.log(u1))
            angle = _TWO_PI * u2
            normals = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))
            # Four N(0, 1) summed have variance 4: halve to get N(0, 1) again.
            out[start : start + size] = normals.reshape(4, size).sum(axis=0) * (0.5 * std)
        return torch.from_numpy(out).reshape(dims).to(dtype)


def _check_state(state: object, what: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise ValueError(f"{what}: expected a mapping of tensor name -> tensor")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{what}: tensor {name!r} is {type(tensor).__name__}, expected torch.Tensor"
            )
        if tensor.is_complex():
            raise ValueError(f"{what}: tensor {name!r} is complex; only real tensors are allowed")
    return state


def _check_clip(clip: object) -> float:
    if not _is_number(clip) or clip <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    return float(clip)


def clip_update(
    delta: Mapping[str, torch.Tensor], clip: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Scale an update so that the L2 norm over all its floating tensors is at most ``clip``.

    Integer and bool tensors (buffers such as BatchNorm's ``num_batches_tracked``) are left out
    of the norm and returned unchanged. An update already within the bound, including the zero
    update, is returned unchanged (as copies).

    Args:
        delta: tensor name -> tensor, the update (new weights minus global weights). Not
            modified.
        clip: the L2 bound ``C``, > 0.

    Returns:
        ``(clipped, norm)``: new tensors in the input dtypes, and the norm before clipping.

    Raises:
        ValueError: ``clip`` is not > 0, a value is not a real tensor, or a floating tensor
            holds NaN or Inf (its norm would be meaningless).
    """
    clip = _check_clip(clip)
    _check_state(delta, "update")
    squares = 0.0
    unit_roundoff = 0.0
    for name, tensor in delta.items():
        if not tensor.is_floating_point():
            continue
        value = float(torch.sum(tensor.detach().to(torch.float64).square()))
        if not math.isfinite(value):
            raise ValueError(f"update: tensor {name!r} holds NaN or Inf; refuse this update")
        squares += value
        unit_roundoff = max(unit_roundoff, torch.finfo(tensor.dtype).eps / 2)
    norm = math.sqrt(squares)
    factor = 1.0
    if norm > clip:
        # Rounding the factor and each scaled value to the tensor's dtype can each add a
        # relative error of one unit roundoff (and the float64 norm a far smaller one): shrink
        # by a margin above both so that the clipped norm never exceeds the bound.
        factor = clip / (norm * (1 + 4 * unit_roundoff + 1e-9))
    clipped: dict[str, torch.Tensor] = {}
    for name, tensor in delta.items():
        tensor = tensor.detach()
        scale = tensor.is_floating_point() and factor != 1.0
        clipped[name] = tensor.mul(factor) if scale else tensor.clone()
    return clipped, norm


def add_noise(
    aggregate: Mapping[str, torch.Tensor], std: float, source: NoiseSource
) -> dict[str, torch.Tensor]:
    """Return a copy of ``aggregate`` with ``N(0, std^2)`` added to every floating value.

    Args:
        aggregate: tensor name -> tensor; not modified. Integer and bool tensors are copied
            without noise.
        std: noise standard deviation, >= 0.
        source: where the noise comes from.

    Raises:
        ValueError: ``std`` is negative or not finite, or a value is not a real tensor.
    """
    _check_state(aggregate, "aggregate")
    result: dict[str, torch.Tensor] = {}
    for name, tensor in aggregate.items():
        tensor = tensor.detach()
        if not tensor.is_floating_point():
            result[name] = tensor.clone()
            continue
        work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        noise = source.gaussian(tuple(tensor.shape), std, dtype=work)
        result[name] = (tensor.to(work) + noise).to(tensor.dtype)
    return result


class DPFedAvg:
    """Streaming DP-FedAvg: the noised, unweighted mean of clipped update deltas.

    Memory is one accumulator the size of the model, whatever the number of silos. The
    accumulator holds the plain sum of clipped deltas (float32 for float16/bfloat16/float32
    tensors, float64 for float64); :meth:`result` adds ``N(0, (z C)^2)`` to it and divides by
    the expected number of silos (fixed-denominator estimator, sensitivity ``C / m``).

    Integer and bool tensors are not released: their mean delta is reported as 0 (the global
    model keeps its values). Releasing them without noise (a BatchNorm counter, say, reveals
    how many local steps a silo took, hence its size) would fall outside the guarantee.
    """

    def __init__(
        self, *, clip: float, noise_multiplier: float, source: NoiseSource | None = None
    ) -> None:
        """Start an empty round.

        Args:
            clip: the L2 bound ``C`` on each silo's delta, > 0.
            noise_multiplier: ``z`` > 0; the noise on the sum has standard deviation ``z C``.
                With adaptive clipping pass :meth:`AdaptiveClip.update_noise_multiplier`.
            source: the noise source; a fresh :class:`NoiseSource` when None.

        Raises:
            ValueError: ``clip`` or ``noise_multiplier`` is not a finite number > 0.
        """
        self._clip = _check_clip(clip)
        if not _is_number(noise_multiplier) or noise_multiplier <= 0:
            raise ValueError(
                f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}; "
                "use plain fedavg for a plan without client-level DP"
            )
        self._noise_multiplier = float(noise_multiplier)
        self._source = source if source is not None else NoiseSource()
        self._signature: dict[str, tuple[str, tuple[int, ...]]] | None = None
        self._dtypes: dict[str, torch.dtype] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._count = 0
        self._released = False

    @property
    def count(self) -> int:
        """Number of deltas added so far."""
        return self._count

    @property
    def clip(self) -> float:
        """The L2 bound on each delta."""
        return self._clip

    @property
    def noise_multiplier(self) -> float:
        """The noise multiplier ``z``."""
        return self._noise_multiplier

    def noise_std(self, num_clients_expected: int) -> float:
        """Return the standard deviation of the noise on each value of the mean.

        Args:
            num_clients_expected: the fixed denominator ``m``.
        """
        return self._noise_multiplier * self._clip / _check_expected(num_clients_expected)

    def add(self, delta: Mapping[str, torch.Tensor]) -> float:
        """Clip one silo's delta and add it to the sum; a refused delta changes nothing.

        Args:
            delta: tensor name -> tensor (new weights minus the round's global weights), same
                keys, shapes and dtypes as every other delta. Not modified or retained.

        Returns:
            the delta's L2 norm before clipping (for :class:`AdaptiveClip`; do not publish it,
            it is not noised).

        Raises:
            ValueError: a value is not a real tensor, holds NaN/Inf, or :meth:`result` was
                already called.
            IncompatibleStateDict: keys, shapes or dtypes differ from the first delta.
        """
        if self._released:
            raise ValueError("this round's result was already released; start a new DPFedAvg")
        where = f"delta #{self._count}"
        _check_state(delta, where)
        if self._signature is not None:
            try:
                check_compatible(delta, self._signature)
            except IncompatibleStateDict as exc:
                raise IncompatibleStateDict(
                    f"{where} does not match delta #0: {exc}; every site must send the full "
                    "state dict of the plan's model"
                ) from exc
        try:
            clipped, norm = clip_update(delta, self._clip)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if self._signature is None:
            self._signature = signature(delta)
            for name, tensor in clipped.items():
                self._dtypes[name] = tensor.dtype
                self._shapes[name] = tuple(tensor.shape)
                if tensor.is_floating_point():
                    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
                    self._sum[name] = torch.zeros(tensor.shape, dtype=work)
        for name, accumulator in self._sum.items():
            accumulator.add_(clipped[name].to(device="cpu", dtype=accumulator.dtype))
        self._count += 1
        return norm

    def result(self, num_clients_expected: int) -> dict[str, torch.Tensor]:
        """Release ``(sum + N(0, (z C)^2)) / num_clients_expected``, once.

        Args:
            num_clients_expected: the fixed denominator ``m``: the number of silos expected
                to report this round (fixed before the round, never the number that did
                report, which depends on the data). Fewer reports bias the mean towards 0
                without weakening the guarantee.

        Returns:
            tensor name -> mean delta in the input dtypes (integer and bool tensors: zeros).

        Raises:
            ValueError: no delta was added, ``num_clients_expected`` is not an integer >= 1,
                or the result was already released (a second release would spend the privacy
                budget again).
        """
        expected = _check_expected(num_clients_expected)
        if self._released:
            raise ValueError("this round's result was already released; start a new DPFedAvg")
        if self._count == 0:
            raise ValueError("DP-FedAvg needs at least one delta; none was added")
        self._released = True
        std = self._noise_multiplier * self._clip
        result: dict[str, torch.Tensor] = {}
        for name, dtype in self._dtypes.items():
            if name not in self._sum:
                result[name] = torch.zeros(self._shapes[name], dtype=dtype)
                continue
            total = self._sum[name]
            noise = self._source.gaussian(tuple(total.shape), std, dtype=total.dtype)
            result[name] = ((total + noise) / expected).to(dtype)
        self._sum.clear()
        return result


def _check_expected(num_clients_expected: object) -> int:
    if (
        isinstance(num_clients_expected, bool)
        or not isinstance(num_clients_expected, int)
        or num_clients_expected < 1
    ):
        raise ValueError(
            f"num_clients_expected must be an integer >= 1, got {num_clients_expected!r}"
        )
    return num_clients_expected


class AdaptiveClip:
    """Clip norm that tracks a quantile of the update norms (Andrew et al., 2021).

    Each round every silo reports ``b_i - 1/2`` with ``b_i = 1`` when its update norm is at
    most the current clip (:meth:`client_report`). The server adds ``N(0, sigma_b^2)`` to the
    sum of the reports, forms ``b = (sum + noise) / m + 1/2`` and moves the clip
    geometrically: ``C <- C * exp(-eta * (b - gamma))``, so ``C`` settles where a fraction
    ``gamma`` of the norms lies below it. Centring the reports on 0 makes the sum's
    sensitivity 1/2, so the count is a Gaussian mechanism with noise multiplier
    ``2 sigma_b``; released together with the update (noise multiplier ``z_delta``) the round
    is one Gaussian mechanism with ``z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2)`` (their
    Theorem 1). Account the round with ``z`` and add update noise with
    ``z_delta = update_noise_multiplier(z)``. The paper suggests ``sigma_b = m / 20``.
    """

    def __init__(
        self,
        *,
        initial_clip: float,
        noise_std_for_count: float,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        source: NoiseSource | None = None,
    ) -> None:
        """Start at ``initial_clip``.

        Args:
            initial_clip: the first round's clip, > 0.
            noise_std_for_count: ``sigma_b``, the noise on the sum of the reports, > 0.
            target_quantile: ``gamma`` in (0, 1): the fraction of updates left unclipped.
            learning_rate: ``eta`` > 0, the step of the geometric update.
            source: the noise source; a fresh :class:`NoiseSource` when None.

        Raises:
            ValueError: an argument is out of range.
        """
        self._clip = _check_clip(initial_clip)
        if not _is_number(noise_std_for_count) or noise_std_for_count <= 0:
            raise ValueError(
                f"noise_std_for_count must be a finite number > 0, got {noise_std_for_count!r}"
            )
        if not _is_number(target_quantile) or not 0 < target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
        if not _is_number(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")
        self._count_std = float(noise_std_for_count)
        self._target = float(target_quantile)
        self._learning_rate = float(learning_rate)
        self._source = source if source is not None else NoiseSource()

    @property
    def clip(self) -> float:
        """The clip norm for the next round."""
        return self._clip

    def client_report(self, norm: float) -> float:
        """Return a silo's report for this round: 1/2 if ``norm <= clip``, else -1/2.

        Args:
            norm: the L2 norm of the silo's update before clipping, >= 0.
        """
        if not _is_number(norm) or norm < 0:
            raise ValueError(f"norm must be a finite number >= 0, got {norm!r}")
        return 0.5 if norm <= self._clip else -0.5

    def update(self, report_sum: float, num_clients_expected: int) -> float:
        """Noise the sum of this round's reports, move the clip and return the new clip.

        Args:
            report_sum: the sum of the silos' :meth:`client_report` values (with secure
                aggregation, the unmasked sum).
            num_clients_expected: the fixed denominator ``m`` (as for DP-FedAvg).

        Raises:
            ValueError: ``report_sum`` is not finite or ``num_clients_expected`` is invalid.
        """
        expected = _check_expected(num_clients_expected)
        if not _is_number(report_sum):
            raise ValueError(f"report_sum must be a finite number, got {report_sum!r}")
        noise = float(self._source.gaussian((), self._count_std, dtype=torch.float64))
        fraction_below = (float(report_sum) + noise) / expected + 0.5
        self._clip *= math.exp(-self._learning_rate * (fraction_below - self._target))
        return self._clip

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """Return ``z_delta``, the update's noise multiplier, so the round's total is ``z``.

        Args:
            noise_multiplier: ``z``, the noise multiplier the round is accounted with, > 0.

        Raises:
            ValueError: ``z >= 2 sigma_b``: the count alone would need more privacy than the
                whole round has; raise ``noise_std_for_count``.
        """
        if not _is_number(noise_multiplier) or noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be a number > 0, got {noise_multiplier!r}")
        count_multiplier = 2 * self._count_std
        if noise_multiplier >= count_multiplier:
            raise ValueError(
                f"noise_multiplier {noise_multiplier:g} needs noise_std_for_count above "
                f"{noise_multiplier / 2:g} (now {self._count_std:g})"
            )
        return float((noise_multiplier**-2 - count_multiplier**-2) ** -0.5)


class DistributedNoise:
    """Noise shared among silos: each adds a slice before secure aggregation.

    Each silo adds ``N(0, total_std^2 / threshold)`` to its clipped delta, so the sum of
    ``k`` shares carries ``N(0, k total_std^2 / threshold)``: the full ``total_std`` once
    ``threshold`` silos contributed. The server only ever sees the noised sum.

    Assumptions the guarantee rests on: at least ``threshold`` silos follow the protocol and
    keep their shares secret. A silo colluding with the server knows its own share, so it
    counts for nothing; a silo that drops out after masking contributed no noise. With
    ``n`` honest contributions the sum carries ``effective_std(n)``, less than
    ``total_std`` when ``n < threshold``: account such a round with the effective noise
    multiplier ``effective_std(n) / clip``, or set ``threshold`` below the number of silos
    (e.g. the plan's minimum) so that dropouts down to it still give the full noise.
    """

    def __init__(self, *, total_std: float, threshold: int) -> None:
        """Split ``total_std`` among ``threshold`` contributions.

        Args:
            total_std: the standard deviation the sum must carry, > 0 (``z C`` for DP-FedAvg).
            threshold: the number of honest contributions the full noise needs, >= 1.

        Raises:
            ValueError: an argument is out of range.
        """
        if not _is_number(total_std) or total_std <= 0:
            raise ValueError(f"total_std must be a finite number > 0, got {total_std!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"threshold must be an integer >= 1, got {threshold!r}")
        self._total_std = float(total_std)
        self._threshold = threshold

    @property
    def per_client_std(self) -> float:
        """Standard deviation of one silo's share: ``total_std / sqrt(threshold)``."""
        return self._total_std / math.sqrt(self._threshold)

    def effective_std(self, n_survivors: int) -> float:
        """Return the noise the sum carries when ``n_survivors`` honest silos added a share.

        Args:
            n_survivors: honest silos whose shares reached the sum, >= 0.
        """
        if isinstance(n_survivors, bool) or not isinstance(n_survivors, int) or n_survivors < 0:
            raise ValueError(f"n_survivors must be an integer >= 0, got {n_survivors!r}")
        return self.per_client_std * math.sqrt(n_survivors)

    def share(
        self,
        shapes: Mapping[str, Sequence[int] | torch.Size],
        source: NoiseSource,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, torch.Tensor]:
        """Return one silo's noise share, one tensor per name.

        Args:
            shapes: tensor name -> shape, for the floating tensors of the update.
            source: the silo's own noise source (never shared).
            dtype: a floating dtype for the shares.
        """
        return {
            name: source.gaussian(_shape(shape), self.per_client_std, dtype=dtype)
            for name, shape in shapes.items()
        }


def distributed_noise_share(
    shapes: Mapping[str, Sequence[int] | torch.Size],
    total_std: float,
    n_clients: int,
    source: NoiseSource,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Return one silo's share ``N(0, total_std^2 / n_clients)`` of the round's noise.

    The sum of all ``n_clients`` shares carries ``N(0, total_std^2)`` only if every silo
    contributes and none colludes with the server; see :class:`DistributedNoise` to plan for
    dropouts and to compute the noise actually present.

    Args:
        shapes: tensor name -> shape, for the floating tensors of the update.
        total_std: the standard deviation the sum must carry, > 0.
        n_clients: the number of silos adding a share, >= 1.
        source: the silo's own noise source.
        dtype: a floating dtype for the shares.
    """
    return DistributedNoise(total_std=total_std, threshold=n_clients).share(
        shapes, source, dtype=dtype
    )
