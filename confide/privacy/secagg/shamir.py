"""Shamir t-of-n secret sharing over GF(p), p = 2^31 - 1, vectorized with NumPy.

A secret of any length is cut into 16-bit limbs; each limb is one field element, so a
32-byte key is 16 elements. Sharing evaluates one random polynomial of degree t-1 per
limb at every recipient's x-coordinate (Horner's rule in int64: a product of two
elements is below 2^62, so nothing overflows); recovering runs Lagrange interpolation
at 0 for all secrets at once. One call shares or recovers every secret of a round.

Fewer than t shares carry no information about a secret: every value of it is equally
consistent with them. :func:`recover` refuses to interpolate from fewer than t shares.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from confide.errors import ConfideError

P = (1 << 31) - 1  # a Mersenne prime; all arithmetic is mod P in int64
LIMB_BITS = 16

Int64Array = npt.NDArray[np.int64]


class ShamirError(ConfideError, ValueError):
    """Shares that cannot recover a secret (too few, inconsistent, or out of range)."""


def random_field(shape: tuple[int, ...]) -> Int64Array:
    """Uniform elements of GF(P) from the OS CSPRNG (64 random bits reduced: bias < 2^-32)."""
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (raw % np.uint64(P)).astype(np.int64).reshape(shape)


def to_limbs(secrets: list[bytes]) -> Int64Array:
    """Equal-length secrets (bytes) -> (S, L) array of 16-bit limbs."""
    if not secrets:
        return np.zeros((0, 0), dtype=np.int64)
    size = len(secrets[0])
    if size % 2 or any(len(s) != size for s in secrets):
        raise ShamirError("secrets shared together must have the same, even length")
    raw = np.frombuffer(b"".join(secrets), dtype="<u2").reshape(len(secrets), size // 2)
    return raw.astype(np.int64)


def from_limbs(limbs: Int64Array) -> list[bytes]:
    """(S, L) limbs -> secrets; a limb outside 16 bits means the shares were inconsistent."""
    if limbs.size and (limbs.min() < 0 or limbs.max() >= 1 << LIMB_BITS):
        raise ShamirError("the shares do not recover a valid secret (corrupted or mixed shares)")
    return [row.astype("<u2").tobytes() for row in limbs]


def share(limbs: Int64Array, xs: npt.ArrayLike, threshold: int) -> Int64Array:
    """Shares of every secret at every x: (S, L) limbs -> (S, len(xs), L) field elements.

    ``xs`` are the recipients' nonzero, distinct x-coordinates (their ids).
    """
    x = np.asarray(xs, dtype=np.int64)
    if threshold < 1 or threshold > len(x):
        raise ShamirError(f"threshold {threshold} must be between 1 and {len(x)} shares")
    if np.any(x <= 0) or np.any(x >= P) or len(np.unique(x)) != len(x):
        raise ShamirError("share x-coordinates must be distinct and in 1..p-1")
    s, limb_count = limbs.shape
    # coefficient 0 is the secret, 1..t-1 are uniformly random
    coeffs = random_field((threshold - 1, s, 1, limb_count))
    out = np.zeros((s, len(x), limb_count), dtype=np.int64)
    xcol = x.reshape(1, -1, 1)
    for c in coeffs[::-1]:  # Horner: ((a_{t-1} x + a_{t-2}) x + ...) x + a_0
        out += c
        out %= P
        out *= xcol
        out %= P
    out += limbs.reshape(s, 1, limb_count)
    out %= P
    return out


def _inverse(a: Int64Array) -> Int64Array:
    """a^(p-2) mod p, elementwise (Fermat), by square-and-multiply in int64."""
    result = np.ones_like(a)
    base = a % P
    e = P - 2
    while e:
        if e & 1:
            result = result * base % P
        base = base * base % P
        e >>= 1
    return result


def lagrange_at_zero(xs: Int64Array) -> Int64Array:
    """Lagrange coefficients at 0 for each row of x-coordinates: (S, t) -> (S, t)."""
    s, t = xs.shape
    num = np.ones((s, t), dtype=np.int64)
    den = np.ones((s, t), dtype=np.int64)
    for m in range(t):
        xm = xs[:, m : m + 1]
        mask = np.arange(t) != m
        num = np.where(mask, num * xm % P, num)
        den = np.where(mask, den * ((xm - xs) % P) % P, den)
    if np.any(den == 0):
        raise ShamirError("two shares of one secret have the same x-coordinate")
    return num * _inverse(den) % P


def recover(xs: npt.ArrayLike, ys: Int64Array, threshold: int) -> Int64Array:
    """Secrets from shares: xs (S, m), ys (S, m, L) with m >= threshold -> (S, L) limbs.

    The first ``threshold`` shares of each secret are used.
    """
    x = np.asarray(xs, dtype=np.int64)
    if x.ndim != 2 or ys.ndim != 3 or ys.shape[:2] != x.shape:
        raise ShamirError("shares must be xs (S, m) and ys (S, m, L)")
    if x.shape[1] < threshold:
        raise ShamirError(
            f"{x.shape[1]} shares cannot recover a secret shared with threshold {threshold}"
        )
    x, y = x[:, :threshold], ys[:, :threshold, :]
    if np.any(y < 0) or np.any(y >= P) or np.any(x <= 0) or np.any(x >= P):
        raise ShamirError("a share is outside the field")
    lam = lagrange_at_zero(x)
    out = np.zeros((y.shape[0], y.shape[2]), dtype=np.int64)
    for j in range(threshold):
        out += lam[:, j : j + 1] * y[:, j, :] % P
        out %= P
    return out
