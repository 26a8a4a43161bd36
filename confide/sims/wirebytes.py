"""The bytes a federation puts on the wire, per site and round, exact to the real messages.

The cost model prices bandwidth with this; the coordinator's traffic meter
(:class:`confide.rpc.TrafficMeter`) counts the same quantity on the live service, so a
model can be checked against a run (``tests/test_wirebytes.py`` does, to the byte for
the model streams and within 0.5 % for whole rounds).

What is counted is the **gRPC message layer**: every serialized protobuf message (for
the model streams, every serialized ``confide.v1.Chunk`` frame) plus gRPC's 5-byte
length prefix. HTTP/2 framing (9 bytes per DATA frame, a HEADERS frame per call), TLS
records (about 22 bytes per 16 KiB record) and TCP/IP headers come on top and are not
modelled here.

How it is exact: the small messages (``Task``, manifests with their config and metric
records, the unary requests and replies) are built as real ``coordinator_pb2`` messages
and measured with ``ByteSize()``; the data chunks of a stream are sized from protobuf's
encoding rules (a ``bytes`` field of length L costs 1 tag byte + varint(L) + L), so a
100M-parameter model is priced without allocating its bytes. Secure aggregation's
per-item sizes (key advert, sealed share box, commitment, shares, site ids) are measured
once by running the real protocol code (:mod:`confide.privacy.secagg`) on a 3-site round.

What varies in a real run, and by how much (each is a few bytes per message):

* task ids (``r{round}-{kind}-{n}``, ``n`` counts the coordinator's tasks) and model
  ids: modelled for a coordinator that has run every earlier round without retries;
  each extra digit is one byte in the ``Task``, the manifest and the next request;
* integer values (``num-examples``, ``UploadReply.bytes_received``) are varints: 1 to
  10 bytes depending on the value; floats always take 9 bytes, so losses never matter;
* every upload is signed: its manifest names the federation, the site, the round and a
  16-byte nonce, and a DER ECDSA signature of 70-72 bytes ends it (71 modelled); pass
  the real ``federation`` and ``site`` names for the exact name lengths;
* DP events (``dp.events``, a JSON string of the site's ledger events) and any
  application metrics: pass what your app and privacy settings really send
  (``train_metrics``, ``result_config``, ``train_config``);
* long polls that time out (``waits``: a WAIT reply) and heartbeats (``heartbeats``)
  depend on timing, not on the protocol; they are 0 unless given.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import Message

from confide import __version__
from confide.privacy.secagg.federated import SecAggSettings
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.rpc import GRPC_PREFIX_BYTES
from confide.wire import (
    ALLOWED_DTYPES,
    DATA_HEADER_BYTES,
    DEFAULT_CHUNK_BYTES,
    NUM_EXAMPLES,
    WireError,
    encode_records,
)
from confide.wire import ScalarValue as Scalar

__all__ = [
    "BUILTIN_EVAL_METRICS",
    "BUILTIN_TRAIN_METRICS",
    "DEFAULT_CHUNK_BYTES",
    "GRPC_PREFIX_BYTES",
    "METHODS",
    "ArraySpec",
    "RoundTraffic",
    "SecAggItems",
    "StreamSize",
    "join_traffic",
    "model_arrays",
    "round_traffic",
    "secagg_items",
    "stream_size",
    "synthetic_arrays",
    "upload_claim",
]

#: The methods of ``confide.v1.Coordinator`` a site calls, in ``by_method`` order.
METHODS = ("Join", "PullTask", "DownloadModel", "UploadResult", "Heartbeat", "ReportError")

#: What the built-in apps (:mod:`confide.client.apps`) report besides ``num-examples``.
BUILTIN_TRAIN_METRICS: Mapping[str, Scalar] = {
    "train_loss": 0.0,
    "train_accuracy": 0.0,
    "train_seconds": 0.0,
    "train_steps": 0.0,
}
BUILTIN_EVAL_METRICS: Mapping[str, Scalar] = {"eval_loss": 0.0, "eval_accuracy": 0.0}

# Stand-ins of the right size for values a coordinator draws at run time.
_SESSION_ID = "0" * 32  # uuid4().hex
_MODEL_DIGEST = "0" * 12  # the first 12 hex digits of the weights' SHA-256
_DEADLINE = 1.0e9  # any non-zero double costs 9 bytes
_SHA256_BYTES = 32
# Every upload ends with a DER ECDSA P-256 signature: 70, 71 or 72 bytes (71 on average,
# the only size that varies from draw to draw), after a 16-byte nonce in its manifest.
_SIGNATURE_BYTES = 71
_NONCE_BYTES = 16
# The coordinator serves models in chunks of at least 64 KiB (MIN_CHUNK_BYTES there);
# the agent uploads in the coordinator's chunk size, at most 32 MiB (MAX_CHUNK_MB there).
# tests/test_wirebytes.py checks both against the code.
MIN_DOWNLOAD_CHUNK = 64 * 1024
MAX_UPLOAD_CHUNK = 32 * 1024 * 1024
_SECAGG_STAGES = (2, 3, 4)


# --------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class ArraySpec:
    """One array of a model as it crosses the wire: name, NumPy dtype string, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def floating(self) -> bool:
        return np.dtype(self.dtype).kind == "f"


@functools.cache
def _model_arrays(model: str) -> tuple[ArraySpec, ...]:
    from confide.client.models import build_model

    # get_weights() sends every state-dict entry as float32, counters included.
    state = build_model(model).state_dict()
    return tuple(ArraySpec(name, "<f4", tuple(t.shape)) for name, t in state.items())


def model_arrays(model: str) -> list[ArraySpec]:
    """The arrays of a built-in model (:data:`confide.client.models.MODELS`) as sent."""
    return list(_model_arrays(model))


def synthetic_arrays(parameters: int, dtype: str = "<f4") -> list[ArraySpec]:
    """A model of ``parameters`` values in one array (its manifest is the smallest)."""
    if parameters < 0:
        raise ValueError(f"a model has at least 0 parameters (got {parameters})")
    return [ArraySpec("weights", dtype, (parameters,))]


# --------------------------------------------------------------------------- encoding


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _bytes_field(n: int) -> int:
    """A length-delimited field of ``n`` bytes: tag, varint length, the bytes."""
    return 1 + _varint_len(n) + n


@dataclass(frozen=True)
class StreamSize:
    """A chunk stream (``DownloadModel`` reply or ``UploadResult`` request)."""

    frames: int  # serialized Chunk messages, summed: what confide.wire.frames yields
    messages: int  # manifest + data chunks + digest

    @property
    def wire(self) -> int:
        """With gRPC's length prefix on every message."""
        return self.frames + GRPC_PREFIX_BYTES * self.messages


def stream_size(
    arrays: Sequence[ArraySpec],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    task_id: str = "",
    metrics: Mapping[str, Scalar] | None = None,
    config: Mapping[str, Scalar] | None = None,
    claim: Mapping[str, Scalar] | None = None,
) -> StreamSize:
    """The size of ``confide.wire.frames(Payload(task_id, arrays, metrics, config))``.

    ``claim``: an upload's signed statement entries (:func:`upload_claim`); they join the
    config and a signature frame ends the stream (``frames(..., signer=...)``).
    """
    if chunk_bytes <= 0:
        raise WireError(f"chunk size must be positive (got {chunk_bytes})")
    for a in arrays:
        if a.dtype not in ALLOWED_DTYPES:
            raise WireError(f"array {a.name!r} has dtype {a.dtype}, which the wire does not carry")
    total = sum(a.nbytes for a in arrays)
    manifest = pb.Chunk(
        manifest=pb.Manifest(
            task_id=task_id,
            arrays=[
                pb.ArrayHeader(name=a.name, dtype=a.dtype, shape=list(a.shape), nbytes=a.nbytes)
                for a in arrays
            ],
            metrics=encode_records(metrics or {}),
            config=encode_records({**(config or {}), **(claim or {})}),
            total_bytes=total,
        )
    ).ByteSize()
    # Data chunks run across array boundaries: all full but the last.
    full, rest = divmod(total, chunk_bytes)
    data = full * (DATA_HEADER_BYTES + chunk_bytes) + (DATA_HEADER_BYTES + rest if rest else 0)
    digest = _bytes_field(_SHA256_BYTES)
    signature = 0 if claim is None else _bytes_field(_SIGNATURE_BYTES)
    messages = 2 + full + (1 if rest else 0) + (claim is not None)
    return StreamSize(manifest + data + digest + signature, messages)


def upload_claim(federation: str, site: str, rnd: int) -> dict[str, Scalar]:
    """The ``confide.*`` entries a site's signed upload adds to its manifest (protocol 3+)."""
    return {
        "confide.federation": federation,
        "confide.round": rnd,
        "confide.site": site,
        "confide.nonce": bytes(_NONCE_BYTES),
    }


# --------------------------------------------------------------------------- secure aggregation


@dataclass(frozen=True)
class SecAggItems:
    """Bytes per item of the SecAgg+ records, measured on the real protocol code."""

    advert: int  # a site's two X25519 public keys and its id (stage 1, and relayed in 2)
    box: int  # one sealed share box with its map entry (stage 2 up, stage 3 down)
    commitment: int  # SHA-256 commitment to the self-mask seed (stage 2 up)
    site_id: int  # one id in an unmask request's survivor or dropped list (stage 4 down)
    b_share: int  # one share of a survivor's self-mask seed with its map entry (stage 4 up)
    s_share: int  # one share of a dropped site's mask key with its map entry (stage 4 up)
    vector_itemsize: int  # bytes per parameter of the masked vector (uint32)


@functools.cache
def secagg_items() -> SecAggItems:
    """Run one 3-site round (site 3 drops before masking) and measure each record item."""
    from confide.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer
    from confide.privacy.secagg import federated as fl

    cfg = SecAggConfig.build(3, 2, neighbours=2, threshold=2, context=bytes(32))
    clients = {i: SecAggClient(cfg, i) for i in (1, 2, 3)}
    server = SecAggServer(cfg)
    advert = fl.to_record(clients[1].advertise())["secagg.keys"]
    server.add_advert(fl.advert_from_record({"secagg.keys": advert}))
    for i in (2, 3):
        server.add_advert(fl.advert_from_record(fl.to_record(clients[i].advertise())))
    shared = {
        i: clients[i].share_keys(fl.adverts_from_record(fl.adverts_record(keys)))
        for i, keys in server.key_lists().items()
    }
    for msg in shared.values():
        server.add_shared(fl.shared_from_record(fl.to_record(msg)))
    sent = fl.to_record(shared[1])
    boxes = server.share_boxes()
    for i in (1, 2):
        masked = clients[i].masked_input(boxes[i], np.zeros(cfg.dim), 1)
        server.add_masked(fl.masked_from_record(fl.to_record(masked), masked.vector))
    request = server.unmask_requests()[1]
    asked = fl.to_record(request)
    reply = fl.to_record(clients[1].unmask(fl.request_from_record(asked)))
    vector = masked.vector

    def per(blob: Scalar, n: int) -> int:
        assert isinstance(blob, bytes) and n > 0 and len(blob) % n == 0
        return len(blob) // n

    return SecAggItems(
        advert=per(advert, 1),
        box=per(sent["secagg.boxes"], len(shared[1].ciphertexts)),
        commitment=per(sent["secagg.commitment"], 1),
        site_id=per(asked["secagg.survivors"], len(request.survivors)),
        b_share=per(reply["secagg.b_shares"], len(request.survivors)),
        s_share=per(reply["secagg.s_shares"], len(request.dropped)),
        vector_itemsize=int(vector.itemsize),
    )


@dataclass(frozen=True)
class _SecAggShape:
    sites: int
    neighbours: int
    threshold: int
    record: dict[str, Scalar]  # config_record(cfg, 0) with the round's values


def _secagg_shape(settings: SecAggSettings, sites: int, dim: int, rnd: int) -> _SecAggShape:
    from confide.privacy.secagg import federated as fl

    cfg = fl.round_config(settings, sites, max(1, dim), federation="", rnd=rnd)
    record = fl.config_record(cfg, 0)
    record["secagg.dim"] = dim
    return _SecAggShape(sites, cfg.neighbours, cfg.threshold, record)


# --------------------------------------------------------------------------- a round


@dataclass(frozen=True)
class RoundTraffic:
    """What one round costs on the wire (gRPC message layer, 5-byte prefixes included).

    Per-site figures are the mean over the round's selected sites (rounded); the exact
    sums over all of them are ``down_total`` and ``up_total``.
    """

    down_per_site: int  # bytes coordinator -> one selected site in one round
    up_per_site: int  # bytes one selected site -> coordinator in one round
    by_method: dict[str, tuple[int, int]]  # per site: method -> (up, down) bytes
    messages_per_site: int  # calls a site makes one after another in a round (for RTT)
    down_total: int = 0  # all selected sites together
    up_total: int = 0
    # per site: method -> (up, down) gRPC messages (a stream counts each chunk)
    messages_by_method: dict[str, tuple[int, int]] = field(default_factory=dict)
    sites: int = 1

    @property
    def total(self) -> int:
        """Both directions, all selected sites."""
        return self.down_total + self.up_total


class _Tally:
    """Bytes and messages per method and direction, summed over the sites of a round."""

    def __init__(self, claim: Mapping[str, Scalar] | None = None) -> None:
        self.bytes = {m: [0, 0] for m in METHODS}
        self.messages = {m: [0, 0] for m in METHODS}
        self.calls = 0
        self.claim = claim  # what every upload's signed statement adds

    def _add(self, method: str, up: int, down: int, up_msgs: int, down_msgs: int) -> None:
        b, n = self.bytes[method], self.messages[method]
        b[0] += up + GRPC_PREFIX_BYTES * up_msgs
        b[1] += down + GRPC_PREFIX_BYTES * down_msgs
        n[0] += up_msgs
        n[1] += down_msgs

    def unary(
        self, method: str, request: Message, reply: Message, *, critical: bool = True
    ) -> None:
        self._add(method, request.ByteSize(), reply.ByteSize(), 1, 1)
        self.calls += critical

    def download(self, request: pb.DownloadModelRequest, stream: StreamSize) -> None:
        self._add("DownloadModel", request.ByteSize(), stream.frames, 1, stream.messages)
        self.calls += 1

    def upload(self, arrays: Sequence[ArraySpec], **stream: Any) -> None:
        """A site's signed upload of ``stream_size(arrays, **stream)``."""
        size = stream_size(arrays, claim=self.claim, **stream)
        self._upload(size)

    def _upload(self, stream: StreamSize) -> None:
        reply = pb.UploadReply(accepted=True, bytes_received=stream.frames)
        self._add("UploadResult", stream.frames, reply.ByteSize(), stream.messages, 1)
        self.calls += 1


def _task(
    task_id: str, kind: int, rnd: int, model_id: str, config: Mapping[str, Scalar]
) -> pb.Task:
    return pb.Task(
        task_id=task_id,
        kind=kind,  # type: ignore[arg-type]  # the generated enum is an int
        round=rnd,
        model_id=model_id,
        config=encode_records(config),
        deadline_unix=_DEADLINE,
    )


def _split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as whole numbers go."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def round_traffic(
    arrays: Sequence[ArraySpec],
    *,
    sites: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    secagg: SecAggSettings | None = None,
    evaluate: bool = True,
    train_config: Mapping[str, Scalar] | None = None,
    train_metrics: Mapping[str, Scalar] | None = None,
    eval_metrics: Mapping[str, Scalar] | None = None,
    result_config: Mapping[str, Scalar] | None = None,
    examples: int = 1000,
    round_number: int = 1,
    dropouts: int = 0,
    poll_seconds: float = 10.0,
    waits: int = 0,
    heartbeats: int = 0,
    federation: str = "federation",
    site: str = "site-0000",
) -> RoundTraffic:
    """Bytes of one training round of ``sites`` selected sites, as the real services send.

    A round is, per site: ``PullTask`` (the TRAIN task), ``DownloadModel``, training,
    ``UploadResult`` (the trained weights, or with ``secagg`` only the site's public
    keys), then with ``secagg`` three stages of ``PullTask`` + ``UploadResult`` (share
    keys; masked input, a uint32 vector of the update's length + 1; unmask), then with
    ``evaluate`` a ``PullTask`` (EVALUATE), a ``DownloadModel`` of the new model and an
    ``UploadResult`` of metrics only (every selected site evaluates: fraction 1).

    ``chunk_bytes`` is the coordinator's chunk size (``server.chunk_mb``): it serves
    models in chunks of at least 64 KiB and sites upload in chunks of at most 32 MiB.
    ``train_config`` is the federation's ``[train]`` table plus any DP round config the
    coordinator adds; ``train_metrics`` and ``eval_metrics`` are what the app reports
    besides ``num-examples`` (default: the built-in apps'; ``examples`` is the count sent,
    a ``num-examples`` entry in the metrics wins); ``poll_seconds`` is the sites'
    long-poll budget (``[agent] poll_seconds``); ``result_config`` is what the
    site returns as config (DP rounds: ``dp.events``). ``dropouts`` selected sites
    download the model and fall silent before uploading (with ``secagg``: after sharing
    keys, which makes the survivors reveal mask-key shares); they do not evaluate.
    ``waits`` long polls answered WAIT and ``heartbeats`` per site are added as given.
    Every upload carries its signed statement (``federation`` and ``site`` name it, see
    :func:`upload_claim`) and ends with the signature.
    """
    if sites < 1:
        raise ValueError(f"a round has at least one site (got {sites})")
    if not 0 <= dropouts < sites:
        raise ValueError(f"dropouts must be in 0..{sites - 1} (got {dropouts})")
    arrays = list(arrays)
    rnd = round_number
    train_metrics = BUILTIN_TRAIN_METRICS if train_metrics is None else train_metrics
    eval_metrics = BUILTIN_EVAL_METRICS if eval_metrics is None else eval_metrics
    config: dict[str, Scalar] = {**(train_config or {}), "server-round": rnd}
    result_config = dict(result_config or {})
    survivors = sites - dropouts
    shape = None
    dim = sum(a.size for a in arrays if a.floating)
    if secagg is not None:
        shape = _secagg_shape(secagg, sites, dim, rnd)
        if survivors < shape.threshold:
            raise ValueError(
                f"{survivors} surviving sites cannot unmask (threshold {shape.threshold})"
            )
    # Task ids count every task the coordinator made: the baseline evaluation, then
    # each earlier round (train, secagg stages, evaluate) in full.
    per_round = sites * (1 + (3 if shape else 0) + (1 if evaluate else 0))
    next_id = (sites if evaluate else 0) + (rnd - 1) * per_round
    if chunk_bytes <= 0:
        raise WireError(f"chunk size must be positive (got {chunk_bytes})")
    down_chunk = max(MIN_DOWNLOAD_CHUNK, chunk_bytes)
    chunk_bytes = min(MAX_UPLOAD_CHUNK, chunk_bytes)
    model_id = f"r{rnd}-{_MODEL_DIGEST}"
    model = stream_size(arrays, chunk_bytes=down_chunk, task_id=model_id)
    poll = pb.PullTaskRequest(session_id=_SESSION_ID, wait_seconds=poll_seconds)
    fetch = pb.DownloadModelRequest(session_id=_SESSION_ID, model_id=model_id)
    tally = _Tally(upload_claim(federation, site, rnd))

    def task_id(kind: str) -> str:
        nonlocal next_id
        next_id += 1
        return f"r{rnd}-{kind}-{next_id}"

    # TRAIN: every selected site downloads the model.
    for i in range(sites):
        tid = task_id("train")
        extra = {**shape.record, "secagg.site": i + 1} if shape else {}
        tally.unary("PullTask", poll, _task(tid, pb.Task.TRAIN, rnd, model_id, config | extra))
        tally.download(fetch, model)
        if shape is not None:
            items = secagg_items()
            metrics = {k: v for k, v in train_metrics.items() if k != NUM_EXAMPLES}
            metrics["secagg.keys"] = bytes(items.advert)
            tally.upload([], task_id=tid, metrics=metrics, config=result_config)
        elif i < survivors:
            metrics = {NUM_EXAMPLES: examples, **train_metrics}
            tally.upload(
                arrays, chunk_bytes=chunk_bytes, task_id=tid, metrics=metrics, config=result_config
            )
    if shape is not None:
        _secagg_stages(tally, shape, dim, rnd, poll, task_id, chunk_bytes, survivors)
    if evaluate:
        eval_id = f"r{rnd}-{_MODEL_DIGEST}"  # the aggregated model: a new id, same length
        new_model = stream_size(arrays, chunk_bytes=down_chunk, task_id=eval_id)
        fetch = pb.DownloadModelRequest(session_id=_SESSION_ID, model_id=eval_id)
        for _ in range(survivors):
            tid = task_id("evaluate")
            tally.unary(
                "PullTask", poll, _task(tid, pb.Task.EVALUATE, rnd, eval_id, {"server-round": rnd})
            )
            tally.download(fetch, new_model)
            metrics = {NUM_EXAMPLES: examples, **eval_metrics}
            tally.upload([], task_id=tid, metrics=metrics)
    wait = pb.Task(kind=pb.Task.WAIT)
    beat = pb.HeartbeatRequest(
        session_id=_SESSION_ID, task_id=f"r{rnd}-train-{next_id}", progress=0.1, status="training"
    )
    for _ in range(sites * waits):
        tally.unary("PullTask", poll, wait, critical=False)
    for _ in range(sites * heartbeats):
        tally.unary("Heartbeat", beat, pb.HeartbeatReply(), critical=False)

    def mean(x: int) -> int:
        return round(x / sites)

    up = sum(b[0] for b in tally.bytes.values())
    down = sum(b[1] for b in tally.bytes.values())
    return RoundTraffic(
        down_per_site=mean(down),
        up_per_site=mean(up),
        by_method={m: (mean(b[0]), mean(b[1])) for m, b in tally.bytes.items() if b[0] or b[1]},
        messages_per_site=mean(tally.calls),
        down_total=down,
        up_total=up,
        messages_by_method={
            m: (mean(n[0]), mean(n[1])) for m, n in tally.messages.items() if n[0] or n[1]
        },
        sites=sites,
    )


def _secagg_stages(
    tally: _Tally,
    shape: _SecAggShape,
    dim: int,
    rnd: int,
    poll: pb.PullTaskRequest,
    task_id: Callable[[str], str],
    chunk_bytes: int,
    survivors: int,
) -> None:
    """Stages 2-4 for every site: the coordinator's tasks and the sites' uploads."""
    items = secagg_items()
    k, n = shape.neighbours, shape.sites
    base = {"secagg.stage": 0, **shape.record}
    # Stage 2 (share keys): every site that advertised gets its k neighbours' keys.
    for i in range(1, n + 1):
        tid = task_id("secagg")
        record = {
            **base,
            "secagg.stage": 2,
            "secagg.site": i,
            "secagg.adverts": bytes(k * items.advert),
        }
        tally.unary("PullTask", poll, _task(tid, pb.Task.SECAGG, rnd, "", record))
        sent: dict[str, Scalar] = {
            "secagg.site": i,
            "secagg.boxes": bytes(k * items.box),
            "secagg.commitment": bytes(items.commitment),
        }
        tally.upload([], task_id=tid, metrics=sent)
    # Stage 3 (masked input): the tasks of sites that drop are published, never fetched.
    masked = [ArraySpec("secagg.masked", "<u4", (dim + 1,))]
    stage3 = [task_id("secagg") for _ in range(n)]
    for i in range(1, survivors + 1):
        tid = stage3[i - 1]
        record = {**base, "secagg.stage": 3, "secagg.site": i, "secagg.inbox": bytes(k * items.box)}
        tally.unary("PullTask", poll, _task(tid, pb.Task.SECAGG, rnd, "", record))
        bad: dict[str, Scalar] = {"secagg.site": i, "secagg.bad": b""}
        tally.upload(masked, chunk_bytes=chunk_bytes, task_id=tid, metrics=bad)
    # Stage 4 (unmask): each survivor reveals b-shares of its surviving neighbours and
    # s-shares of its dropped ones. SecAgg+: a survivor expects k d / (N - 1) dropped
    # neighbours (the graph is random); full SecAgg: exactly d.
    dropped_total = round(survivors * k * (n - survivors) / (n - 1))
    for i, d in enumerate(_split(dropped_total, survivors), start=1):
        tid = task_id("secagg")
        record = {
            **base,
            "secagg.stage": 4,
            "secagg.site": i,
            "secagg.survivors": bytes((k - d) * items.site_id),
            "secagg.dropped": bytes(d * items.site_id),
        }
        tally.unary("PullTask", poll, _task(tid, pb.Task.SECAGG, rnd, "", record))
        shares: dict[str, Scalar] = {
            "secagg.site": i,
            "secagg.b_shares": bytes((k - d) * items.b_share),
            "secagg.s_shares": bytes(d * items.s_share),
        }
        tally.upload([], task_id=tid, metrics=shares)


# --------------------------------------------------------------------------- once per site


def join_traffic(
    *,
    app: str = "confide.client.apps:mnist_cnn",
    capabilities: Mapping[str, str] | None = None,
    federation: str = "federation",
    site_id: str = "site-1",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    heartbeat_seconds: float = 10.0,
) -> tuple[int, int]:
    """(up, down) bytes of a site's ``Join`` (once per session), prefixes included."""
    request = pb.JoinRequest(
        protocol_version=PROTOCOL_VERSION,
        software=f"confide {__version__}",
        capabilities={"app": app, **(capabilities or {})},
    )
    reply = pb.JoinReply(
        protocol_version=PROTOCOL_VERSION,
        federation=federation,
        site_id=site_id,
        session_id=_SESSION_ID,
        heartbeat_seconds=heartbeat_seconds,
        chunk_bytes=chunk_bytes,
    )
    return (
        request.ByteSize() + GRPC_PREFIX_BYTES,
        reply.ByteSize() + GRPC_PREFIX_BYTES,
    )
