"""Faults of a site over real loopback mutual TLS: killed inside each secure-aggregation
stage, and a stream that stalls.

A killed site (SIGKILL: no goodbye) is a real ``confide site start`` process; the
coordinator learns it is gone only from its silence (``server.site_timeout_seconds``). The
process is held just before it sends its message of the stage (see
``federation_helpers.hold_secagg_upload``), so the kill lands inside that stage every time.
The surviving sites run in this process with the offset app, so the aggregate is checked
against the exact mean of the survivors' updates (docs/secure-aggregation.md, Dropouts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from federation_helpers import (
    HOLD_MARK,
    OFFSET,
    Federation,
    make_federation,
    offset_app,
    running_coordinator,
    wait_for,
    wait_for_line,
)

from confide.client.agent import SiteAgent
from confide.privacy.crypto import UpdateSigner, load_kit
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.rpc import CoordinatorClient
from confide.server.store import Store
from confide.wire import Payload, frames

APP = "federation_helpers:offset_client_app"
STAGE_DEADLINE = 30.0  # never reached: a killed site is noticed by its silence in ~4 s
SILENT = "site went silent (no poll or heartbeat)"


def _secure_federation(
    root: Path, n: int, *, min_sites: int = 3, max_attempts: int = 1, **secagg: Any
) -> Federation:
    names = tuple(f"site-{i + 1}" for i in range(n))
    fed = make_federation(
        root, sites=names, rounds=1, min_sites=min_sites, deadline=60, max_attempts=max_attempts
    )
    fed.doc["federation"]["secure_aggregation"] = "secagg+"
    fed.doc["secagg"] = {"stage_deadline_seconds": STAGE_DEADLINE, **secagg}
    fed.doc["evaluation"] = {"fraction": 0.0}
    # The first round starts when every site is in (running_coordinator's start_with); a
    # retry goes ahead with the sites still alive after this short wait.
    fed.doc["selection"]["wait_for_sites_seconds"] = 3
    return fed


def _run_with_victims(
    fed: Federation, n: int, victims: dict[int, int]
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Sites 1..n; partition p in ``victims`` is a site process killed in stage
    ``victims[p]``, the others are agents in this process. Initial and final weights, and
    the coordinator's exit codes."""
    procs = {
        p: fed.site_process(f"site-{p + 1}", p, n, app=APP, hold_stage=stage)
        for p, stage in victims.items()
    }
    agents: list[SiteAgent] = []
    try:
        with running_coordinator(fed, start_with=n) as (coordinator, codes):
            initial = [w.copy() for w in coordinator.weights]
            for p in range(n):
                if p not in victims:
                    agents.append(fed.agent(f"site-{p + 1}", p, n, app=offset_app()))
                    fed.start_agent(agents[-1])
            for p, proc in procs.items():
                wait_for_line(proc, f"{HOLD_MARK} round 1 stage {victims[p]}", 120)
                proc.kill()  # SIGKILL inside the stage
                assert proc.wait(timeout=10) == -9
            wait_for(lambda: codes, 120, "the coordinator's run to end")
            final = [w.copy() for w in coordinator.weights]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for agent in agents:
            agent.stop()
    return initial, final, codes


def _assert_mean_of(
    initial: list[np.ndarray], final: list[np.ndarray], pids: list[int], bound: float
) -> None:
    """final = initial + the example-weighted mean of the offset app's updates of ``pids``."""
    weights = [100 * (p + 1) for p in pids]
    step = sum((p + 1) * OFFSET * w for p, w in zip(pids, weights, strict=True)) / sum(weights)
    worst = 0.0
    for w0, w in zip(initial, final, strict=True):
        if w0.dtype.kind == "f":
            expect = w0.astype(np.float64) + step
            worst = max(worst, float(np.abs(w.astype(np.float64) - expect).max()))
    assert worst <= bound + 1e-6, (worst, bound)


def _store(fed: Federation) -> tuple[list[Any], list[dict[str, Any]], int | None]:
    store = Store(fed.root / "state")
    try:
        checkpoint = store.latest_checkpoint()
        return store.rounds(), store.events(), None if checkpoint is None else checkpoint.round
    finally:
        store.close()


# --------------------------------------------------------------------------- kills


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "survivors", "dropped", "failure"),
    [
        (1, [0, 1, 2], 0, f"secure aggregation: {SILENT}"),  # no keys: simply not in the round
        (2, [0, 1, 2], 0, f"secure aggregation: {SILENT}"),  # nobody masks with it
        (3, [0, 1, 2], 1, f"secure aggregation: {SILENT}"),  # its masks rebuilt from shares
        (4, [0, 1, 2, 3], 0, None),  # its masked input counts; the others unmask it
    ],
)
def test_a_site_killed_in_a_secure_aggregation_stage(
    tmp_path: Path, stage: int, survivors: list[int], dropped: int, failure: str | None
) -> None:
    """Four sites (k = 3, t = 2); site-4 is SIGKILLed inside ``stage``. The round completes
    in its first attempt, noticed by silence (never the stage deadline), with the
    survivors and dropouts docs/secure-aggregation.md gives for that stage, and the
    model moves by exactly the survivors' weighted mean, within the recorded bound."""
    fed = _secure_federation(tmp_path, 4)
    initial, final, codes = _run_with_victims(fed, 4, {3: stage})
    assert codes == [0]
    rounds, _events, checkpoint = _store(fed)
    assert [(r.round, r.attempt, r.status) for r in rounds] == [(1, 1, "ok")]
    assert rounds[0].selected == ["site-1", "site-2", "site-3", "site-4"]
    assert rounds[0].succeeded == [f"site-{p + 1}" for p in survivors]
    assert rounds[0].failures == ({} if failure is None else {"site-4": failure})
    assert checkpoint == 1
    record = json.loads((fed.root / "state" / "history.json").read_text())["rounds"][-1]
    info = record["secure_aggregation"]
    assert (info["neighbours"], info["threshold"]) == (3, 2)
    assert info["survivors"] == len(survivors) and info["dropped"] == dropped
    assert info["excluded"] == 0
    assert record["train_examples"] == sum(100 * (p + 1) for p in survivors)
    _assert_mean_of(initial, final, survivors, info["error_bound"])


@pytest.mark.slow
def test_fewer_survivors_than_t_abort_the_attempt_and_the_retry_starts_from_the_last_model(
    tmp_path: Path,
) -> None:
    """Five sites with t = k = 4; two are SIGKILLed after sharing keys, before their masked
    inputs. Three masked inputs are fewer than t: the attempt aborts (recorded as failed,
    the victims named, no model published). The retry, among the three live sites, moves
    the model from the last checkpoint by exactly their mean."""
    fed = _secure_federation(tmp_path, 5, max_attempts=2, threshold=1.0)
    initial, final, codes = _run_with_victims(fed, 5, {3: 3, 4: 3})
    assert codes == [0]
    rounds, events, checkpoint = _store(fed)
    assert [(r.round, r.attempt, r.status) for r in rounds] == [(1, 1, "failed"), (1, 2, "ok")]
    aborted, retry = rounds
    assert aborted.succeeded == [f"site-{i}" for i in range(1, 6)]  # all five trained
    assert aborted.failures == {
        "secure aggregation": "only 3 sites sent a valid masked input; the threshold is 4",
        "site-4": f"secure aggregation: {SILENT}",
        "site-5": f"secure aggregation: {SILENT}",
    }
    assert retry.selected == retry.succeeded == ["site-1", "site-2", "site-3"]
    assert retry.failures == {}
    assert checkpoint == 1
    assert [e["round"] for e in events if e["kind"] == "checkpoint"] == [1]  # one publication
    record = json.loads((fed.root / "state" / "history.json").read_text())["rounds"][-1]
    info = record["secure_aggregation"]
    assert (info["neighbours"], info["threshold"]) == (2, 2)  # the retry's own graph
    assert (info["survivors"], info["dropped"]) == (3, 0)
    # A partial or garbage aggregate from the aborted attempt would be off by ~OFFSET.
    _assert_mean_of(initial, final, [0, 1, 2], info["error_bound"])


@pytest.mark.slow
def test_fewer_trained_sites_than_min_sites_stop_the_federation_with_the_model_unchanged(
    tmp_path: Path,
) -> None:
    """Four sites, min_sites = 3, one attempt allowed; two are SIGKILLed in stage 1 (the
    training result that carries their keys). Two advertised sites cannot make a round:
    it is recorded as failed naming both, the federation stops with exit code 1 saying
    why, and neither the weights nor the checkpoint moved."""
    fed = _secure_federation(tmp_path, 4, max_attempts=1)
    initial, final, codes = _run_with_victims(fed, 4, {2: 1, 3: 1})
    assert codes == [1]
    rounds, events, checkpoint = _store(fed)
    assert [(r.round, r.attempt, r.status) for r in rounds] == [(1, 1, "failed")]
    assert rounds[0].succeeded == ["site-1", "site-2"]
    assert rounds[0].failures == {"site-3": SILENT, "site-4": SILENT}
    (aborted,) = [e for e in events if e["kind"] == "aborted"]
    assert "round 1 failed 1 times" in aborted["reason"]
    assert checkpoint == 0
    assert [e["round"] for e in events if e["kind"] == "checkpoint"] == []
    for w0, w in zip(initial, final, strict=True):
        np.testing.assert_array_equal(w0, w)
    history = fed.root / "state" / "history.json"  # written when a round completes
    assert not history.exists() or json.loads(history.read_text())["rounds"] == []


@pytest.mark.slow
def test_fewer_masked_inputs_than_min_sites_are_never_unmasked(tmp_path: Path) -> None:
    """Four sites, min_sites = 4 (t is 2); site-4 is SIGKILLed before its masked input.
    Three masked inputs satisfy the protocol's t but not min_sites: the coordinator aborts
    before asking for the unmasking shares, so a sum of fewer sites than the federation
    requires is never revealed; the attempt is recorded failed and the model is unchanged."""
    fed = _secure_federation(tmp_path, 4, min_sites=4)
    initial, final, codes = _run_with_victims(fed, 4, {3: 3})
    assert codes == [1]
    rounds, events, checkpoint = _store(fed)
    assert [(r.round, r.attempt, r.status) for r in rounds] == [(1, 1, "failed")]
    assert rounds[0].failures == {
        "secure aggregation": "only 3 sites sent a valid masked input; selection.min_sites "
        "is 4, so their sum is not unmasked",
        "site-4": f"secure aggregation: {SILENT}",
    }
    assert checkpoint == 0 and not [e for e in events if e["kind"] == "checkpoint"]
    for w0, w in zip(initial, final, strict=True):
        np.testing.assert_array_equal(w0, w)


# --------------------------------------------------------------------------- stalls


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.slow
@pytest.mark.parametrize("stream", ["download", "upload"])
def test_a_stalled_stream_is_cut_at_the_deadline_and_the_rounds_go_on(
    tmp_path: Path, stream: str
) -> None:
    """site-3 (its real certificate, raw gRPC, no deadline of its own) takes its training
    task and opens the model download without reading past the first frame, or starts its
    upload and stops sending after the first data frame; it keeps heartbeating, so only
    a deadline can end its task. Both rounds complete with site-1 and site-2, site-3
    failed by the phase deadline, and the coordinator cancels the stalled stream itself,
    which frees the server thread it held."""
    deadline = 4.0
    fed = make_federation(
        tmp_path,
        sites=("site-1", "site-2", "site-3"),
        rounds=2,
        min_sites=2,
        deadline=deadline,
        expected=3,
        model="federation_helpers:large_model",  # 16 MiB: more than the peer's windows
    )
    fed.doc["evaluation"] = {"fraction": 0.0}
    records = _Records()
    logging.getLogger("confide.coordinator").addHandler(records)
    kit = load_kit(fed.kit("site-3"))
    quit_ = threading.Event()  # ends the stalled site's heartbeats and its upload generator
    try:
        with (
            running_coordinator(fed) as (coordinator, codes),
            grpc.secure_channel(
                fed.address,
                kit.channel_credentials(),
                options=[("grpc.max_receive_message_length", 64 << 20)],
            ) as channel,
        ):
            stub = CoordinatorClient(channel)
            join = pb.JoinRequest(protocol_version=PROTOCOL_VERSION)
            session = stub.Join(join, timeout=10).session_id
            for i, name in enumerate(("site-1", "site-2")):
                fed.start_agent(fed.agent(name, i, 3, app=offset_app()))
            task = pb.Task()
            for _ in range(60):  # bounded: round 1 starts once the three sites are in
                task = stub.PullTask(pb.PullTaskRequest(session_id=session), timeout=10)
                if task.kind == pb.Task.TRAIN:
                    break
            assert task.kind == pb.Task.TRAIN and task.round == 1

            def heartbeats() -> None:
                beat = pb.HeartbeatRequest(session_id=session, task_id=task.task_id)
                while not quit_.wait(1.0):
                    with contextlib.suppress(grpc.RpcError):  # the coordinator is stopping
                        stub.Heartbeat(beat, timeout=5)

            threading.Thread(target=heartbeats, daemon=True).start()
            if stream == "download":
                request = pb.DownloadModelRequest(session_id=session, model_id=task.model_id)
                download = stub.DownloadModel(request)  # no deadline: only the server's
                next(download)  # the manifest; then it stops reading
            else:
                update = Payload(task.task_id, coordinator.names, coordinator.weights, {})
                signer = UpdateSigner.for_task(kit, task.round, task.task_id)

                def stalled() -> Iterator[bytes]:
                    sent = frames(update, 1 << 20, signer=signer)
                    yield next(sent)  # the manifest
                    yield next(sent)  # one MiB of data, then nothing more
                    quit_.wait(120)

                upload = stub.UploadResult.future(stalled())
            wait_for(lambda: codes, 90, "the two rounds")
            assert codes == [0]
            # The coordinator, not the stalled site, ended the stream.
            if stream == "download":
                with pytest.raises(grpc.RpcError) as cut:
                    for _ in download:  # what was buffered, then the cancellation
                        pass
                assert cut.value.code() == grpc.StatusCode.CANCELLED
            else:
                wait_for(upload.done, 30, "the stalled upload to be cut")
                assert upload.code() == grpc.StatusCode.CANCELLED
                assert not quit_.is_set()  # the site was still holding its stream open
            method = "DownloadModel" if stream == "download" else "UploadResult"
            assert any(f"{method} of site-3 cancelled" in line for line in records.lines)
    finally:
        quit_.set()
        logging.getLogger("confide.coordinator").removeHandler(records)
    rounds, _events, checkpoint = _store(fed)
    assert [(r.round, r.status) for r in rounds] == [(1, "ok"), (2, "ok")]
    for row in rounds:
        assert row.selected == ["site-1", "site-2", "site-3"]
        assert row.succeeded == ["site-1", "site-2"]
        assert row.failures == {"site-3": "deadline passed"}
    assert checkpoint == 2
