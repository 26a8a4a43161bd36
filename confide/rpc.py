"""The ``confide.v1.Coordinator`` service bound to gRPC, with model streams as raw frames.

The generated stubs (``coordinator_pb2_grpc``) turn every ``Chunk`` into a protobuf
object, which costs two copies of each 1-4 MiB chunk per side. Here the two streaming
methods carry the *serialized* ``Chunk`` messages instead (``bytes``): the coordinator
caches a model's frames once and sends them as they are, the site agent builds its
upload frames straight from the arrays (:func:`confide.wire.frames`), and
:func:`confide.wire.decode` reads data frames in place. The bytes on the wire are the
same ``confide.v1.Chunk`` messages, so a peer using the generated stubs interoperates
(tests do exactly that). Every other method uses the generated message classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc

from confide.protos.v1 import coordinator_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name

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


def add_coordinator_service(servicer: CoordinatorServicer, server: grpc.Server) -> None:
    """Register ``servicer`` on ``server``; the streaming methods exchange raw frames."""
    handlers = {}
    for name, (req, resp) in _METHODS.items():
        kind = _STREAMING.get(name, "unary_unary")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        handlers[name] = make(
            getattr(servicer, name),
            request_deserializer=None if req is None else req.FromString,
            response_serializer=None if resp is None else resp.SerializeToString,
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
