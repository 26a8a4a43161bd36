"""Live round state shared by the gRPC handlers and the coordinator loop.

The coordinator loop *publishes* a phase (train or evaluate tasks for chosen sites)
and waits; handler threads deliver tasks to long-polling sites and hand back results.
A phase closes when the target number of results is in (over-selection), when every
task is resolved, or at its deadline, whichever comes first. Everything here is
guarded by one condition variable; no handler ever blocks the loop.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from confide.wire import Payload, ScalarValue


class Kind(str, Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    SECAGG = "secagg"  # a secure-aggregation stage of the round's training


@dataclass(frozen=True)
class TaskSpec:
    """One unit of work for one site."""

    task_id: str
    site_id: str
    kind: Kind
    round: int
    model_id: str
    config: dict[str, ScalarValue]
    deadline: float


@dataclass
class Session:
    """A joined site: its identity, liveness and queue of tasks."""

    session_id: str
    site_id: str
    serial: int
    last_seen: float
    queue: deque[TaskSpec] = field(default_factory=deque)
    stopped: bool = False


@dataclass
class Phase:
    """The open train or evaluate phase of a round."""

    kind: Kind
    round: int
    model_id: str
    tasks: dict[str, TaskSpec]
    target: int
    deadline: float
    results: dict[str, Payload] = field(default_factory=dict)  # by site
    failures: dict[str, str] = field(default_factory=dict)  # by site
    closed: bool = False

    def resolved(self) -> int:
        return len(self.results) + len(self.failures)


class Reason(str, Enum):
    """Why the coordinator refused an upload: the first word of ``UploadReply.reason``."""

    MALFORMED = "MALFORMED"  # the stream breaks the wire contract (order, sizes, digest)
    UNSIGNED = "UNSIGNED"  # no signature, or no valid update statement in the manifest
    BAD_SIGNATURE = "BAD_SIGNATURE"  # not signed by the caller's certificate key, or altered
    WRONG_FEDERATION = "WRONG_FEDERATION"  # signed for another federation
    WRONG_SITE = "WRONG_SITE"  # the statement names a site other than the certificate's
    WRONG_ROUND = "WRONG_ROUND"  # signed for another round than the one running
    REPLAYED = "REPLAYED"  # this site's nonce was used before
    UNKNOWN_TASK = "UNKNOWN_TASK"  # no such task in the open phase, or another site's
    LATE = "LATE"  # the phase closed or its deadline passed
    DUPLICATE = "DUPLICATE"  # a result for the task was already accepted
    BAD_METRICS = "BAD_METRICS"  # num-examples missing or out of range, a metric not finite
    WRONG_SHAPE = "WRONG_SHAPE"  # arrays' number or shapes differ from the model's
    WRONG_DTYPE = "WRONG_DTYPE"  # an array's dtype is not of the model array's kind
    NOT_FINITE = "NOT_FINITE"  # NaN or infinity in the update
    NORM_ABOVE_CLIP = "NORM_ABOVE_CLIP"  # client-level DP: the update exceeds the round's C
    BAD_DP_EVENTS = "BAD_DP_EVENTS"  # a DP round's ledger events missing or wrong
    BAD_SECAGG = "BAD_SECAGG"  # a secure-aggregation message the protocol refuses
    REJECTED = "REJECTED"  # anything else


class Rejected(Exception):
    """A result the coordinator will not use; the reason goes back to the site."""

    def __init__(self, message: str, reason: Reason = Reason.REJECTED) -> None:
        super().__init__(message)
        self.reason = reason


Validator = Callable[[TaskSpec, Payload], None]


class RoundBoard:
    """Sessions, task queues and the open phase, behind one lock."""

    def __init__(self, *, site_timeout: float) -> None:
        self.site_timeout = site_timeout
        self._cv = threading.Condition()
        self._sessions: dict[str, Session] = {}
        self._by_site: dict[str, str] = {}
        self._phase: Phase | None = None
        self._finished = False
        self._ids = itertools.count(1)

    # --- sessions ---------------------------------------------------------------------

    def join(self, site_id: str, serial: int) -> Session:
        """A site (re)joins: a fresh session; tasks of an old session of the site are failed."""
        with self._cv:
            old = self._by_site.pop(site_id, None)
            if old is not None:
                self._sessions.pop(old, None)
                self._fail_site_locked(site_id, "the site rejoined (it restarted or lost its link)")
            session = Session(uuid.uuid4().hex, site_id, serial, time.monotonic())
            self._sessions[session.session_id] = session
            self._by_site[site_id] = session.session_id
            self._cv.notify_all()
            return session

    def session(self, session_id: str, site_id: str) -> Session | None:
        """The session if it exists and belongs to ``site_id``; refreshes liveness."""
        with self._cv:
            s = self._sessions.get(session_id)
            if s is None or s.site_id != site_id:
                return None
            s.last_seen = time.monotonic()
            return s

    def session_for_site(self, site_id: str) -> Session | None:
        """The current session of a site (identity from its certificate); refreshes liveness."""
        with self._cv:
            sid = self._by_site.get(site_id)
            s = self._sessions.get(sid) if sid else None
            if s is not None:
                s.last_seen = time.monotonic()
            return s

    def connected(self) -> list[str]:
        """Sites heard from within the site timeout, sorted."""
        now = time.monotonic()
        with self._cv:
            return sorted(
                s.site_id for s in self._sessions.values() if now - s.last_seen <= self.site_timeout
            )

    def wait_for_sites(self, n: int, timeout: float, stop: threading.Event) -> list[str]:
        """Wait until at least ``n`` sites are connected (or timeout / stop); return them."""
        end = time.monotonic() + timeout
        while True:
            sites = self.connected()
            if len(sites) >= n or time.monotonic() >= end or stop.is_set():
                return sites
            with self._cv:
                self._cv.wait(timeout=min(0.5, max(0.0, end - time.monotonic())))

    # --- phases -----------------------------------------------------------------------

    def publish(
        self,
        kind: Kind,
        rnd: int,
        sites: Sequence[str],
        model_id: str,
        config: dict[str, ScalarValue],
        *,
        target: int,
        deadline_seconds: float,
        per_site: Mapping[str, Mapping[str, ScalarValue]] | None = None,
    ) -> Phase:
        """Open a phase: one task per site, closing after ``target`` results or the deadline.

        ``per_site`` adds site-specific entries to a task's config (secure aggregation).
        """
        deadline = time.time() + deadline_seconds
        with self._cv:
            tasks: dict[str, TaskSpec] = {}
            for site in sites:
                task = TaskSpec(
                    f"r{rnd}-{kind.value}-{next(self._ids)}",
                    site,
                    kind,
                    rnd,
                    model_id,
                    {**config, **(per_site or {}).get(site, {})},
                    deadline,
                )
                tasks[task.task_id] = task
                sid = self._by_site.get(site)
                if sid is not None:
                    self._sessions[sid].queue.append(task)
            phase = Phase(kind, rnd, model_id, tasks, min(target, len(tasks)), deadline)
            self._phase = phase
            for task in tasks.values():
                if task.site_id not in self._by_site:
                    phase.failures[task.site_id] = "not connected when the round started"
            self._cv.notify_all()
            return phase

    def wait_phase(self, phase: Phase, stop: threading.Event, *, tick: float = 0.5) -> Phase:
        """Block until the phase closes; drops silent sites so a dead site never holds a round."""
        with self._cv:
            while not phase.closed:
                if stop.is_set():
                    phase.closed = True
                    break
                now = time.time()
                if (
                    len(phase.results) >= phase.target
                    or phase.resolved() >= len(phase.tasks)
                    or now >= phase.deadline
                ):
                    phase.closed = True
                    break
                self._drop_silent_locked(phase)
                self._cv.wait(timeout=min(tick, max(0.01, phase.deadline - now)))
            for task in phase.tasks.values():
                if task.site_id not in phase.results and task.site_id not in phase.failures:
                    reason = "deadline passed" if time.time() >= phase.deadline else "not needed"
                    phase.failures[task.site_id] = reason
            for s in self._sessions.values():  # undelivered tasks of a closed phase are void
                s.queue = deque(t for t in s.queue if t.task_id not in phase.tasks)
            return phase

    def _drop_silent_locked(self, phase: Phase) -> None:
        now = time.monotonic()
        for task in phase.tasks.values():
            site = task.site_id
            if site in phase.results or site in phase.failures:
                continue
            sid = self._by_site.get(site)
            session = self._sessions.get(sid) if sid else None
            if session is None or now - session.last_seen > self.site_timeout:
                phase.failures[site] = "site went silent (no poll or heartbeat)"

    def _fail_site_locked(self, site_id: str, reason: str) -> None:
        phase = self._phase
        if phase is None or phase.closed:
            return
        if any(t.site_id == site_id for t in phase.tasks.values()) and site_id not in phase.results:
            phase.failures.setdefault(site_id, reason)

    # --- handler side -----------------------------------------------------------------

    def next_task(self, session: Session, wait: float) -> TaskSpec | bool | None:
        """Long poll: a task, None after ``wait`` seconds, or False when the federation is over."""
        end = time.monotonic() + wait
        with self._cv:
            while True:
                session.last_seen = time.monotonic()
                while session.queue:
                    task = session.queue.popleft()
                    if time.time() < task.deadline:
                        return task
                if self._finished:
                    session.stopped = True
                    return False
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(timeout=min(left, 1.0))

    def task_for(self, session: Session, task_id: str) -> TaskSpec:
        with self._cv:
            phase = self._phase
            task = phase.tasks.get(task_id) if phase else None
            if task is None or phase is None:
                raise Rejected(f"unknown task {task_id!r}", Reason.UNKNOWN_TASK)
            if task.site_id != session.site_id:
                raise Rejected(f"task {task_id} belongs to another site", Reason.UNKNOWN_TASK)
            if phase.closed:
                raise Rejected(
                    f"round {task.round} {task.kind.value} phase is already closed", Reason.LATE
                )
            return task

    def transfer_deadline(self) -> float | None:
        """Unix time after which no stream can serve the open phase (its deadline: a result
        after it is LATE); None when no phase is open."""
        with self._cv:
            phase = self._phase
            return None if phase is None or phase.closed else phase.deadline

    def current_round(self) -> int | None:
        """The round of the latest phase published (open or closed); None before any."""
        with self._cv:
            return None if self._phase is None else self._phase.round

    def submit(self, session: Session, payload: Payload, validate: Validator) -> TaskSpec:
        """Accept a site's result for the open phase, or raise :class:`Rejected`."""
        task = self.task_for(session, payload.task_id)
        # Validation runs outside the lock: scanning a large update takes a while.
        validate(task, payload)
        with self._cv:
            phase = self._phase
            if phase is None or phase.closed or payload.task_id not in phase.tasks:
                raise Rejected("the phase closed while the result was arriving", Reason.LATE)
            if time.time() > task.deadline:
                raise Rejected(f"deadline of round {task.round} passed", Reason.LATE)
            if session.site_id in phase.results:
                raise Rejected("a result for this task was already accepted", Reason.DUPLICATE)
            phase.failures.pop(session.site_id, None)
            phase.results[session.site_id] = payload
            self._cv.notify_all()
            return task

    def report_failure(self, session: Session, task_id: str, reason: str) -> None:
        with self._cv:
            phase = self._phase
            if phase is None or phase.closed:
                return
            task = phase.tasks.get(task_id)
            if (
                task is not None
                and task.site_id == session.site_id
                and session.site_id not in phase.results  # accepted already: a late extra
            ):
                phase.failures.setdefault(session.site_id, reason)
                self._cv.notify_all()

    def cancel_requested(self, session: Session, task_id: str) -> bool:
        """True when the site's work on ``task_id`` is no longer wanted."""
        with self._cv:
            phase = self._phase
            if phase is None or task_id not in phase.tasks:
                return True
            if session.site_id in phase.results:
                return False  # already delivered: nothing to cancel
            return phase.closed

    def finish(self) -> None:
        """The federation is over: every poll now answers STOP."""
        with self._cv:
            self._finished = True
            self._cv.notify_all()

    def all_stopped(self) -> bool:
        with self._cv:
            return all(s.stopped for s in self._sessions.values())

    def snapshot(self) -> dict[str, Any]:
        with self._cv:
            phase = self._phase
            return {
                "sessions": len(self._sessions),
                "phase": None
                if phase is None
                else {
                    "kind": phase.kind.value,
                    "round": phase.round,
                    "results": len(phase.results),
                    "failures": dict(phase.failures),
                    "closed": phase.closed,
                },
            }


def finite(arrays: Sequence[np.ndarray]) -> bool:
    """True when no array holds NaN or infinity (one vectorised pass per array)."""
    return all(bool(np.isfinite(a).all()) for a in arrays if np.issubdtype(a.dtype, np.floating))
