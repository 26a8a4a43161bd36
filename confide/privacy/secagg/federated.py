"""SecAgg+ in a federation: settings, model updates as ring vectors, messages as records.

Shared by the coordinator (over gRPC), the site agent and the in-process engine, so
all three run the same protocol code with the same encodings:

* :class:`SecAggSettings` is the ``[secagg]`` section of a federation config;
  :func:`round_config` turns it into the :class:`SecAggConfig` of one round.
* A site aggregates its **update**: for every floating array, its trained weights
  minus the round's global weights, flattened in model order (:func:`flatten_update`).
  The coordinator adds the securely averaged update back (:func:`apply_mean_update`).
  Integer arrays (counters such as ``num_batches_tracked``) keep the global value:
  averaging a counter has no meaning and nothing about a site should leak through it.
* Protocol messages travel as Flower-style records of scalars (``bytes`` for keys,
  boxes and shares) under ``secagg.*`` keys (:func:`to_record` / :func:`from_record`).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from confide.config import fix
from confide.privacy.secagg.protocol import (
    DEFAULT_CLIP,
    DEFAULT_MAX_WEIGHT,
    KEY_BYTES,
    Aggregate,
    KeyAdvert,
    MaskedInput,
    ProtocolViolation,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    SharedKeys,
    UnmaskReply,
    UnmaskRequest,
    default_neighbours,
)

Arrays = Sequence[npt.NDArray[Any]]
ScalarValue = int | float | bool | str | bytes
Record = dict[str, ScalarValue]

SECURE_AGGREGATION = ("none", "secagg+")
STAGES = {1: "advertise", 2: "share", 3: "mask", 4: "unmask"}


class SecAggSettings(BaseModel):
    """``[secagg]``: parameters of secure aggregation (used when it is switched on)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["secagg+", "full"] = Field(
        "secagg+",
        json_schema_extra=fix(
            "use secagg+ (a random k-regular neighbour graph, Bell et al.) or full "
            "(every site is every site's neighbour, Bonawitz et al.)"
        ),
    )
    neighbours: int | None = Field(
        None,
        ge=2,
        json_schema_extra=fix("use an even k >= 2, or leave it unset for 2*ceil(log2 N)"),
    )
    threshold: float | None = Field(
        None,
        gt=0.5,
        le=1.0,
        json_schema_extra=fix("use a fraction of the neighbours in (0.5, 1]; default 2/3"),
    )
    clip: float = Field(
        DEFAULT_CLIP,
        gt=0,
        json_schema_extra=fix("use the largest |update| per parameter to keep, e.g. 8.0"),
    )
    max_weight: int = Field(
        DEFAULT_MAX_WEIGHT,
        ge=1,
        json_schema_extra=fix("use at least the largest number of examples of one site"),
    )
    stage_deadline_seconds: float = Field(
        120.0, gt=0, json_schema_extra=fix("use seconds > 0 for each key/mask/unmask stage")
    )


def round_config(
    settings: SecAggSettings, sites: int, dim: int, *, federation: str, rnd: int, attempt: int = 1
) -> SecAggConfig:
    """The config of one round: k and t from the settings, a fresh graph seed and context."""
    if settings.mode == "full":
        k = sites - 1
    elif settings.neighbours is not None:
        k = min(settings.neighbours, sites - 1)
        if k != sites - 1 and k % 2:
            k -= 1
    else:
        k = default_neighbours(sites)
    t = (
        None
        if settings.threshold is None
        else min(k, max(k // 2 + 1, int(np.ceil(settings.threshold * k))))
    )
    nonce = os.urandom(16)
    context = hashlib.sha256(
        f"confide/secagg/v1|{federation}|{rnd}|{attempt}|".encode() + nonce
    ).digest()
    return SecAggConfig.build(
        sites,
        dim,
        neighbours=k,
        threshold=t,
        clip=settings.clip,
        max_weight=settings.max_weight,
        context=context,
    )


# --------------------------------------------------------------------------- updates


def float_positions(arrays: Arrays) -> list[int]:
    return [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]


def update_dim(arrays: Arrays) -> int:
    return int(sum(arrays[i].size for i in float_positions(arrays)))


def flatten_update(trained: Arrays, global_weights: Arrays) -> npt.NDArray[np.float64]:
    """trained - global over the floating arrays, flattened in model order (float64)."""
    if len(trained) != len(global_weights):
        raise ProtocolViolation(
            f"{len(trained)} arrays returned for a model of {len(global_weights)}"
        )
    parts = []
    for i in float_positions(global_weights):
        t, g = np.asarray(trained[i]), global_weights[i]
        if t.shape != g.shape:
            raise ProtocolViolation(f"array {i} has shape {t.shape}, the model's is {g.shape}")
        parts.append((t.astype(np.float64) - g.astype(np.float64)).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def apply_mean_update(
    global_weights: Arrays, mean: npt.NDArray[np.float64]
) -> list[npt.NDArray[Any]]:
    """The example-weighted mean of the sites' models: global + mean update."""
    out = [np.array(a, copy=True) for a in global_weights]
    offset = 0
    for i in float_positions(global_weights):
        g = global_weights[i]
        part = mean[offset : offset + g.size].reshape(g.shape)
        out[i] = (g.astype(np.float64) + part).astype(g.dtype)
        offset += g.size
    if offset != mean.size:
        raise ProtocolViolation(f"the aggregate has {mean.size} values, the model {offset}")
    return out


# --------------------------------------------------------------------------- records

_ID = struct.Struct("<I")
_KEYS = struct.Struct(f"<I{KEY_BYTES}s{KEY_BYTES}s")


def _ids(ids: Iterable[int]) -> bytes:
    return b"".join(_ID.pack(i) for i in ids)


def _read_ids(blob: bytes) -> tuple[int, ...]:
    if len(blob) % 4:
        raise ProtocolViolation("a list of site ids has a partial entry")
    return tuple(int(i) for i in np.frombuffer(blob, dtype="<u4"))


def _pack_map(items: Mapping[int, bytes]) -> bytes:
    return b"".join(_ID.pack(k) + _ID.pack(len(v)) + v for k, v in sorted(items.items()))


def _unpack_map(blob: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(blob):
        if pos + 8 > len(blob):
            raise ProtocolViolation("a secagg record is truncated")
        key, size = struct.unpack_from("<II", blob, pos)
        pos += 8
        if pos + size > len(blob):
            raise ProtocolViolation("a secagg record is truncated")
        out[key] = blob[pos : pos + size]
        pos += size
    return out


def _bytes(record: Mapping[str, Any], key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise ProtocolViolation(f"record field {key!r} is missing or not bytes")
    return value


def _int(record: Mapping[str, Any], key: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolViolation(f"record field {key!r} is missing or not an integer")
    return value


def config_record(cfg: SecAggConfig, site: int) -> Record:
    """What a site needs to take part (sent with its TRAIN task)."""
    return {
        "secagg.site": site,
        "secagg.sites": cfg.sites,
        "secagg.dim": cfg.dim,
        "secagg.neighbours": cfg.neighbours,
        "secagg.threshold": cfg.threshold,
        "secagg.clip": cfg.clip,
        "secagg.max_weight": cfg.max_weight,
        "secagg.graph_seed": cfg.graph_seed,
        "secagg.context": cfg.context,
    }


def config_from_record(record: Mapping[str, Any]) -> tuple[SecAggConfig, int]:
    clip = record.get("secagg.clip")
    if not isinstance(clip, float | int) or isinstance(clip, bool):
        raise ProtocolViolation("record field 'secagg.clip' is missing or not a number")
    cfg = SecAggConfig(
        sites=_int(record, "secagg.sites"),
        dim=_int(record, "secagg.dim"),
        neighbours=_int(record, "secagg.neighbours"),
        threshold=_int(record, "secagg.threshold"),
        clip=float(clip),
        max_weight=_int(record, "secagg.max_weight"),
        graph_seed=_bytes(record, "secagg.graph_seed"),
        context=_bytes(record, "secagg.context"),
    )
    cfg.validate()
    return cfg, _int(record, "secagg.site")


def is_secagg(record: Mapping[str, Any]) -> bool:
    return "secagg.site" in record


def to_record(msg: object) -> Record:
    """A protocol message as a record of scalars."""
    if isinstance(msg, KeyAdvert):
        return {"secagg.keys": _KEYS.pack(msg.site, msg.c_public, msg.s_public)}
    if isinstance(msg, SharedKeys):
        return {
            "secagg.site": msg.site,
            "secagg.boxes": _pack_map(msg.ciphertexts),
            "secagg.commitment": msg.b_commitment,
        }
    if isinstance(msg, UnmaskRequest):
        return {"secagg.survivors": _ids(msg.survivors), "secagg.dropped": _ids(msg.dropped)}
    if isinstance(msg, UnmaskReply):
        return {
            "secagg.site": msg.site,
            "secagg.b_shares": _pack_map(msg.b_shares),
            "secagg.s_shares": _pack_map(msg.s_shares),
        }
    if isinstance(msg, MaskedInput):
        return {"secagg.site": msg.site, "secagg.bad": _ids(msg.bad_senders)}
    raise TypeError(f"not a secagg message: {type(msg).__name__}")


def advert_from_record(record: Mapping[str, Any]) -> KeyAdvert:
    blob = _bytes(record, "secagg.keys")
    if len(blob) != _KEYS.size:
        raise ProtocolViolation("advertised keys have the wrong size")
    site, c, s = _KEYS.unpack(blob)
    return KeyAdvert(site, c, s)


def adverts_record(adverts: Iterable[KeyAdvert]) -> Record:
    """A site's neighbours' keys (stage 2 input)."""
    return {"secagg.adverts": b"".join(_KEYS.pack(a.site, a.c_public, a.s_public) for a in adverts)}


def adverts_from_record(record: Mapping[str, Any]) -> list[KeyAdvert]:
    blob = _bytes(record, "secagg.adverts")
    if len(blob) % _KEYS.size:
        raise ProtocolViolation("the neighbours' keys are truncated")
    return [KeyAdvert(*_KEYS.unpack_from(blob, i)) for i in range(0, len(blob), _KEYS.size)]


def shared_from_record(record: Mapping[str, Any]) -> SharedKeys:
    return SharedKeys(
        _int(record, "secagg.site"),
        _unpack_map(_bytes(record, "secagg.boxes")),
        _bytes(record, "secagg.commitment"),
    )


def boxes_record(boxes: Mapping[int, bytes]) -> Record:
    """The share boxes addressed to one site (stage 3 input)."""
    return {"secagg.inbox": _pack_map(boxes)}


def boxes_from_record(record: Mapping[str, Any]) -> dict[int, bytes]:
    return _unpack_map(_bytes(record, "secagg.inbox"))


def masked_from_record(record: Mapping[str, Any], vector: npt.NDArray[Any]) -> MaskedInput:
    return MaskedInput(_int(record, "secagg.site"), vector, _read_ids(_bytes(record, "secagg.bad")))


def request_from_record(record: Mapping[str, Any]) -> UnmaskRequest:
    return UnmaskRequest(
        _read_ids(_bytes(record, "secagg.survivors")), _read_ids(_bytes(record, "secagg.dropped"))
    )


def reply_from_record(record: Mapping[str, Any]) -> UnmaskReply:
    return UnmaskReply(
        _int(record, "secagg.site"),
        _unpack_map(_bytes(record, "secagg.b_shares")),
        _unpack_map(_bytes(record, "secagg.s_shares")),
    )


# --------------------------------------------------------------------------- in memory


def secure_mean(
    cfg: SecAggConfig,
    updates: Mapping[int, tuple[npt.NDArray[np.float64], int]],
    *,
    rounding_seed: Sequence[int] | None = None,
) -> Aggregate:
    """Run the whole protocol in memory over ``{site id: (update, examples)}``.

    The simulation engines use this: every message goes through the same client and
    server code (and the same record encodings) as over the network. ``rounding_seed``
    (simulations only) seeds each site's stochastic rounding so a run repeats exactly;
    a real site draws it from the operating system's entropy.
    """
    clients = {i: SecAggClient(cfg, i) for i in sorted(updates)}
    server = SecAggServer(cfg)
    for c in clients.values():
        server.add_advert(advert_from_record(to_record(c.advertise())))
    for site, adverts in server.key_lists().items():
        sent = clients[site].share_keys(adverts_from_record(adverts_record(adverts)))
        server.add_shared(shared_from_record(to_record(sent)))
    for site, boxes in server.share_boxes().items():
        update, n = updates[site]
        rng = None if rounding_seed is None else np.random.default_rng([*rounding_seed, site])
        msg = clients[site].masked_input(boxes_from_record(boxes_record(boxes)), update, n, rng=rng)
        server.add_masked(masked_from_record(to_record(msg), msg.vector))
    replies = [
        reply_from_record(to_record(clients[site].unmask(request_from_record(to_record(req)))))
        for site, req in server.unmask_requests().items()
    ]
    return server.unmask(replies)
