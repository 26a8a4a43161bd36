"""The ``confide.v1.Coordinator`` service bound to gRPC, with model streams as raw frames.

The generated stubs (``coordinator_pb2_grpc``) turn every ``Chunk`` into a protobuf
object, which costs two copies of each 1-4 MiB chunk per side. Here the two streaming
methods carry the *serialized* ``Chunk`` messages instead (``bytes``): the coordinator
caches a model's frames once and sends them as they are, the site agent builds its
upload frames straight from the arrays (:func:`confide.wire.frames`), and
:func:`confide.wire.decode` reads data frames in place. The bytes on the wire are the
same ``confide.v1.Chunk`` messages, so a peer using the generated stubs interoperates
(tests do exactly that). Every other method uses the generated message classes.
An optional :class:`TrafficMeter` counts every message in and out of the service, per
method and direction, at the same serializers.

A request that is not a valid protobuf message of its method's type is answered with
``INVALID_ARGUMENT`` naming the type, before the servicer runs (gRPC's own answer would be
``INTERNAL`` and a logged traceback, which reads as a coordinator bug).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from confide.protos.v1 import coordinator_pb2 as pb

log = logging.getLogger("confide.coordinator")

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
# gRPC puts each message behind a 1-byte compressed flag and a 4-byte length.
GRPC_PREFIX_BYTES = 5

# method -> (request class, response class); None marks a stream of raw Chunk frames.
_METHODS: dict[str, tuple[Any, Any]] = {
    "Join": (pb.JoinRequest, pb.JoinReply),
    "PullTask": (pb.PullTaskRequest, pb.Task),
    "DownloadModel": (pb.DownloadModelRequest, None),
    "UploadResult": (None, pb.UploadReply),
    "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatReply),
    "ReportError": (pb.SiteError, pb.Ack),
    "GetAuditRecords": (pb.AuditRecordsRequest, pb.AuditChunk),
}
_STREAMING = {
    "DownloadModel": "unary_stream",
    "UploadResult": "stream_unary",
    "GetAuditRecords": "unary_stream",
}


def _check_contract() -> None:
    declared = {m.name for m in pb.DESCRIPTOR.services_by_name["Coordinator"].methods}
    if declared != set(_METHODS):
        raise RuntimeError(
            f"confide.rpc is out of date with coordinator.proto: it binds {sorted(_METHODS)}, "
            f"the service declares {sorted(declared)}"
        )


_check_contract()


class CoordinatorServicer(Protocol):
    """What :func:`add_coordinator_service` binds (``confide.server.service`` implements it)."""

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply: ...

    def PullTask(self, request: pb.PullTaskRequest, context: grpc.ServicerContext) -> pb.Task: ...

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]: ...

    def UploadResult(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.UploadReply: ...

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply: ...

    def ReportError(self, request: pb.SiteError, context: grpc.ServicerContext) -> pb.Ack: ...

    def GetAuditRecords(
        self, request: pb.AuditRecordsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AuditChunk]: ...


@dataclass(frozen=True)
class MethodTraffic:
    """Bytes (gRPC length prefix included) and messages of one method, both directions.

    ``up`` is what the peers sent to the service (requests, uploaded chunks), ``down``
    what the service sent back.
    """

    up: int = 0
    down: int = 0
    up_messages: int = 0
    down_messages: int = 0

    def __sub__(self, other: MethodTraffic) -> MethodTraffic:
        return MethodTraffic(
            self.up - other.up,
            self.down - other.down,
            self.up_messages - other.up_messages,
            self.down_messages - other.down_messages,
        )

    def __bool__(self) -> bool:
        return bool(self.up_messages or self.down_messages)


@dataclass(frozen=True)
class Traffic:
    """A :class:`TrafficMeter` reading: per method, and totals; ``b - a`` is the window."""

    methods: Mapping[str, MethodTraffic]

    @property
    def up(self) -> int:
        return sum(m.up for m in self.methods.values())

    @property
    def down(self) -> int:
        return sum(m.down for m in self.methods.values())

    @property
    def messages(self) -> int:
        return sum(m.up_messages + m.down_messages for m in self.methods.values())

    def __sub__(self, other: Traffic) -> Traffic:
        zero = MethodTraffic()
        return Traffic({k: v - other.methods.get(k, zero) for k, v in self.methods.items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: totals and the methods that carried anything."""
        return {
            "up_bytes": self.up,
            "down_bytes": self.down,
            "messages": self.messages,
            "by_method": {
                name: {
                    "up_bytes": m.up,
                    "down_bytes": m.down,
                    "up_messages": m.up_messages,
                    "down_messages": m.down_messages,
                }
                for name, m in self.methods.items()
                if m
            },
        }


class TrafficMeter:
    """Counts the serialized messages a service receives and sends, per method.

    Bytes are the gRPC message layer: each serialized message (or raw ``Chunk`` frame)
    plus gRPC's 5-byte length prefix; HTTP/2 and TLS framing are not included. One int
    add under a lock per message, so it stays on for every stream.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # method -> [up bytes, down bytes, up messages, down messages]
        self._counts: dict[str, list[int]] = {name: [0, 0, 0, 0] for name in _METHODS}

    def add(self, method: str, up: bool, nbytes: int) -> None:
        """Count one message of ``nbytes`` serialized bytes."""
        slot = 0 if up else 1
        counts = self._counts[method]
        with self._lock:
            counts[slot] += nbytes + GRPC_PREFIX_BYTES
            counts[slot + 2] += 1

    def snapshot(self) -> Traffic:
        with self._lock:
            return Traffic({name: MethodTraffic(*c) for name, c in self._counts.items()})

    def deserializer(
        self, method: str, parse: Callable[[bytes], Any] | None
    ) -> Callable[[bytes], Any]:
        """A request deserializer that counts what arrives (raw frames pass through)."""
        add = self.add
        if parse is None:

            def raw(data: bytes) -> bytes:
                add(method, True, len(data))
                return data

            return raw

        def counted(data: bytes) -> Any:
            add(method, True, len(data))
            return parse(data)

        return counted

    def serializer(
        self, method: str, serialize: Callable[[Any], bytes] | None
    ) -> Callable[[Any], bytes]:
        """A response serializer that counts what leaves (raw frames pass through)."""
        add = self.add
        if serialize is None:

            def raw(frame: bytes) -> bytes:
                add(method, False, len(frame))
                return frame

            return raw

        def counted(message: Any) -> bytes:
            data = serialize(message)
            add(method, False, len(data))
            return data

        return counted


@dataclass(frozen=True)
class MalformedRequest:
    """What a request deserializer returns for bytes that are not a message of its type."""

    type_name: str
    error: str

    @property
    def message(self) -> str:
        return (
            f"the request is not a valid {self.type_name} message ({self.error}). Fix: send "
            "the message protos/confide/v1/coordinator.proto declares for this method"
        )


def _parser(cls: Any) -> Callable[[bytes], Any]:
    type_name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return MalformedRequest(type_name, str(e) or "malformed protobuf")

    return parse


def _refuse_malformed(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
    """``behaviour``, but a :class:`MalformedRequest` is answered INVALID_ARGUMENT."""

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            log.warning("refused call from %s: %s", context.peer(), request.message)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behaviour(request, context)

    return call


def add_coordinator_service(
    servicer: CoordinatorServicer, server: grpc.Server, meter: TrafficMeter | None = None
) -> None:
    """Register ``servicer`` on ``server``; the streaming methods exchange raw frames.

    With a ``meter``, every message in and out is counted (:class:`TrafficMeter`).
    """
    handlers = {}
    for name, (req, resp) in _METHODS.items():
        kind = _STREAMING.get(name, "unary_unary")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        parse = None if req is None else _parser(req)
        serialize = None if resp is None else resp.SerializeToString
        behaviour = getattr(servicer, name)
        if req is not None:
            behaviour = _refuse_malformed(behaviour)
        if meter is not None:
            parse, serialize = meter.deserializer(name, parse), meter.serializer(name, serialize)
        handlers[name] = make(
            behaviour,
            request_deserializer=parse,
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class CoordinatorClient:
    """Client of ``confide.v1.Coordinator``: generated messages, raw frames for streams.

    ``DownloadModel`` yields serialized ``Chunk`` frames and ``UploadResult`` takes them;
    both are what :func:`confide.wire.decode` reads and :func:`confide.wire.frames` makes.
    """

    Join: grpc.UnaryUnaryMultiCallable
    PullTask: grpc.UnaryUnaryMultiCallable
    DownloadModel: grpc.UnaryStreamMultiCallable
    UploadResult: grpc.StreamUnaryMultiCallable
    Heartbeat: grpc.UnaryUnaryMultiCallable
    ReportError: grpc.UnaryUnaryMultiCallable
    GetAuditRecords: grpc.UnaryStreamMultiCallable

    def __init__(self, channel: grpc.Channel) -> None:
        for name, (req, resp) in _METHODS.items():
            factory: Callable[..., Any] = getattr(channel, _STREAMING.get(name, "unary_unary"))
            setattr(
                self,
                name,
                factory(
                    f"/{SERVICE}/{name}",
                    request_serializer=None if req is None else req.SerializeToString,
                    response_deserializer=None if resp is None else resp.FromString,
                ),
            )
