"""Masks and quantization in the ring Z_2^32 (uint32 with natural wraparound).

Masks: a 128-bit seed is an AES-128 key; AES-128-CTR over zeros (pyca/cryptography)
expands it into a preallocated uint32 buffer, about 1 ms per million words here.

Quantization (the only lossy step): a site's update ``x`` (a flat float vector) is
clipped to [-c, c], scaled by its weight ``w = n / max_weight`` (``n`` its example
count, at most ``max_weight``) and stochastically rounded to integers in [-Q, Q] with
``Q = floor((2^31 - 1) / N)`` for a round of N sites, so the sum of N quantized vectors
stays inside (-2^31, 2^31) and never wraps. The count ``n`` travels as one more ring
element. The coordinator then gets ``sum_i w_i x_i`` and ``sum_i n_i`` and divides:

    mean = (c * max_weight / Q) * S / sum_i n_i,   S = the int32 view of the ring sum

Stochastic rounding is unbiased; each coordinate of the weighted mean is within
``N * c * max_weight / (Q * sum_i n_i)`` of the float weighted mean (each site's rounding
error is below one step). :func:`error_bound` gives that figure.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from confide.errors import ConfideError

U32 = npt.NDArray[np.uint32]
F64 = npt.NDArray[np.float64]
RING_HALF = 1 << 31
_ZERO_NONCE = bytes(16)  # every seed is fresh per round and expands exactly one vector


class QuantizationError(ConfideError, ValueError):
    """An update that cannot be quantized as configured (non-finite, or too many examples)."""


def levels(sites: int) -> int:
    """Q: the largest |quantized value| that N sites can sum without wrapping."""
    if sites < 1:
        raise QuantizationError("a round needs at least one site")
    return (RING_HALF - 1) // sites


class MaskExpander:
    """Expands 16-byte seeds into uint32 masks of length ``dim``, reusing its buffers.

    :meth:`add` works in blocks of :data:`BLOCK` words, so each block of keystream is
    added while it is still in the CPU cache (one pass over the accumulator per mask).
    """

    BLOCK = 1 << 16  # uint32 words: 256 KiB of keystream per step

    def __init__(self, dim: int) -> None:
        self.dim = dim
        block = min(dim, self.BLOCK)
        self._zeros = bytes(4 * block)
        # update_into may write up to a block beyond the input length.
        self._buf = bytearray(4 * block + 16)
        self._view = np.frombuffer(self._buf, dtype="<u4", count=block)

    def expand(self, seed: bytes) -> U32:
        """The whole mask of ``seed`` as a new array (tests and tools; :meth:`add` is faster)."""
        out = np.zeros(self.dim, dtype=np.uint32)
        self.add(out, seed)
        return out

    def add(self, acc: U32, seed: bytes, sign: int = 1) -> None:
        """acc += sign * mask(seed) in Z_2^32, in place."""
        if len(seed) != 16:
            raise ValueError("mask seeds are 16 bytes (AES-128 keys)")
        if acc.shape != (self.dim,) or acc.dtype != np.uint32:
            raise ValueError(f"the accumulator must be uint32 of shape ({self.dim},)")
        enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
        op = np.add if sign >= 0 else np.subtract
        block = len(self._view)
        for start in range(0, self.dim, block):
            n = min(block, self.dim - start)
            enc.update_into(self._zeros[: 4 * n], self._buf)
            part = acc[start : start + n]
            op(part, self._view[:n], out=part)


def quantize(
    x: npt.ArrayLike,
    *,
    clip: float,
    weight: float,
    sites: int,
    rng: np.random.Generator | None = None,
) -> U32:
    """Clip, weight (0 <= weight <= 1) and stochastically round ``x`` into the ring."""
    if not 0.0 <= weight <= 1.0:
        raise QuantizationError(f"weight {weight} must be in [0, 1]")
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise QuantizationError("the update holds NaN or infinite values")
    q = levels(sites)
    scaled = np.clip(v, -clip, clip)  # a new array: the caller's update is not touched
    scaled *= weight * q / clip
    rng = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    floor = np.floor(scaled)
    floor += rng.random(floor.shape) < (scaled - floor)
    return floor.astype(np.int64).astype(np.uint32)


def dequantize_sum(total: U32, *, clip: float, max_weight: int, sites: int, count: int) -> F64:
    """The weighted mean from the ring sum of N quantized vectors and the summed count."""
    if count <= 0:
        raise QuantizationError("the aggregated example count is zero; nothing to average")
    signed = total.view(np.int32).astype(np.float64)
    return signed * (clip * max_weight / levels(sites) / count)


def error_bound(*, clip: float, max_weight: int, sites: int, count: int) -> float:
    """Largest difference between a dequantized coordinate and the float weighted mean."""
    return sites * clip * max_weight / levels(sites) / count
