"""The coordinator's checks that an upload is what it asked for, before anything counts it.

Two families, each refusing with a typed :class:`~confide.server.rounds.Reason`:

* **who and when** (:func:`check_signed`): the upload carries the site's signature of its
  update statement (:mod:`confide.privacy.crypto.signing`), made with the key of the
  certificate the site connected with, for this federation, this site, the round that is
  running, and a nonce the site never used before (kept in the store, so a restart does
  not reopen the window);
* **what** (:func:`check_arrays`, :func:`check_client_clip`): the arrays have the model's
  number, shapes and dtype kinds, hold no NaN or infinity, and, under client-level DP
  without secure aggregation, the update's norm is within the round's clip C.

A refused upload fails only that site's task; the round carries on with the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from confide.privacy.crypto import (
    PKIError,
    SignatureInvalid,
    StatementInvalid,
    UpdateStatement,
    verify_update,
)
from confide.privacy.crypto.signing import RECORD_KEYS
from confide.privacy.dp import federated as dpfed
from confide.server.rounds import Reason, Rejected, finite
from confide.wire import Payload, ScalarValue

__all__ = [
    "INTEGRITY_REASONS",
    "NonceStore",
    "check_arrays",
    "check_client_clip",
    "check_signed",
    "clip_limit",
]

# The reasons that point at a forged, replayed or misdirected upload (audited).
INTEGRITY_REASONS = frozenset(
    {
        Reason.UNSIGNED,
        Reason.BAD_SIGNATURE,
        Reason.WRONG_FEDERATION,
        Reason.WRONG_SITE,
        Reason.WRONG_ROUND,
        Reason.REPLAYED,
    }
)
# Gaussian noise of d coordinates has norm above σ(√d + t) with probability below
# exp(-t²/2): t = 8 makes an honest site's refusal a 1e-14 event.
NOISE_TAIL = 8.0
F32_EPS = float(np.finfo(np.float32).eps)


class NonceStore(Protocol):
    def claim_nonce(self, site_id: str, nonce: bytes, rnd: int) -> bool: ...


def check_signed(
    payload: Payload,
    *,
    site: str,
    certificate: bytes,
    federation: str,
    current_round: int | None,
    nonces: NonceStore,
) -> UpdateStatement:
    """Verify an upload's signed statement against the caller and the running round.

    ``site`` and ``certificate`` come from the mutual-TLS peer, never from the upload.
    The signature is checked first (so the fields compared next are the site's own
    claim), then federation, site, round, and last the nonce, which is recorded (a
    refused upload burns its nonce too: a site signs each upload afresh). On success the
    reserved ``confide.*`` entries are removed from ``payload.config``.
    """
    if not payload.signature:
        raise Rejected(
            "the upload is not signed (protocol 3 and later sign every upload). Fix: upgrade the "
            "site's confide",
            Reason.UNSIGNED,
        )
    try:
        statement = UpdateStatement.from_record(
            payload.config,
            task_id=payload.task_id,
            manifest_sha256=payload.manifest_sha256,
            data_digest=payload.data_digest,
        )
    except StatementInvalid as e:
        raise Rejected(f"no valid update statement: {e}", Reason.UNSIGNED) from None
    try:
        verify_update(certificate, statement, payload.signature)
    except (SignatureInvalid, PKIError) as e:
        raise Rejected(str(e), Reason.BAD_SIGNATURE) from None
    if statement.federation != federation:
        raise Rejected(
            f"signed for federation {statement.federation!r}, this is {federation!r}",
            Reason.WRONG_FEDERATION,
        )
    if statement.site != site:
        raise Rejected(
            f"the statement names site {statement.site!r}, but the certificate is {site!r}'s "
            "(identity comes from the certificate only)",
            Reason.WRONG_SITE,
        )
    if current_round is not None and statement.round != current_round:
        raise Rejected(
            f"signed for round {statement.round}, the coordinator is in round {current_round}",
            Reason.WRONG_ROUND,
        )
    if not nonces.claim_nonce(site, statement.nonce, statement.round):
        raise Rejected(
            f"nonce {statement.nonce.hex()} was already used by {site}: a copy of an earlier "
            "upload",
            Reason.REPLAYED,
        )
    for key in RECORD_KEYS:
        payload.config.pop(key, None)
    return statement


def _kind(dtype: np.dtype[Any]) -> str:
    return {"u": "i"}.get(dtype.kind, dtype.kind)  # signed or not, an integer is an integer


def check_arrays(
    arrays: Sequence[npt.NDArray[Any]],
    model: Sequence[npt.NDArray[Any]],
    names: Sequence[str],
) -> None:
    """A training result's arrays against the model: number, shapes, dtype kinds, finite."""
    if len(arrays) != len(model):
        raise Rejected(f"{len(arrays)} arrays, but the model has {len(model)}", Reason.WRONG_SHAPE)
    for i, (got, ref) in enumerate(zip(arrays, model, strict=True)):
        if got.shape != ref.shape:
            raise Rejected(
                f"array {i} ({names[i]}) has shape {got.shape}, expected {ref.shape}",
                Reason.WRONG_SHAPE,
            )
        if _kind(got.dtype) != _kind(ref.dtype):
            raise Rejected(
                f"array {i} ({names[i]}) has dtype {got.dtype}, the model's is {ref.dtype}",
                Reason.WRONG_DTYPE,
            )
    if not finite(arrays):
        raise Rejected("the update holds NaN or infinite values", Reason.NOT_FINITE)


def _number(config: Mapping[str, ScalarValue], key: str) -> float | None:
    v = config.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def clip_limit(config: Mapping[str, ScalarValue], global_norm: float, dim: int) -> float | None:
    """The largest update norm an honest site sends in this round, or None without client DP.

    C, widened by float32 rounding of the sent model (the site sends global + Δ, not Δ),
    and in ``distributed`` mode by a 1e-14 tail bound of the site's own noise share
    N(0, (z·C)²/min_survivors) per coordinate.
    """
    clip = _number(config, dpfed.CLIENT_CLIP)
    if clip is None:
        return None
    limit = clip * (1 + 1e-5) + 2 * F32_EPS * (global_norm + clip)
    if config.get(dpfed.CLIENT_MODE) == "distributed":
        z = _number(config, dpfed.CLIENT_NOISE) or 0.0
        m = max(1.0, _number(config, dpfed.CLIENT_MIN_SURVIVORS) or 1.0)
        limit += z * clip / math.sqrt(m) * (math.sqrt(dim) + NOISE_TAIL)
    return limit


def check_client_clip(
    config: Mapping[str, ScalarValue],
    arrays: Sequence[npt.NDArray[Any]],
    model: Sequence[npt.NDArray[Any]],
) -> None:
    """Under client-level DP, refuse an update Δ = result − model above the round's clip.

    ``config`` is the task's config (the round's ``dp.client.*`` plan); checked arrays
    (:func:`check_arrays`) only. Integer arrays are not privatized and not counted.
    """
    if dpfed.CLIENT_CLIP not in config:
        return
    floats = [i for i, g in enumerate(model) if np.issubdtype(g.dtype, np.floating)]
    squares = 0.0
    global_squares = 0.0
    dim = 0
    for i in floats:
        ref = np.asarray(model[i], dtype=np.float32).reshape(-1)
        delta = (np.asarray(arrays[i], dtype=np.float32).reshape(-1) - ref).astype(np.float64)
        squares += float(delta @ delta)
        ref64 = ref.astype(np.float64)
        global_squares += float(ref64 @ ref64)
        dim += ref.size
    norm = math.sqrt(squares)
    limit = clip_limit(config, math.sqrt(global_squares), dim)
    if limit is not None and norm > limit:
        raise Rejected(
            f"the update's L2 norm {norm:.6g} is above the round's client clip "
            f"{_number(config, dpfed.CLIENT_CLIP):g} (limit {limit:.6g}): the site did not "
            "clip it",
            Reason.NORM_ABOVE_CLIP,
        )
