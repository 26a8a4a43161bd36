"""The coordinator under hostile input, over real loopback mutual TLS.

Every method of ``confide.v1.Coordinator`` (read from the proto descriptor, so a new RPC
is fuzzed without touching this file) gets thousands of malformed and well-formed but
random requests from a real site certificate. Each must be answered with a gRPC status
that says what was wrong (or a normal reply), never an unhandled exception; afterwards
the coordinator still serves, two real sites complete a round, and the store holds
nothing from the fuzz beyond the recorded rejections. Oversized messages and streams are
refused by their configured limits.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import blake3
import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from federation_helpers import (
    FED,
    Federation,
    make_federation,
    offset_app,
    running_coordinator,
    wait_for,
)
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide import wire
from confide.client.agent import SiteAgent, load_site_config, validate_site_config
from confide.client.agent import configure_logging as configure_site_logging
from confide.errors import ConfigError
from confide.logs import JsonFormatter
from confide.privacy.crypto import (
    KitError,
    StatementInvalid,
    UpdateSigner,
    init_ca,
    issue,
    load_kit,
)
from confide.privacy.deid.config import DeidConfig
from confide.privacy.dp import DpError, InvalidDpEvent, PrivacyLedger
from confide.privacy.dp import federated as dpfed
from confide.privacy.secagg import SecAggClient
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.rpc import CoordinatorClient
from confide.server.config import FederationConfig
from confide.server.coordinator import Coordinator
from confide.server.privacy import CoordinatorPrivacy
from confide.server.rounds import Kind, Phase, Rejected
from confide.server.store import Store

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
METHODS: list[MethodDescriptor] = list(SERVICE.methods)
CALL_TIMEOUT = 20.0
CHUNK_MB = 0.25  # small chunks: the receive limit is 2 x chunk + 1 MiB = 1.5 MiB
MAX_UPDATE_MB = 2.0  # the model is 0.2 MB

#: A clear answer to a bad request. UNKNOWN and INTERNAL mean an unhandled exception,
#: UNAVAILABLE a dead server, DEADLINE_EXCEEDED a hang: none of them is acceptable.
CLEAR = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

#: Names a hostile peer tries wherever a string goes (ids that might become file paths).
HOSTILE_TEXT = (
    "",
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "a\x00b",
    "C:\\Windows\\system32",
    "r1-train-1/../../../x",
    "%2e%2e%2f",
    "\u202e\ufeff",
    "x" * 2000,
    "[" * 3000,  # deeper than Python's recursion limit
    '{"a":' * 3000,
    "NaN",
    "dp.budget",
    "num-examples",
)


# --------------------------------------------------------------------------- the target


@dataclass
class Live:
    """What the fuzzer may reuse: real ids make random requests reach deeper code."""

    session: str = ""
    task: str = ""
    model: str = ""
    other_task: str = ""

    def texts(self) -> list[str]:
        return [self.session, self.task, self.model, self.other_task]


@dataclass
class Target:
    fed: Federation
    coordinator: Coordinator
    site: grpc.Channel  # site-3: the hostile site (a real certificate of the federation)
    live: Live
    log: list[logging.LogRecord] = field(default_factory=list)
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, method: str, code: grpc.StatusCode) -> None:
        per = self.statuses.setdefault(method, {})
        per[code.name] = per.get(code.name, 0) + 1


class _Capture(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


def _channel(fed: Federation, name: str) -> grpc.Channel:
    kit = load_kit(fed.kit(name))
    return grpc.secure_channel(
        fed.address, kit.channel_credentials(), options=[("grpc.enable_http_proxy", 0)]
    )


def _open_phase(target: Target) -> Phase:
    """A train task for the hostile site, so random uploads reach result validation."""
    c = target.coordinator
    model_id = c._publish_model(1)
    config: dict[str, Any] = {**c.cfg.train, "server-round": 1, **c.privacy.round_config(1)}
    phase = c.board.publish(
        Kind.TRAIN, 1, ["site-1", "site-3"], model_id, config, target=2, deadline_seconds=3600
    )
    tasks = {t.site_id: t.task_id for t in phase.tasks.values()}
    target.live.task = tasks["site-3"]
    target.live.other_task = tasks["site-1"]  # another site's task, for the hostile one
    target.live.model = model_id
    return phase


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("hostile")
    fed = make_federation(
        root,
        sites=("site-1", "site-2", "site-3"),
        others=(("officer", "auditor"), ("root", "admin")),
        rounds=1,
        min_sites=2,
        max_attempts=1,
        deadline=60,
    )
    fed.doc["server"].update(
        {"chunk_mb": CHUNK_MB, "max_update_mb": MAX_UPDATE_MB, "max_poll_seconds": 0.05}
    )
    fed.doc["evaluation"] = {"fraction": 0.0}
    # DP on, so random capabilities reach the ledger mirror and random uploads its checks.
    fed.doc["dp"] = {
        "delta": 1e-5,
        "example": {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps_per_round": 2},
    }
    log: list[logging.LogRecord] = []
    handler = _Capture(log)
    loggers = [logging.getLogger(n) for n in ("confide", "grpc")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    coordinator = Coordinator(fed.config())
    coordinator.start()
    site = _channel(fed, "site-3")
    live = Live()
    t = Target(fed, coordinator, site, live, log)
    try:
        reply = CoordinatorClient(site).Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=CALL_TIMEOUT
        )
        live.session = reply.session_id
        _open_phase(t)
        yield t
    finally:
        site.close()
        coordinator.shutdown()
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


# --------------------------------------------------------------------------- calling


def _raw(channel: grpc.Channel, method: MethodDescriptor) -> Callable[..., Any]:
    path = f"/{SERVICE.full_name}/{method.name}"
    kind = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    factory: Callable[..., Any] = getattr(channel, kind)
    return factory(path, request_serializer=None, response_deserializer=None)  # type: ignore[no-any-return]


def _call(
    target: Target,
    method: MethodDescriptor,
    request: bytes | list[bytes],
    *,
    channel: grpc.Channel | None = None,
) -> tuple[grpc.StatusCode, list[bytes]]:
    """Send raw bytes (a list of frames for a client stream); the status and the replies."""
    stub = _raw(channel or target.site, method)
    sent: Any = iter(request) if method.client_streaming else request
    try:
        if method.server_streaming:
            replies = list(stub(sent, timeout=CALL_TIMEOUT))
        else:
            replies = [stub(sent, timeout=CALL_TIMEOUT)]
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code, replies = e.code(), []
        assert code in CLEAR, f"{method.name}: {code.name} {e.details()!r}"
        assert e.details(), f"{method.name}: {code.name} without a message"
    target.count(method.name, code)
    if code is grpc.StatusCode.OK and method.name == "Join" and channel is None:
        target.live.session = pb.JoinReply.FromString(replies[0]).session_id
    return code, replies


def _tracebacks(target: Target) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in target.log
        if r.exc_info is not None or r.levelno >= logging.ERROR
    ]


# --------------------------------------------------------------------------- strategies

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _text(live: Live) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=30),
        st.sampled_from(HOSTILE_TEXT),
        st.builds(lambda i: live.texts()[i], st.integers(0, 3)),
    )


def _scalar(f: FieldDescriptor, live: Live) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return _text(live)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(
            st.sampled_from([v.number for v in f.enum_type.values]),
            st.integers(-(2**31), 2**31 - 1),
        )
    lo, hi = _INT_RANGES[t]
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, PROTOCOL_VERSION]))


def _field(f: FieldDescriptor, live: Live, depth: int) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(f.message_type, live, depth + 1)
    return _scalar(f, live)


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def messages(desc: Descriptor, live: Live, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of type ``desc`` with random field values (generic, from the descriptor)."""
    cls = message_factory.GetMessageClass(desc)
    if depth > 4:
        return st.just(cls())
    size = max(1, 6 - 2 * depth)
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if _is_map(f):
            key, value = (
                f.message_type.fields_by_name["key"],
                f.message_type.fields_by_name["value"],
            )
            parts[f.name] = st.dictionaries(
                _field(key, live, depth), _field(value, live, depth), max_size=size
            )
        elif f.is_repeated:
            parts[f.name] = st.lists(_field(f, live, depth), max_size=size)
        else:
            parts[f.name] = _field(f, live, depth)

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in values.items():
            f = desc.fields_by_name[name]
            if _is_map(f):
                target = getattr(msg, name)
                for k, v in value.items():
                    if isinstance(v, Message):
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif f.is_repeated:
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    for v in value:
                        getattr(msg, name).add().CopyFrom(v)
                else:
                    getattr(msg, name).extend(value)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=parts).map(build)


def _request_type(method: MethodDescriptor) -> Descriptor:
    return method.input_type


FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


# --------------------------------------------------------------------------- the fuzz


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_malformed_protobuf_bytes_get_a_clear_status(
    target: Target, method: MethodDescriptor
) -> None:
    @FUZZ
    @given(
        body=st.one_of(
            st.binary(max_size=200),
            messages(method.input_type, target.live)
            .map(lambda m: m.SerializeToString())
            .flatmap(
                lambda b: st.integers(0, max(0, len(b))).map(lambda i: b[:i] + b"\xff" + b[i:])
            ),
        )
    )
    def fuzz(body: bytes) -> None:
        _call(target, method, [body] if method.client_streaming else body)

    fuzz()
    assert not _tracebacks(target)


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_random_well_formed_requests_get_a_clear_status(
    target: Target, method: MethodDescriptor
) -> None:
    request = messages(method.input_type, target.live)

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        if method.client_streaming:
            frames = data.draw(st.lists(request, max_size=6))
            _call(target, method, [m.SerializeToString() for m in frames])
        else:
            _call(target, method, data.draw(request).SerializeToString())

    fuzz()
    assert not _tracebacks(target)


# Well-formed upload streams: a manifest that matches its data and digest, so random
# records, arrays and DP events reach the coordinator's checks of a result.

_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**400, "\ud800"]),
    st.floats(),
    st.text(max_size=12),
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_EVENT = {
    "mechanism": "dp-sgd",
    "noise_multiplier": 1.0,
    "sample_rate": 0.05,
    "steps": 2,
    "clip_norm": 1.0,
    "delta": 1e-5,
    "dataset_size": 300,
    "federation": "testfed",
    "round": 1,
    "time": 1.7e9,
    "site": "site-3",
}


def _event(site: str) -> st.SearchStrategy[dict[str, Any]]:
    """A real-looking DP event of ``site`` with a field or two replaced or missing."""
    base = {**_EVENT, "site": site}
    keys = sorted([*base, "uid", "note"])
    return st.tuples(
        st.dictionaries(st.sampled_from(keys), _JSON | _JSON_SCALARS, max_size=2),
        st.sets(st.sampled_from(keys), max_size=1),
    ).map(lambda t: {k: v for k, v in {**base, **t[0]}.items() if k not in t[1]})


def _json_text(site: str) -> st.SearchStrategy[str]:
    """Text for a JSON-carrying record: event lists, any JSON, or hostile text."""
    events = st.lists(_event(site), min_size=1, max_size=3).map(json.dumps)
    return st.one_of(events, _JSON.map(json.dumps), st.sampled_from(HOSTILE_TEXT))


def _record_value(live: Live) -> st.SearchStrategy[wire.ScalarValue]:
    return st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.booleans(),
        _text(live),
        st.binary(max_size=32),
    )


_KEYS = st.one_of(
    st.sampled_from(
        [wire.NUM_EXAMPLES, "train_loss", "secagg.site", "secagg.stage", *dpfed.SGD_REPLY_KEYS]
    ),
    st.sampled_from([dpfed.CLIENT_UNCLIPPED]),
    st.text(max_size=10),
)
_DTYPES = st.sampled_from(sorted(wire.ALLOWED_DTYPES))
_FILLS = st.sampled_from([0.0, 1.0, -1.0, 1e38, math.nan, math.inf, -math.inf, 2.0**40])


def _arrays(target: Target) -> st.SearchStrategy[list[np.ndarray]]:
    """The model's arrays (mostly its shapes, some dtypes and counts off, odd values) or
    a few small arrays of any allowed dtype."""
    ref = target.coordinator.weights
    n = len(ref)

    def like_model(spec: tuple[int, dict[int, str], float]) -> list[np.ndarray]:
        count, dtypes, fill = spec
        shapes = [w.shape for w in ref] + [(3,)]
        with np.errstate(all="ignore"):
            return [np.full(shapes[i], fill).astype(dtypes.get(i, "<f4")) for i in range(count)]

    model = st.tuples(
        st.sampled_from([n, n, n, n, 0, n - 1, n + 1]),
        st.dictionaries(st.integers(0, n), _DTYPES, max_size=2),
        _FILLS,
    ).map(like_model)

    def small(spec: tuple[list[int], str, float]) -> np.ndarray:
        shape, dtype, fill = spec
        with np.errstate(all="ignore"):
            return np.full(shape, fill).astype(dtype)

    arrays = st.tuples(st.lists(st.integers(0, 4), max_size=3), _DTYPES, _FILLS).map(small)
    return st.one_of(model, st.lists(arrays, max_size=3))


def uploads(target: Target) -> st.SearchStrategy[list[bytes]]:
    """Streams a site could send: mostly signed with the hostile site's own key (so they
    reach the checks of the content), some signed for another site, round or federation."""
    live = target.live
    kit = load_kit(target.fed.kit("site-3"))
    records = st.dictionaries(_KEYS, _record_value(live), max_size=5)
    metrics = st.tuples(records, st.integers(-5, 2 * 10**9)).map(
        lambda t: {wire.NUM_EXAMPLES: t[1], **t[0]}
    )
    valid_events = st.lists(_event("site-3"), min_size=1, max_size=2).map(json.dumps)
    task = st.one_of(st.builds(lambda: live.task), st.builds(lambda: live.task), _text(live))
    claims = st.one_of(
        st.just(("testfed", 1, "site-3")),
        st.just(("testfed", 1, "site-3")),
        st.tuples(
            st.sampled_from(["testfed", "otherfed", ""]),
            st.sampled_from([0, 1, 2, 2**63 - 1]),
            st.sampled_from(["site-3", "site-1", "../site-1", ""]),
        ),
        st.none(),
    )

    def build(parts: tuple[Any, ...]) -> list[bytes]:
        task_id, arrays, metrics, config, events, damage, claim = parts
        if events:
            config = {**config, dpfed.EVENTS: events}
        names = [f"a{i}" for i in range(len(arrays))]
        payload = wire.Payload(task_id, names, arrays, metrics, config)
        signer = None
        if claim is not None:
            federation, rnd, site = claim
            signer = UpdateSigner(kit, federation=federation, round=rnd, task_id=task_id, site=site)
        try:
            frames = list(wire.frames(payload, 64 * 1024, signer=signer))
        except StatementInvalid:  # the site's own signer refuses it (e.g. a 2000-byte id)
            frames = list(wire.frames(payload, 64 * 1024))
        if damage == "no-digest":
            frames = frames[:-1]
        elif damage == "twice" and len(frames) > 2:
            frames = frames[:-1] + frames[1:]
        elif damage == "digest-only":
            frames = frames[-1:]
        return frames

    return st.tuples(
        task,
        _arrays(target),
        metrics | records,
        records,
        st.one_of(st.just(""), valid_events, valid_events, _json_text("site-3")),
        st.sampled_from(["none", "none", "none", "no-digest", "twice", "digest-only"]),
        claims,
    ).map(build)


UPLOAD = next(m for m in METHODS if m.name == "UploadResult")


def test_random_well_formed_uploads_are_rejected_with_a_reason(target: Target) -> None:
    @settings(FUZZ, max_examples=600)
    @given(frames=uploads(target))
    def fuzz(frames: list[bytes]) -> None:
        code, replies = _call(target, UPLOAD, frames)
        assert code is grpc.StatusCode.OK
        reply = pb.UploadReply.FromString(replies[0])
        assert reply.accepted or reply.reason

    fuzz()
    assert not _tracebacks(target)


JOIN = next(m for m in METHODS if m.name == "Join")


def test_random_privacy_capabilities_at_join_get_a_clear_answer(target: Target) -> None:
    """A site's announced budget and ledger are JSON from the network: nothing in them crashes."""
    budget = st.one_of(
        st.fixed_dictionaries(
            {"epsilon_max": st.just(8.0) | _JSON, "delta": st.just(1e-5) | _JSON}
        ).map(json.dumps),
        _JSON.map(json.dumps),
        st.sampled_from(HOSTILE_TEXT),
    )
    capabilities = st.fixed_dictionaries(
        {}, optional={"dp.budget": budget, "dp.ledger": _json_text("site-3")}
    )

    @settings(FUZZ, max_examples=300)
    @given(capabilities=capabilities)
    def fuzz(capabilities: dict[str, str]) -> None:
        request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities=capabilities)
        code, _ = _call(target, JOIN, request.SerializeToString())
        assert code is grpc.StatusCode.OK

    fuzz()
    assert not _tracebacks(target)


READERS = ("officer", "root")  # an auditor and an admin


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_auditor_and_admin_requests_change_nothing(
    target: Target, method: MethodDescriptor
) -> None:
    """Reader identities: any request to a site method is refused; the audit read answers."""
    channels = {name: _channel(target.fed, name) for name in READERS}
    request = messages(method.input_type, target.live)
    sessions = target.coordinator.board.snapshot()["sessions"]
    reads = method.name == "GetAuditRecords"

    @settings(FUZZ, max_examples=10 if reads else 60)
    @given(who=st.sampled_from(READERS), data=st.data())
    def fuzz(who: str, data: st.DataObject) -> None:
        frames = data.draw(st.lists(request, max_size=3) if method.client_streaming else request)
        body: Any = (
            [m.SerializeToString() for m in frames]
            if method.client_streaming
            else frames.SerializeToString()
        )
        code, _ = _call(target, method, body, channel=channels[who])
        if reads:
            assert code is grpc.StatusCode.OK
        else:
            assert code is grpc.StatusCode.PERMISSION_DENIED

    try:
        fuzz()
    finally:
        for ch in channels.values():
            ch.close()
    assert target.coordinator.board.snapshot()["sessions"] == sessions
    assert not {s.site_id for s in target.coordinator.store.sites()} & set(READERS)
    assert not _tracebacks(target)


# --------------------------------------------------------------------------- limits


def _signed(target: Target, payload: wire.Payload) -> Iterator[bytes]:
    kit = load_kit(target.fed.kit("site-3"))
    signer = UpdateSigner(kit, federation=FED, round=1, task_id=payload.task_id, site="site-3")
    return wire.frames(payload, 64 * 1024, signer=signer)


def test_a_message_over_the_receive_limit_is_refused_and_the_server_serves_on(
    target: Target,
) -> None:
    limit = 2 * int(CHUNK_MB * 2**20) + 2**20  # server.chunk_mb sets it: 2 x chunk + 1 MiB
    huge = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, capabilities={"x": "y" * limit})
    code, _ = _call(target, JOIN, huge.SerializeToString())
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    # One frame of an upload over the limit is refused the same way.
    frame = pb.Chunk(data=b"\0" * limit).SerializeToString()
    code, _ = _call(target, UPLOAD, [frame])
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    small = pb.JoinRequest(protocol_version=PROTOCOL_VERSION).SerializeToString()
    assert _call(target, JOIN, small)[0] is grpc.StatusCode.OK


def test_an_upload_announcing_more_than_max_update_mb_is_refused_naming_the_limit(
    target: Target,
) -> None:
    limit = int(MAX_UPDATE_MB * 2**20)
    big = wire.Payload(target.live.task, ["w"], [np.zeros(limit // 4 + 1, np.float32)])
    code, replies = _call(target, UPLOAD, list(_signed(target, big)))
    reply = pb.UploadReply.FromString(replies[0])
    assert code is grpc.StatusCode.OK and not reply.accepted
    assert f"above the limit of {limit}" in reply.reason and reply.reason.startswith("MALFORMED")
    # Refused at the manifest: the coordinator read none of the 2 MB behind it.
    assert reply.bytes_received < 4096


def test_an_upload_streaming_past_its_manifest_is_cut_off_at_the_first_extra_byte(
    target: Target,
) -> None:
    """A manifest that announces 1 KiB, then 256 MiB of data: the coordinator stops at the
    first frame beyond what was announced, so it never buffers more than the manifest says
    (and the manifest is bounded by server.max_update_mb)."""
    small = wire.Payload(target.live.task, ["w"], [np.zeros(256, np.float32)])
    head = next(iter(_signed(target, small)))
    frame = pb.Chunk(data=b"\1" * 2**20).SerializeToString()
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        yield head
        for _ in range(256):
            sent += 1
            yield frame

    stub = _raw(target.site, UPLOAD)
    reply = pb.UploadReply.FromString(stub(endless(), timeout=CALL_TIMEOUT))
    assert not reply.accepted and "more data than the manifest announced" in reply.reason
    assert reply.bytes_received < 2 * len(frame)
    assert sent < 256  # the client was stopped, not drained


# --------------------------------------------------------------------------- identity


def test_another_sites_ids_in_message_fields_get_nothing_of_that_site(target: Target) -> None:
    """Identity comes from the certificate only: site-3 naming site-1's session or task,
    or signing as site-1, is refused and site-1's state does not move."""
    c = target.coordinator
    with _channel(target.fed, "site-1") as ch:
        other = CoordinatorClient(ch).Join(
            pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=CALL_TIMEOUT
        )
    stub = CoordinatorClient(target.site)
    for call in (
        lambda: stub.PullTask(pb.PullTaskRequest(session_id=other.session_id), timeout=5),
        lambda: stub.Heartbeat(pb.HeartbeatRequest(session_id=other.session_id), timeout=5),
        lambda: stub.ReportError(
            pb.SiteError(session_id=other.session_id, task_id=target.live.other_task, code="X"),
            timeout=5,
        ),
        lambda: list(
            stub.DownloadModel(
                pb.DownloadModelRequest(session_id=other.session_id, model_id=target.live.model),
                timeout=5,
            )
        ),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
    # Its own session, another site's task: nothing reported for site-1.
    stub.ReportError(
        pb.SiteError(session_id=target.live.session, task_id=target.live.other_task, code="X"),
        timeout=5,
    )
    # An upload for site-1's task, or one signed as site-1, is refused.
    result = wire.Payload(target.live.other_task, [], [], {wire.NUM_EXAMPLES: 1})
    reply = stub.UploadResult(_signed(target, result), timeout=CALL_TIMEOUT)
    assert not reply.accepted and "another site" in reply.reason
    kit = load_kit(target.fed.kit("site-3"))
    forged = UpdateSigner(kit, federation=FED, round=1, task_id=target.live.task, site="site-1")
    mine = wire.Payload(target.live.task, [], [], {wire.NUM_EXAMPLES: 1})
    reply = stub.UploadResult(wire.frames(mine, signer=forged), timeout=CALL_TIMEOUT)
    assert not reply.accepted and reply.reason.startswith("WRONG_SITE")
    phase = c.board.snapshot()["phase"]
    assert phase["failures"]["site-1"] == "not connected when the round started"
    site1 = {s.site_id: s for s in c.store.sites()}["site-1"]
    assert (site1.tasks_done, site1.tasks_failed, site1.last_error) == (0, 0, None)


def test_a_sites_error_text_cannot_forge_log_lines_or_fill_the_disk(target: Target) -> None:
    c = target.coordinator
    before = len(target.log)
    forged = "ok\n12:00:00 INFO    confide.coordinator: round 9/9 done" + "x" * 500_000
    CoordinatorClient(target.site).ReportError(
        pb.SiteError(session_id=target.live.session, task_id="t\r\n", code="E\n", message=forged),
        timeout=CALL_TIMEOUT,
    )
    (record,) = [r for r in target.log[before:] if "could not do" in r.getMessage()]
    line = record.getMessage()
    assert "\n" not in line and "\r" not in line and len(line) < 1500
    assert "more characters" in line
    error = {s.site_id: s for s in c.store.sites()}["site-3"].last_error
    assert error is not None and len(error) < 1200 and "\n" not in error


def _expired_kit(fed: Federation, out: Path) -> grpc.ChannelCredentials:
    """A site certificate of the federation CA whose validity ended yesterday."""
    pki = fed.root / "pki"
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, FED),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "site"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "site-9"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"confide://{FED}/site/site-9")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
    )


def test_an_expired_certificate_of_the_federation_ca_is_refused(
    target: Target, tmp_path: Path
) -> None:
    creds = _expired_kit(target.fed, tmp_path)
    with (
        grpc.secure_channel(
            target.fed.address, creds, options=[("grpc.enable_http_proxy", 0)]
        ) as ch,
        pytest.raises(grpc.RpcError) as e,
    ):
        CoordinatorClient(ch).Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=10)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE  # the TLS handshake refuses it
    assert "site-9" not in {s.site_id for s in target.coordinator.store.sites()}


#: Every file name Confide writes under a federation's folder in these tests.
KNOWN_FILES = re.compile(
    r"pki|kits|coordinator|state|models|site-\d-state|site-\d|officer|root"
    r"|(ca|crl|coordinator|site-\d|officer|root)\.(crt|key|pem)|registry\.json|kit\.json"
    r"|README\.md|\.lock|coordinator\.json|federation\.toml|history\.json|dp_state\.json"
    r"|(state|ledger|audit)\.db(-wal|-shm)?|audit\.key|round-\d+\.(npz|sealed)(\.tmp)?"
    r"|metrics\.png"
)


@pytest.mark.slow
def test_after_the_fuzz_two_real_sites_complete_a_round(target: Target) -> None:
    """Still serving, no traceback logged, a DP round completes, nothing of the fuzz stored."""
    c, fed = target.coordinator, target.fed
    assert not _tracebacks(target)
    # The hostile site goes quiet; it must not be counted as connected for the round.
    wait_for(lambda: "site-3" not in c.board.connected(), 30, "site-3 to time out")
    codes: list[int] = []
    loop = threading.Thread(target=lambda: codes.append(c.run()), daemon=True)
    loop.start()
    for pid, name in enumerate(("site-1", "site-2")):
        doc = fed.site_doc(pid, 2)
        doc["state_dir"] = str(fed.root / f"{name}-state")
        doc["privacy"] = {"epsilon_max": 50.0, "delta": 1e-5, "require_dp": True}
        fed.start_agent(SiteAgent(load_kit(fed.kit(name)), validate_site_config(doc)))
    wait_for(lambda: bool(codes), 240, "the federation to finish")
    for t in fed.threads:
        t.join(timeout=30)
    loop.join(timeout=30)
    assert codes == [0] and not fed.errors, (
        fed.errors,
        [
            r.getMessage()
            for r in target.log
            if "site-1" in r.getMessage() or "round" in r.getMessage()
        ][-30:],
    )
    assert not _tracebacks(target)

    with Store(fed.root / "state") as store:
        rounds = [(r.round, r.attempt, r.status, sorted(r.succeeded)) for r in store.rounds()]
        sites = {s.site_id: s for s in store.sites()}
    assert rounds == [(1, 1, "ok", ["site-1", "site-2"])]
    # The hostile site is known (it joined with its own certificate) with its rejections
    # (and maybe a result it got right for the phase opened for it, which no round used);
    # no auditor, admin or made-up name became a site.
    assert set(sites) == {"site-1", "site-2", "site-3"}
    assert sites["site-1"].tasks_failed == sites["site-2"].tasks_failed == 0
    # The real sites' mirrored privacy events are theirs and only theirs.
    with PrivacyLedger(fed.root / "state" / "ledger.db") as mirror:
        for name in ("site-1", "site-2"):
            with PrivacyLedger(fed.root / f"{name}-state" / "ledger.db", site=name) as own:
                assert [r["uid"] for r in mirror.export(name)] == [r["uid"] for r in own.export()]
        assert set(mirror.sites()) <= {"site-1", "site-2", "site-3"}
    # No name from the network became a file: everything under the federation's folder
    # (coordinator state, site state, kits) has one of the names Confide itself gives.
    for path in fed.root.rglob("*"):
        rel = path.relative_to(fed.root)
        assert path.resolve().is_relative_to(fed.root.resolve()), rel
        assert KNOWN_FILES.fullmatch(path.name), f"unexpected file {rel}"


# --------------------------------------------------------------------------- regressions
# What the fuzzing above found, each pinned on its own (no network needed).


def _frames(header: pb.ArrayHeader, total: int) -> list[bytes]:
    manifest = pb.Manifest(task_id="t", arrays=[header], total_bytes=total)
    data = b"\0" * max(total, 0)
    return [
        pb.Chunk(manifest=manifest).SerializeToString(),
        *([pb.Chunk(data=data).SerializeToString()] if data else []),
        pb.Chunk(digest=blake3.blake3(data).digest()).SerializeToString(),
    ]


@pytest.mark.parametrize(
    ("shape", "dtype", "nbytes"),
    [
        ([2**62, 4], "<f4", 0),  # int64 product wraps to 0 bytes
        ([2**62, 3], "|u1", -(2**62)),  # ... or to a negative size
        ([0, 2**62, 2**62], "<f8", 0),  # empty, but NumPy cannot index it
        ([1] * 100, "|u1", 1),  # more dimensions than NumPy has
    ],
)
def test_a_manifest_with_an_overflowing_shape_is_a_wire_error(
    shape: list[int], dtype: str, nbytes: int
) -> None:
    header = pb.ArrayHeader(name="a", dtype=dtype, shape=shape, nbytes=nbytes)
    with pytest.raises(wire.WireError, match="above"):
        wire.decode(_frames(header, nbytes), max_bytes=2**20)


def test_an_event_with_integers_for_reals_does_not_poison_the_mirror(tmp_path: Path) -> None:
    """An event sent as JSON with ``1`` for σ used to be stored as 1.0, no longer match
    its uid, and make the whole mirror read as tampered with: every site left out."""
    event = {**_EVENT, "noise_multiplier": 1, "sample_rate": 1, "time": 1_700_000_000}
    with PrivacyLedger(tmp_path / "mirror.db") as mirror:
        mirror.set_budget("site-1", 8.0, 1e-5)
        assert mirror.mirror([event]) == 1
        assert mirror.events(site="site-3")[0].noise_multiplier == 1.0
        mirror.check("site-1", [])  # no LedgerCorrupted


@pytest.mark.parametrize(
    "change",
    [
        {"steps": 2**70},  # beyond SQLite's INTEGER: was an OverflowError
        {"dataset_size": 2**64},
        {"noise_multiplier": 10**400},  # beyond float: was an OverflowError
        {"note": "\ud800"},  # a lone surrogate from JSON: was a UnicodeEncodeError
    ],
)
def test_an_event_sqlite_cannot_store_is_an_invalid_event(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    with PrivacyLedger(tmp_path / "mirror.db") as mirror, pytest.raises(InvalidDpEvent):
        mirror.mirror([{**_EVENT, **change}])


def test_json_nested_deeper_than_the_recursion_limit_is_refused_cleanly() -> None:
    with pytest.raises(DpError, match="not JSON"):
        dpfed.events_from_json("[" * 3000)


def _privacy(tmp_path: Path) -> CoordinatorPrivacy:
    settings = dpfed.DpSettings.model_validate(
        {
            "delta": 1e-5,
            "example": {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps_per_round": 2},
        }
    )
    return CoordinatorPrivacy(settings, FED, 1, tmp_path / "state", 0)


def test_a_budget_or_ledger_nested_too_deep_leaves_the_site_without_dp_rounds(
    tmp_path: Path,
) -> None:
    privacy = _privacy(tmp_path)
    try:
        privacy.site_joined("site-3", {"dp.budget": "[" * 3000})
        privacy.site_joined("site-3", {"dp.budget": '{"epsilon_max": 1e999, "delta": 1e-5}'})
        privacy.site_joined(
            "site-3", {"dp.budget": '{"epsilon_max": 8, "delta": 1e-5}', "dp.ledger": "[" * 3000}
        )
        # Its budget was never taken (it used to be, before the ledger was parsed).
        assert privacy.ledger.budget("site-3") is None
        assert privacy.eligible(["site-3"], 1) == ([], {"site-3": "NoBudget"})
    finally:
        privacy.close()


def test_dp_events_claiming_more_steps_than_planned_are_refused(tmp_path: Path) -> None:
    privacy = _privacy(tmp_path)
    try:
        many = json.dumps([{**_EVENT, "steps": 10**6}])
        with pytest.raises(
            Rejected, match="claims 1000000 steps, the round's plan allows at most 2"
        ):
            privacy.accept_events("site-3", 1, {dpfed.EVENTS: many})
        assert privacy.ledger.events(site="site-3") == []
        listed = json.dumps([{**_EVENT, "mechanism": ["dp-sgd"]}])  # unhashable in a set
        with pytest.raises(Rejected):
            privacy.accept_events("site-3", 1, {dpfed.EVENTS: listed})
    finally:
        privacy.close()


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "..", ".", "", "sub/dir.key", "a\x00b"]
)
@pytest.mark.parametrize("key", ["certificate", "private_key", "ca_certificate"])
def test_a_file_named_in_a_kit_stays_inside_the_kit(tmp_path: Path, key: str, name: str) -> None:
    init_ca(tmp_path / "pki", FED)
    kit = issue(tmp_path / "pki", "site-1", "site", tmp_path / "kit")
    meta = json.loads((kit / "kit.json").read_text())
    meta["files"] = {**meta.get("files", {}), key: name}
    (kit / "kit.json").write_text(json.dumps(meta))
    with pytest.raises(KitError, match=f"files.{key} must be a plain file name"):
        load_kit(kit)


def _nul_error(load: Callable[[], object]) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load()
    assert "NUL byte" in str(e.value)
    return e.value


@pytest.mark.parametrize("key", ["state_dir", "coordinator_dir", "seal_key_file"])
def test_a_coordinator_path_with_a_nul_byte_is_a_config_error(tmp_path: Path, key: str) -> None:
    toml = tmp_path / "federation.toml"
    toml.write_text(f'[federation]\nname = "f"\n[server]\n{key} = "a\\u0000b"\n')
    assert _nul_error(lambda: FederationConfig.load(toml)).field == f"server.{key}"


@pytest.mark.parametrize(
    ("table", "key"),
    [("", "state_dir"), ("deid", "config"), ("deid", "input"), ("deid", "output")],
)
def test_a_site_path_with_a_nul_byte_is_a_config_error(
    tmp_path: Path, table: str, key: str
) -> None:
    nul = '"a\\u0000b"'  # TOML's escape: the file itself holds no NUL
    deid = {"config": '"deid.toml"', "input": '"raw.csv"', "output": '"clean.csv"', key: nul}
    text = "[deid]\n" + "".join(f"{k} = {v}\n" for k, v in deid.items()) if table else ""
    toml = tmp_path / "site.toml"
    toml.write_text(text or f"{key} = {nul}\n")
    err = _nul_error(lambda: load_site_config(toml))
    assert err.field == (f"{table}.{key}" if table else key)


def test_a_deid_secret_file_with_a_nul_byte_is_a_config_error(tmp_path: Path) -> None:
    toml = tmp_path / "deid.toml"
    toml.write_text('secret_file = "a\\u0000b"\n')
    assert _nul_error(lambda: DeidConfig.load(toml)).field == "secret_file"


# --------------------------------------------------------------------------- secrets


def _encodings(secret: bytes) -> set[bytes]:
    """The ways a secret could show up in a log: raw, hex, base64, a bytes repr."""
    out = {
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
    }
    escaped = repr(secret)[2:-1].encode()
    if len(escaped) >= 24:  # mostly printable bytes would match by accident otherwise
        out.add(escaped)
    return {e.rstrip(b"=") for e in out}


def _key_secrets(pem: bytes) -> set[bytes]:
    """A private key's PEM body lines, its whole DER (base64 and other encodings) and,
    for EC and X25519 keys, the private scalar."""
    lines = [ln for ln in pem.splitlines() if ln and not ln.startswith(b"-----")]
    found = {ln for ln in lines if len(ln) >= 24}
    der = base64.b64decode(b"".join(lines))
    found |= _encodings(der)
    key = serialization.load_pem_private_key(pem, None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        found |= _encodings(key.private_numbers().private_value.to_bytes(32, "big"))
    return found


def _leaks(files: list[Path], secrets: dict[str, set[bytes]]) -> list[str]:
    out = []
    for path in files:
        data = path.read_bytes()
        for what, forms in secrets.items():
            for form in forms:
                at = data.find(form)
                if at >= 0:
                    line = data.count(b"\n", 0, at) + 1
                    out.append(f"{what} in {path}:{line}")
                    break
    return out


@pytest.mark.slow
def test_no_key_seed_or_secret_reaches_a_log_or_the_coordinators_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full run (three sites, SecAgg+, client-level DP with the sites' noise, one site
    de-identifying its export with an HMAC secret) with every logger at DEBUG, in text and
    JSON: no private key, SecAgg+ secret, de-identification secret or noise seed shows up
    in any log, nor anywhere in the coordinator's state folder."""
    fed = make_federation(
        tmp_path, sites=("site-1", "site-2", "site-3"), rounds=1, min_sites=3, expected=3
    )
    fed.doc["federation"]["secure_aggregation"] = "secagg+"
    fed.doc["evaluation"] = {"fraction": 0.0}
    fed.doc["dp"] = {
        "delta": 1e-5,
        "client": {"noise": "distributed", "noise_multiplier": 0.8, "clip_norm": 0.5},
    }
    # Site 3 de-identifies a small export keyed with its own secret before it connects.
    site3 = tmp_path / "site-3-files"
    site3.mkdir()
    secret = b"K" + os.urandom(38) + b"K"  # the reader strips edge whitespace
    (site3 / "site-secret.key").write_bytes(secret)
    os.chmod(site3 / "site-secret.key", 0o600)
    (site3 / "deid.toml").write_text(
        'secret_file = "site-secret.key"\n[k_anonymity]\nk = 1\n[columns]\n'
        'Id = { role = "direct", action = "pseudonym" }\nAGE = "keep"\n'
    )
    (site3 / "raw.csv").write_text(
        "Id,AGE\n" + "".join(f"patient-{i},{20 + i % 50}\n" for i in range(50))
    )
    seed = 918273645  # a simulation-only knob: a real site has no noise seed to leak
    logs = tmp_path / "logs"
    logs.mkdir()

    made: list[SecAggClient] = []
    init = SecAggClient.__init__

    def recording(self: SecAggClient, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SecAggClient, "__init__", recording)

    handlers: list[tuple[logging.Logger, logging.Handler]] = []
    saved = {
        n: (logging.getLogger(n).level, logging.getLogger(n).propagate)
        for n in ("", "confide", "confide.site")
    }
    for name, formatter in (
        ("all.log", logging.Formatter("%(name)s %(levelname)s %(message)s")),
        ("all.jsonl", JsonFormatter()),
    ):
        handler = logging.FileHandler(logs / name)
        handler.setFormatter(formatter)
        handler.setLevel(logging.DEBUG)
        for lg in (logging.getLogger(), logging.getLogger("confide.site")):
            lg.addHandler(handler)
            handlers.append((lg, handler))
    # The site agent's own handlers, as `confide site start -v [--log-json]` sets them up.
    site_text, site_json = (logs / "site.log").open("w"), (logs / "site.jsonl").open("w")
    for stream, as_json in ((site_text, False), (site_json, True)):
        handlers.append(
            (
                logging.getLogger("confide.site"),
                configure_site_logging(as_json, stream=stream, verbose=True),
            )
        )
    logging.getLogger().setLevel(logging.DEBUG)
    logging.getLogger("confide").setLevel(logging.DEBUG)
    try:
        with running_coordinator(fed) as (_coordinator, codes):
            for pid, name in enumerate(("site-1", "site-2", "site-3")):
                doc = fed.site_doc(pid, 3, **({"dp-noise-seed": seed} if pid == 0 else {}))
                doc["state_dir"] = str(tmp_path / f"{name}-state")
                doc["privacy"] = {"epsilon_max": 50.0, "delta": 1e-5}
                if name == "site-3":
                    doc["deid"] = {
                        "config": str(site3 / "deid.toml"),
                        "input": str(site3 / "raw.csv"),
                        "output": str(site3 / "clean.csv"),
                    }
                agent = SiteAgent(
                    load_kit(fed.kit(name)), validate_site_config(doc), app=offset_app()
                )
                fed.start_agent(agent)
            wait_for(lambda: bool(codes), 240, "the federation to finish")
            for t in fed.threads:
                t.join(timeout=30)
        assert codes == [0] and not fed.errors, fed.errors
    finally:
        for lg, h in handlers:
            lg.removeHandler(h)
            h.close()
        site_text.close()
        site_json.close()
        for n, (level, propagate) in saved.items():
            logging.getLogger(n).setLevel(level)
            logging.getLogger(n).propagate = propagate

    assert len(made) == 3  # each site held SecAgg+ secrets this round
    secrets: dict[str, set[bytes]] = {"de-identification secret": _encodings(secret)}
    for pem_path in sorted(tmp_path.rglob("*.key")):
        if pem_path.name == "site-secret.key":
            continue
        secrets[f"private key {pem_path.relative_to(tmp_path)}"] = _key_secrets(
            pem_path.read_bytes()
        )
    raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    for i, client in enumerate(made):
        secrets[f"SecAgg+ self-mask seed of client {i}"] = _encodings(client._b)
        secrets[f"SecAgg+ key-agreement secret of client {i}"] = _encodings(
            client._c.private_bytes(*raw)
        )
        secrets[f"SecAgg+ share-encryption secret of client {i}"] = _encodings(
            client._s.private_bytes(*raw)
        )
    log_files = sorted(p for p in logs.iterdir()) + sorted((tmp_path / "state").rglob("*.log"))
    assert sum(p.stat().st_size for p in log_files) > 10_000  # DEBUG logs were written
    assert not _leaks(log_files, secrets)
    # The coordinator's state folder, every file (its own audit key aside).
    state = [
        p for p in sorted((tmp_path / "state").rglob("*")) if p.is_file() and p.name != "audit.key"
    ]
    coordinator_key = {k: v for k, v in secrets.items() if "state/audit.key" in k}
    others = {k: v for k, v in secrets.items() if k not in coordinator_key}
    assert not _leaks(state, others)
    # The simulation noise seed a site might set is not logged either.
    seeds = {"dp-noise-seed": {str(seed).encode()}}
    assert not _leaks(log_files + state, seeds)
    # The search itself finds what it looks for: one key line planted in a copy of a log.
    key_line = next(
        ln for ln in (tmp_path / "kits" / "site-1" / "site-1.key").read_bytes().splitlines()[1:]
    )
    planted = logs / "planted.log"
    planted.write_bytes(b"line one\nsome text " + key_line + b" more\n")
    assert _leaks([planted], secrets) == [f"private key kits/site-1/site-1.key in {planted}:2"]
