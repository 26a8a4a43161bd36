"""The gRPC face of the coordinator: every call authenticated from the client certificate.

Identity comes only from the mutual-TLS peer certificate, never from a message field;
the revocation list is consulted on every call, so a revoked site is cut off at its
next poll without a restart.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from confide.privacy.crypto import (
    CertificateRevokedError,
    Identity,
    NotAConfideIdentityError,
    PeerNotAllowedError,
    RevocationList,
    authenticate_peer,
)
from confide.privacy.crypto.errors import PKIError
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.server.integrity import INTEGRITY_REASONS, check_signed
from confide.server.rounds import Kind, Reason, Rejected, RoundBoard, Session, TaskSpec
from confide.wire import Payload, StreamStats, WireError, decode, encode_records

if TYPE_CHECKING:
    from confide.server.coordinator import Coordinator

log = logging.getLogger("confide.coordinator")


class StreamWatch:
    """Cancels the calls that outlive their limit; one thread for every stream.

    A stream is watched from its start; when it ends first (the usual case) its entry
    only drops its reference to the call and waits, inert, until its time is up. One
    sleeping thread instead of a timer thread per stream: starting and stopping a
    thread costs ~0.1 ms, 500 of them a round at 100 sites under SecAgg+.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, list[Any]]] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, context: grpc.ServicerContext, seconds: float, why: str) -> None:
        """Cancel ``context`` in ``seconds`` unless its call is over by then (``why`` is
        logged when it is cancelled)."""
        entry: list[Any] = [context, why]
        if not context.add_callback(lambda: entry.clear()):  # the call is over already
            return
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._ids), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-watch", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cv.wait(timeout=wait)
                _, _, entry = heapq.heappop(self._heap)
            still = entry[:]  # one atomic copy: the call may end (and clear it) meanwhile
            if still:
                context, why = still
                log.warning("%s", why)
                context.cancel()


#: Who may take part in rounds, and who may read the audit records (and nothing else).
SITE_ROLES = frozenset({"site"})
READER_ROLES = frozenset({"auditor", "admin"})
AUDIT_CHUNK = 1 << 20

_KIND = {Kind.TRAIN: pb.Task.TRAIN, Kind.EVALUATE: pb.Task.EVALUATE, Kind.SECAGG: pb.Task.SECAGG}


class CoordinatorService:
    """Implements ``confide.v1.Coordinator`` on top of a :class:`Coordinator`.

    Bound by :func:`confide.rpc.add_coordinator_service`: model streams are raw frames.
    """

    def __init__(self, coordinator: Coordinator, revocations: RevocationList | None) -> None:
        self.c = coordinator
        self.board: RoundBoard = coordinator.board
        self.revocations = revocations
        self._touched: dict[str, float] = {}
        self._streams = StreamWatch()

    # --- authentication ----------------------------------------------------------------

    def _identity(
        self, context: grpc.ServicerContext, roles: frozenset[str] = SITE_ROLES
    ) -> Identity:
        try:
            return authenticate_peer(
                context.auth_context(),
                self.revocations,
                federation=self.c.cfg.federation.name,
                roles=set(roles),
            )
        except CertificateRevokedError as e:
            self._abort(context, grpc.StatusCode.PERMISSION_DENIED, str(e), "revoked")
        except PeerNotAllowedError as e:
            self._abort(context, grpc.StatusCode.PERMISSION_DENIED, str(e), "not-allowed")
        except (NotAConfideIdentityError, PKIError) as e:
            self._abort(context, grpc.StatusCode.UNAUTHENTICATED, str(e), "unauthenticated")

    def _abort(
        self, context: grpc.ServicerContext, code: grpc.StatusCode, msg: str, why: str
    ) -> NoReturn:
        log.warning("refused call from %s: %s", context.peer(), msg)
        self.c.store.event("refused", reason=why, peer=context.peer(), detail=msg)
        context.abort(code, msg)
        raise AssertionError("unreachable")  # context.abort raises

    def _session(self, session_id: str, ident: Identity, context: grpc.ServicerContext) -> Session:
        session = self.board.session(session_id, ident.identity)
        if session is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                "unknown session (the coordinator restarted or the site rejoined); join again",
            )
            raise AssertionError("unreachable")
        return session

    def _bound_stream(self, context: grpc.ServicerContext, method: str, site: str) -> None:
        """Cancel this stream once it can no longer serve the round.

        A peer that stops reading a model or stops sending a result, with no deadline of
        its own, would otherwise hold a server thread until the coordinator stops (enough
        such streams and no site is served at all). A stream lives until the open phase's
        deadline, since a result after it is LATE anyway, and at least the site timeout.
        """
        deadline = self.board.transfer_deadline()
        limit = max(
            self.c.cfg.server.site_timeout_seconds,
            0.0 if deadline is None else deadline - time.time(),
        )
        self._streams.watch(
            context, limit, f"{method} of {site} cancelled: unfinished after {limit:.1f} s"
        )

    # --- calls -------------------------------------------------------------------------

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        ident = self._identity(context)
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not supported; this "
                f"coordinator speaks version {PROTOCOL_VERSION}. Upgrade the site's confide",
            )
        # The site's budget and ledger are mirrored before it counts as connected, so the
        # first selection after its join already knows what it may spend.
        self.c.privacy.site_joined(ident.identity, dict(request.capabilities))
        session = self.board.join(ident.identity, ident.serial)
        self.c.store.site_seen(ident.identity, ident.role, f"{ident.serial:x}", session.session_id)
        software = untrusted(request.software, 200)
        self.c.store.event("join", site_id=ident.identity, software=software)
        log.info("site %s joined (%s)", ident.identity, software or "unknown software")
        return pb.JoinReply(
            protocol_version=PROTOCOL_VERSION,
            federation=self.c.cfg.federation.name,
            site_id=ident.identity,
            session_id=session.session_id,
            heartbeat_seconds=self.c.cfg.server.heartbeat_seconds,
            chunk_bytes=self.c.chunk_bytes,
        )

    def PullTask(self, request: pb.PullTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        ident = self._identity(context)
        session = self._session(request.session_id, ident, context)
        now = time.monotonic()
        if now - self._touched.get(ident.identity, 0.0) > 5.0:  # throttled: one write per 5 s
            self._touched[ident.identity] = now
            self.c.store.touch(ident.identity)
        limit = self.c.cfg.server.max_poll_seconds
        wait = min(request.wait_seconds, limit) if request.wait_seconds > 0 else limit
        task = self.board.next_task(session, wait)
        if task is False:
            return pb.Task(kind=pb.Task.STOP)
        if task is None or task is True:
            return pb.Task(kind=pb.Task.WAIT)
        log.debug(
            "round %d: %s task %s -> %s", task.round, task.kind.value, task.task_id, task.site_id
        )
        return pb.Task(
            task_id=task.task_id,
            kind=_KIND[task.kind],
            round=task.round,
            model_id=task.model_id,
            config=encode_records(task.config),
            deadline_unix=task.deadline,
        )

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        ident = self._identity(context)
        self._session(request.session_id, ident, context)
        found = self.c.model_chunks(request.model_id, request.chunk_bytes)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_id!r} (round over)")
            return
        chunks, _ = found
        self._bound_stream(context, "DownloadModel", ident.identity)
        yield from chunks

    def UploadResult(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        ident = self._identity(context)
        session = self.board.session_for_site(ident.identity)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown session; join again")
            raise AssertionError("unreachable")
        self._bound_stream(context, "UploadResult", ident.identity)
        counted = StreamStats()
        payload: Payload | None = None
        try:
            payload = decode(request_iterator, max_bytes=self.c.max_update_bytes, stats=counted)
            # Who and when before what: the statement is checked against the caller's
            # certificate and the running round before the content is looked at.
            statement = check_signed(
                payload,
                site=ident.identity,
                certificate=_peer_certificate(context),
                federation=self.c.cfg.federation.name,
                current_round=self.board.current_round(),
                nonces=self.c.store,
            )

            def validate(task: TaskSpec, result: Payload) -> None:
                if task.round != statement.round:
                    raise Rejected(
                        f"signed for round {statement.round}, the task is of round {task.round}",
                        Reason.WRONG_ROUND,
                    )
                self.c.validate(task, result)

            task = self.board.submit(session, payload, validate)
        except WireError as e:
            return self._refuse(ident, session, payload, Reason.MALFORMED, str(e), counted)
        except Rejected as e:
            return self._refuse(ident, session, payload, e.reason, str(e), counted)
        self.c.store.site_result(ident.identity, True)
        log.info(
            "round %d: %s result from %s accepted (%.1f MB)",
            task.round,
            task.kind.value,
            ident.identity,
            counted.wire_bytes / 1e6,
        )
        return pb.UploadReply(accepted=True, bytes_received=counted.wire_bytes)

    def _refuse(
        self,
        ident: Identity,
        session: Session,
        payload: Payload | None,
        code: Reason,
        message: str,
        counted: StreamStats,
    ) -> pb.UploadReply:
        """Answer a refused upload with its typed reason; the site's task fails, the round
        carries on with the others."""
        reason = f"{code.value}: {message}"
        task_id = payload.task_id if payload is not None else ""
        log.warning("rejected result from %s (%s): %s", ident.identity, task_id or "-", reason)
        self.c.store.event(
            "rejected", site_id=ident.identity, reason=reason, code=code.value, task=task_id
        )
        self.c.store.site_result(ident.identity, False, reason)
        if code in INTEGRITY_REASONS:  # forged, replayed or misdirected: on the signed record
            self.c.privacy.audit(
                "update_refused",
                {"site": ident.identity, "task": task_id, "code": code.value, "reason": message},
            )
        if task_id:  # a no-op unless it is the site's open task, not yet accepted
            self.board.report_failure(session, task_id, reason)
        return pb.UploadReply(accepted=False, reason=reason, bytes_received=counted.wire_bytes)

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        ident = self._identity(context)
        session = self._session(request.session_id, ident, context)
        cancel = bool(request.task_id) and self.board.cancel_requested(session, request.task_id)
        return pb.HeartbeatReply(cancel_task=cancel)

    def ReportError(self, request: pb.SiteError, context: grpc.ServicerContext) -> pb.Ack:
        ident = self._identity(context)
        session = self._session(request.session_id, ident, context)
        task_id, message = untrusted(request.task_id, 200), untrusted(request.message)
        reason = f"{untrusted(request.code, 64)}: {message}"
        self.board.report_failure(session, request.task_id, reason)
        self.c.store.site_result(ident.identity, False, reason)
        self.c.store.event("site_error", site_id=ident.identity, task=task_id, reason=reason)
        if request.code == "BUDGET_EXHAUSTED" and self.c.privacy.enabled:
            self.c.privacy.audit(
                "site_refused_budget",
                {"site": ident.identity, "task": task_id, "message": message},
            )
        log.warning("site %s could not do %s: %s", ident.identity, task_id, reason)
        return pb.Ack()

    def GetAuditRecords(
        self, request: pb.AuditRecordsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AuditChunk]:
        """Read-only audit access: only `auditor` and `admin` certificates; nothing starts."""
        ident = self._identity(context, READER_ROLES)
        document = self.c.privacy.records(reader=f"{ident.role}:{ident.identity}")
        data = json.dumps(document, sort_keys=True).encode("utf-8")
        log.info("%s %s read the audit records (%d bytes)", ident.role, ident.identity, len(data))
        for start in range(0, len(data), AUDIT_CHUNK):
            yield pb.AuditChunk(data=data[start : start + AUDIT_CHUNK])


def _peer_certificate(context: grpc.ServicerContext) -> bytes:
    """The caller's mutual-TLS certificate (PEM), the one its uploads must be signed with."""
    certs = context.auth_context().get("x509_pem_cert") or [b""]
    return bytes(certs[0])


def untrusted(text: str, limit: int = 1000) -> str:
    """Text a site sent, fit for a log line and the store: control characters escaped (a
    newline cannot forge a log line) and cut at ``limit`` characters (a site cannot fill
    the coordinator's disk through its error messages)."""
    cut = text[:limit]
    safe = cut if cut.isprintable() else repr(cut)[1:-1]
    return safe + (f"... ({len(text) - limit} more characters)" if len(text) > limit else "")


ServiceFactory = Callable[["Coordinator"], CoordinatorService]
