"""The wire-bytes model against the real frames, and the coordinator's traffic meter."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from federation_helpers import make_federation, offset_app, running_coordinator

from confide import wire
from confide.cli import main
from confide.client.agent import MAX_CHUNK_MB, SiteAgent, validate_site_config
from confide.privacy.crypto import load_kit
from confide.privacy.secagg.federated import SecAggSettings
from confide.protos.v1 import coordinator_pb2 as pb
from confide.rpc import GRPC_PREFIX_BYTES, CoordinatorClient, TrafficMeter, add_coordinator_service
from confide.server.coordinator import MIN_CHUNK_BYTES
from confide.sims import wirebytes
from confide.sims.wirebytes import (
    ArraySpec,
    model_arrays,
    round_traffic,
    stream_size,
    synthetic_arrays,
)


def _real_frames(
    specs: list[ArraySpec], chunk_bytes: int, **records: Any
) -> tuple[int, int, list[bytes]]:
    arrays = [np.ones(s.shape, dtype=np.dtype(s.dtype)) for s in specs]
    payload = wire.Payload(
        records.pop("task_id", ""),
        [s.name for s in specs],
        arrays,
        records.get("metrics", {}),
        records.get("config", {}),
    )
    out = list(wire.frames(payload, chunk_bytes))
    return sum(len(f) for f in out), len(out), out


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("chunk_bytes", [wire.DEFAULT_CHUNK_BYTES, 65_536, 10_007])
def test_built_in_model_stream_is_sized_to_the_byte(chunk_bytes: int) -> None:
    specs = model_arrays("cnn-small")
    records = {
        "task_id": "r12-train-345",
        "metrics": {wire.NUM_EXAMPLES: 300, "train_loss": 0.25, "train_accuracy": 0.9},
        "config": {"dp.events": "[]", "note": b"\x00\x01"},
    }
    frames_bytes, messages, _ = _real_frames(specs, chunk_bytes, **dict(records))
    size = stream_size(specs, chunk_bytes=chunk_bytes, **records)  # type: ignore[arg-type]
    assert (size.frames, size.messages) == (frames_bytes, messages)
    assert size.wire == frames_bytes + GRPC_PREFIX_BYTES * messages


def test_synthetic_model_across_many_odd_chunks_is_sized_to_the_byte() -> None:
    specs = [
        *synthetic_arrays(25_001),
        ArraySpec("bias", "<f8", (13,)),
        ArraySpec("steps", "<i8", ()),
        ArraySpec("empty", "<f4", (0, 3)),
        ArraySpec("mask", "|u1", (129,)),
    ]
    chunk = 12_345  # not a divisor of anything: chunks run across array boundaries
    frames_bytes, messages, frames = _real_frames(specs, chunk, task_id="m")
    assert messages > 8
    assert {len(f) for f in frames[1:-2]} == {wire.DATA_HEADER_BYTES + chunk}
    size = stream_size(specs, chunk_bytes=chunk, task_id="m")
    assert (size.frames, size.messages) == (frames_bytes, messages)


def test_metrics_only_stream_is_a_manifest_and_a_digest() -> None:
    metrics = {wire.NUM_EXAMPLES: 10, "eval_loss": 0.5, "eval_accuracy": 0.5}
    frames_bytes, messages, _ = _real_frames([], 1024, task_id="r1-evaluate-9", metrics=metrics)
    size = stream_size([], chunk_bytes=1024, task_id="r1-evaluate-9", metrics=metrics)
    assert messages == 2
    assert (size.frames, size.messages) == (frames_bytes, messages)


def test_chunk_limits_mirror_the_coordinator_and_the_agent() -> None:
    assert wirebytes.MIN_DOWNLOAD_CHUNK == MIN_CHUNK_BYTES
    assert wirebytes.MAX_UPLOAD_CHUNK == MAX_CHUNK_MB * 1024 * 1024


def test_model_arrays_match_the_state_dict_sent_as_float32() -> None:
    from confide.client.models import build_model, get_weights

    model = build_model("cnn-small")
    weights = get_weights(model)
    specs = model_arrays("cnn-small")
    assert [s.name for s in specs] == list(model.state_dict())
    assert [(s.dtype, s.shape) for s in specs] == [(w.dtype.str, w.shape) for w in weights]


# --------------------------------------------------------------------------- rounds


def test_round_costs_two_model_transfers_per_site_and_six_calls() -> None:
    specs = synthetic_arrays(1_000_000)
    r = round_traffic(specs, sites=4, chunk_bytes=1 << 20)
    model = stream_size(specs, chunk_bytes=1 << 20, task_id="r1-" + "0" * 12).wire
    assert r.messages_per_site == 6
    assert r.by_method["DownloadModel"][1] == 2 * model
    assert 4_000_000 < r.by_method["UploadResult"][0] < 4_010_000
    # Per-site figures are means: task ids differ by a digit between sites.
    assert r.down_total == pytest.approx(4 * sum(d for _, d in r.by_method.values()), abs=8)
    no_eval = round_traffic(specs, sites=4, chunk_bytes=1 << 20, evaluate=False)
    assert no_eval.messages_per_site == 3
    assert no_eval.down_per_site < r.down_per_site - model + 1000


def test_secagg_sends_a_uint32_vector_and_key_material_per_neighbour() -> None:
    specs = synthetic_arrays(100_000, "<f2")  # 2 bytes a parameter, 4 once masked
    plain = round_traffic(specs, sites=10, evaluate=False)
    plus = round_traffic(specs, sites=10, evaluate=False, secagg=SecAggSettings())
    full = round_traffic(specs, sites=10, evaluate=False, secagg=SecAggSettings(mode="full"))
    assert plus.messages_per_site == 3 + 3 * 2
    assert 2 * 100_000 < plain.up_per_site < 2 * 100_000 + 1_000
    vector = 4 * (100_000 + 1)
    assert vector < plus.up_per_site < vector + 4_000
    items = wirebytes.secagg_items()
    assert (items.advert, items.box, items.b_share, items.s_share) == (68, 140, 40, 72)
    # k = 2 ceil(log2 10) = 8 neighbours in SecAgg+, 9 in full SecAgg: one more advert
    # and box down, one more box and b-share up (the secagg.* lengths also grow).
    extra_down = full.down_per_site - plus.down_per_site
    assert extra_down == pytest.approx(items.advert + items.box + items.site_id, abs=8)
    extra_up = full.up_per_site - plus.up_per_site
    assert extra_up == pytest.approx(items.box + items.b_share, abs=8)
    dropped = round_traffic(
        specs, sites=10, evaluate=False, secagg=SecAggSettings(mode="full"), dropouts=2
    )
    assert dropped.by_method["UploadResult"][0] < full.by_method["UploadResult"][0]


def test_a_hundred_million_parameters_are_priced_without_their_bytes() -> None:
    r = round_traffic(synthetic_arrays(100_000_000), sites=1000, secagg=SecAggSettings())
    assert 2 * 400e6 < r.down_per_site < 2 * 400e6 * 1.001
    assert 400e6 < r.up_per_site < 400e6 * 1.001


# --------------------------------------------------------------------------- the meter


class _Servicer:
    """Answers every method with fixed messages; streams raw frames like the coordinator."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        return pb.JoinReply(site_id="site-1", session_id="s" * 32, chunk_bytes=4096)

    def PullTask(self, request: pb.PullTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        return pb.Task(kind=pb.Task.WAIT)

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        yield from self.frames

    def UploadResult(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        n = sum(len(f) for f in request_iterator)
        return pb.UploadReply(accepted=True, bytes_received=n)

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        return pb.HeartbeatReply(cancel_task=request.progress > 0.5)

    def ReportError(self, request: pb.SiteError, context: grpc.ServicerContext) -> pb.Ack:
        return pb.Ack()

    def GetAuditRecords(
        self, request: pb.AuditRecordsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AuditChunk]:
        yield pb.AuditChunk(data=b"{}")


def test_meter_counts_every_message_of_unary_and_streaming_calls_exactly() -> None:
    _, _, frames = _real_frames(synthetic_arrays(3000), 5000, task_id="m")
    meter = TrafficMeter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_coordinator_service(_Servicer(frames), server, meter)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    expected: dict[str, list[int]] = {}

    def note(method: str, up: list[bytes], down: list[bytes]) -> None:
        e = expected.setdefault(method, [0, 0, 0, 0])
        e[0] += sum(len(b) + 5 for b in up)
        e[1] += sum(len(b) + 5 for b in down)
        e[2] += len(up)
        e[3] += len(down)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = CoordinatorClient(channel)
            join = pb.JoinRequest(protocol_version=2, software="x", capabilities={"a": "b"})
            reply = client.Join(join, timeout=5)
            note("Join", [join.SerializeToString()], [reply.SerializeToString()])
            for progress in (0.0, 0.25, 0.75):
                beat = pb.HeartbeatRequest(session_id="s" * 32, task_id="t", progress=progress)
                answer = client.Heartbeat(beat, timeout=5)
                note("Heartbeat", [beat.SerializeToString()], [answer.SerializeToString()])
            poll = pb.PullTaskRequest(session_id="s" * 32, wait_seconds=1.5)
            task = client.PullTask(poll, timeout=5)
            note("PullTask", [poll.SerializeToString()], [task.SerializeToString()])
            error = pb.SiteError(session_id="s", task_id="t", code="X", message="m" * 300)
            ack = client.ReportError(error, timeout=5)
            note("ReportError", [error.SerializeToString()], [ack.SerializeToString()])
            fetch = pb.DownloadModelRequest(session_id="s" * 32, model_id="m")
            got = list(client.DownloadModel(fetch, timeout=5))
            assert got == frames
            note("DownloadModel", [fetch.SerializeToString()], got)
            up = client.UploadResult(iter(frames), timeout=5)
            note("UploadResult", frames, [up.SerializeToString()])
    finally:
        server.stop(None)
    reading = meter.snapshot()
    for method, (up_b, down_b, up_n, down_n) in expected.items():
        m = reading.methods[method]
        assert (m.up, m.down, m.up_messages, m.down_messages) == (up_b, down_b, up_n, down_n)
    assert reading.methods["GetAuditRecords"].up_messages == 0
    assert reading.up == sum(e[0] for e in expected.values())
    assert reading.messages == sum(e[2] + e[3] for e in expected.values())
    model = stream_size(synthetic_arrays(3000), chunk_bytes=5000, task_id="m")
    assert reading.methods["DownloadModel"].down == model.wire
    window = reading - meter.snapshot()
    assert window.up == window.down == window.messages == 0
    assert json.loads(json.dumps(reading.to_dict()))["by_method"]["Join"]["up_messages"] == 1


# --------------------------------------------------------------------------- a federation

EXAMPLES = 200  # 100 (p + 1) for p = 0, 1, 2: a 2-byte varint each, like 200
TRAIN: dict[str, wire.ScalarValue] = {"lr": 0.1, "local-epochs": 1, "batch-size": 10}
POLL = 30.0  # long polls never time out here: no WAIT replies in the rounds


def _federation(tmp_path: Path, secure: bool) -> dict[str, Any]:
    names = ("site-1", "site-2", "site-3")
    fed = make_federation(tmp_path, sites=names, rounds=2, min_sites=3, deadline=60, expected=3)
    fed.doc["train"] = dict(TRAIN)
    fed.doc["server"].update(
        {
            "chunk_mb": 0.0625,  # 64 KiB: the model (217 kB) goes in 4 chunks
            "heartbeat_seconds": 300,  # no heartbeats in a few seconds of rounds
            "max_poll_seconds": POLL,
            "site_timeout_seconds": 60,
        }
    )
    if secure:
        fed.doc["federation"]["secure_aggregation"] = "secagg+"
        fed.doc["secagg"] = {"stage_deadline_seconds": 30}
    with running_coordinator(fed) as (coordinator, codes):
        for i, name in enumerate(names):
            doc = fed.site_doc(i, 3)
            doc["agent"] = {"poll_seconds": POLL, "max_backoff_seconds": 1}
            agent = SiteAgent(load_kit(fed.kit(name)), validate_site_config(doc), app=offset_app())
            fed.start_agent(agent)
        end = time.monotonic() + 180
        while not codes and time.monotonic() < end:
            time.sleep(0.2)
        for t in fed.threads:
            t.join(timeout=20)
        meter = coordinator.meter.snapshot()
    assert codes == [0], fed.errors
    assert not fed.errors
    history = json.loads((tmp_path / "state" / "history.json").read_text())
    return {"history": history, "meter": meter, "toml": fed.toml}


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg+"])
def test_metered_round_bytes_match_the_model(
    tmp_path: Path, secure: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _federation(tmp_path, secure)
    rounds = {r["round"]: r for r in run["history"]["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    metered_total = sum(
        r["traffic"]["up_bytes"] + r["traffic"]["down_bytes"] for r in rounds.values()
    )
    # Every message falls in one round's window until the last; only the STOP replies follow.
    assert metered_total <= run["meter"].up + run["meter"].down
    for rnd in (1, 2):
        traffic = rounds[rnd]["traffic"]
        model = round_traffic(
            model_arrays("cnn-small"),
            sites=3,
            chunk_bytes=65_536,
            secagg=SecAggSettings(stage_deadline_seconds=30) if secure else None,
            train_config=TRAIN,
            train_metrics={"train_loss": 1.0},
            eval_metrics={"num-examples": 10, "eval_loss": 0.5, "eval_accuracy": 0.5},
            examples=EXAMPLES,
            round_number=rnd,
            poll_seconds=POLL,
        )
        by_method = traffic["by_method"]
        differences = {
            name: (
                m["up_bytes"] - 3 * model.by_method[name][0],
                m["down_bytes"] - 3 * model.by_method[name][1],
            )
            for name, m in by_method.items()
        }
        for direction, modelled in (("up", model.up_total), ("down", model.down_total)):
            metered = traffic[f"{direction}_bytes"]
            error = (metered - modelled) / modelled
            assert abs(error) < 0.005, (
                f"round {rnd} {direction}: metered {metered} B, modelled {modelled} B "
                f"({100 * error:+.4f} %); metered - modelled by method (up, down): {differences}"
            )
        assert by_method["DownloadModel"]["down_bytes"] == 3 * model.by_method["DownloadModel"][1]
        assert (
            by_method["UploadResult"]["up_messages"]
            == 3 * model.messages_by_method["UploadResult"][0]
        )
        assert "Heartbeat" not in by_method
    # The operator's view: `confide coordinator status` totals the same windows.
    capsys.readouterr()
    assert main(["coordinator", "status", "--config", str(run["toml"]), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["bytes_down"] == sum(r["traffic"]["down_bytes"] for r in rounds.values())
    assert status["bytes_up"] == sum(r["traffic"]["up_bytes"] for r in rounds.values())
    assert sorted(t["round"] for t in status["traffic"]) == [0, 1, 2]
