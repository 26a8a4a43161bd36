"""The site agent against a scripted coordinator: real gRPC, real mutual TLS, loopback only."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from confide import wire
from confide.client.agent import (
    AgentSettings,
    CoordinatorUnreachable,
    SiteAgent,
    SiteConfig,
    SiteRefused,
    configure_logging,
    load_app,
    load_site_config,
    node_id_for,
)
from confide.client.agent_cli import add_site_parser
from confide.client.models import build_model, get_weights
from confide.errors import ConfigError
from confide.privacy.crypto import Kit, init_ca, issue, load_coordinator, load_kit
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.protos.v1 import coordinator_pb2_grpc as pb_grpc

FED = "agent-test"
BOUND = 20.0  # no single wait in this file lasts longer
TRAIN, EVALUATE, WAIT, STOP = pb.Task.TRAIN, pb.Task.EVALUATE, pb.Task.WAIT, pb.Task.STOP


# --------------------------------------------------------------------------- PKI and model


@dataclass(frozen=True)
class Pki:
    kit: Kit
    coordinator_dir: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "pki", FED)
    kit_dir = issue(root / "pki", "hospital-a", "site")
    return Pki(load_kit(kit_dir), root / "pki" / "coordinator")


@pytest.fixture(scope="module")
def model() -> wire.Payload:
    net = build_model("seq-lstm")
    return wire.Payload("model", list(net.state_dict().keys()), get_weights(net))


# --------------------------------------------------------------------------- coordinator double


@dataclass
class Script:
    """What the coordinator double does; everything it saw is recorded on it."""

    tasks: list[pb.Task] = field(default_factory=list)
    model: wire.Payload | None = None
    join_error: grpc.StatusCode | None = None
    pull_not_found_once: bool = False
    cancel_on_heartbeat: bool = False
    long_poll: bool = False
    chunk_bytes: int = 4096
    heartbeat_seconds: float = 0.2
    joins: list[pb.JoinRequest] = field(default_factory=list)
    pulls: int = 0
    uploads: list[wire.Payload] = field(default_factory=list)
    errors: list[pb.SiteError] = field(default_factory=list)
    heartbeats: list[pb.HeartbeatRequest] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    closing: threading.Event = field(default_factory=threading.Event)


class Coordinator(pb_grpc.CoordinatorServicer):  # type: ignore[misc]
    def __init__(self, script: Script) -> None:
        self.s = script
        self.lock = threading.Lock()

    def _check(self, session_id: str, context: grpc.ServicerContext) -> None:
        if session_id != self.s.sessions[-1]:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown session")

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.s.joins.append(request)
        if self.s.join_error is not None:
            context.abort(self.s.join_error, "certificate serial 1234 is revoked")
        session = f"s{len(self.s.joins)}"
        self.s.sessions.append(session)
        return pb.JoinReply(
            protocol_version=PROTOCOL_VERSION,
            federation=FED,
            site_id="hospital-a",
            session_id=session,
            heartbeat_seconds=self.s.heartbeat_seconds,
            chunk_bytes=self.s.chunk_bytes,
        )

    def PullTask(self, request: pb.PullTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self._check(request.session_id, context)
        with self.lock:
            self.s.pulls += 1
            if self.s.pull_not_found_once:
                self.s.pull_not_found_once = False
                context.abort(grpc.StatusCode.NOT_FOUND, "session expired (coordinator restart)")
            if self.s.long_poll:
                task = None
            else:
                task = self.s.tasks.pop(0) if self.s.tasks else pb.Task(kind=STOP)
        if task is None:
            self.s.closing.wait(min(request.wait_seconds, BOUND))
            return pb.Task(kind=WAIT)
        return task

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        self._check(request.session_id, context)
        assert self.s.model is not None
        yield from wire.encode(self.s.model, 1024)

    def UploadResult(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        payload = wire.decode(request_iterator, max_bytes=64 * 2**20)
        self.s.uploads.append(payload)
        return pb.UploadReply(accepted=True, bytes_received=payload.nbytes)

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        self.s.heartbeats.append(request)
        return pb.HeartbeatReply(cancel_task=self.s.cancel_on_heartbeat)

    def ReportError(self, request: pb.SiteError, context: grpc.ServicerContext) -> pb.Ack:
        self.s.errors.append(request)
        return pb.Ack()


def _serve(pki: Pki, script: Script, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_CoordinatorServicer_to_server(Coordinator(script), server)
    creds = load_coordinator(pki.coordinator_dir).server_credentials()
    bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    return server, bound


def _stop(server: grpc.Server | None, script: Script) -> None:
    script.closing.set()
    if server is not None:
        server.stop(None).wait(BOUND)


@pytest.fixture
def coordinator(pki: Pki) -> Iterator[Callable[[Script], int]]:
    """Start a coordinator double for a script; returns its port; stopped after the test."""
    started: list[tuple[grpc.Server, Script]] = []

    def start(script: Script) -> int:
        server, port = _serve(pki, script)
        started.append((server, script))
        return port

    try:
        yield start
    finally:
        for server, script in started:
            _stop(server, script)


def _task(kind: int, n: int, **config: Any) -> pb.Task:
    return pb.Task(
        task_id=f"t{n}",
        kind=kind,  # type: ignore[arg-type]
        round=1,
        model_id="m1",
        config=wire.encode_records(config),
    )


def _config(port: int, **agent: Any) -> SiteConfig:
    return SiteConfig(
        app="confide.client.apps:credit_lstm",
        coordinator=f"127.0.0.1:{port}",
        node_config={"partition-id": 0, "num-partitions": 3},
        run_config={"max-samples-per-site": 64},
        agent=AgentSettings(**{"poll_seconds": 2, "max_backoff_seconds": 1, **agent}),
    )


def _run(agent: SiteAgent, max_attempts: int | None = 5) -> int:
    """agent.run() on a thread, bounded: a hung agent fails the test instead of CI."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["code"] = agent.run(max_attempts=max_attempts)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(BOUND)
    if t.is_alive():
        agent.stop()
        t.join(5)
        pytest.fail("agent.run() did not return in time")
    if "error" in out:
        raise out["error"]
    return int(out["code"])


def _app(train: Callable[[Message], Message] | None = None) -> ClientApp:
    """A ClientApp whose train handler is ``train`` and whose evaluate always answers."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        assert train is not None
        return train(msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"eval_accuracy": 0.5, "num-examples": 3})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


# --------------------------------------------------------------------------- the round trip


def test_site_trains_evaluates_and_stops_over_mutual_tls(
    pki: Pki, model: wire.Payload, coordinator: Callable[[Script], int]
) -> None:
    script = Script(
        tasks=[_task(TRAIN, 1, **{"max-steps": 2}), _task(EVALUATE, 2)],
        model=model,
    )
    port = coordinator(script)
    agent = SiteAgent(pki.kit, _config(port))
    assert _run(agent) == 0

    assert len(script.joins) == 1 and script.joins[0].protocol_version == PROTOCOL_VERSION
    assert script.errors == []
    trained, evaluated = script.uploads
    assert trained.task_id == "t1" and trained.names == model.names
    assert [a.shape for a in trained.arrays] == [a.shape for a in model.arrays]
    assert any(not np.array_equal(a, b) for a, b in zip(trained.arrays, model.arrays, strict=True))
    assert trained.metrics["num-examples"] == 64 and isinstance(
        trained.metrics["num-examples"], int
    )
    assert isinstance(trained.metrics["train_loss"], float)
    assert evaluated.task_id == "t2" and evaluated.arrays == []
    assert 0.0 <= float(evaluated.metrics["eval_accuracy"]) <= 1.0
    assert script.pulls == 3  # train, evaluate, stop


def test_the_app_receives_the_task_config_round_and_a_lasting_context(
    pki: Pki, model: wire.Payload, coordinator: Callable[[Script], int]
) -> None:
    seen: list[tuple[dict[str, Any], int, str]] = []
    contexts: list[Context] = []
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        contexts.append(context)
        config = dict(msg.content.config_records["config"])
        seen.append((config, context.node_id, msg.metadata.group_id))
        context.state.metric_records["calls"] = MetricRecord({"n": len(contexts)})
        arrays = msg.content.array_records["arrays"]
        reply = RecordDict({"a": arrays, "m": MetricRecord({"num-examples": 5.0, "x": 1})})
        return Message(reply, reply_to=msg)

    script = Script(tasks=[_task(TRAIN, 1, lr=0.1), _task(TRAIN, 2)], model=model)
    port = coordinator(script)
    assert _run(SiteAgent(pki.kit, _config(port), app=app)) == 0

    assert seen[0] == ({"lr": 0.1, "server-round": 1}, node_id_for("hospital-a"), "1")
    assert contexts[0] is contexts[1]  # one Context, and its state, for the agent's lifetime
    assert contexts[0].node_config == {"partition-id": 0, "num-partitions": 3}
    assert [u.metrics for u in script.uploads] == [{"num-examples": 5, "x": 1}] * 2
    assert all(
        np.array_equal(a, b) for a, b in zip(script.uploads[0].arrays, model.arrays, strict=True)
    )


# --------------------------------------------------------------------------- failures


def test_permission_denied_at_join_is_fatal_without_retrying(
    pki: Pki, coordinator: Callable[[Script], int]
) -> None:
    script = Script(join_error=grpc.StatusCode.PERMISSION_DENIED)
    port = coordinator(script)
    agent = SiteAgent(pki.kit, _config(port), app=_app())
    with pytest.raises(SiteRefused, match=r"revoked.*Fix:") as e:
        _run(agent, max_attempts=5)
    assert e.value.code == "PERMISSION_DENIED"
    assert len(script.joins) == 1


def test_protocol_mismatch_at_join_is_fatal(pki: Pki, coordinator: Callable[[Script], int]) -> None:
    port = coordinator(Script(join_error=grpc.StatusCode.FAILED_PRECONDITION))
    with pytest.raises(SiteRefused, match="protocol"):
        _run(SiteAgent(pki.kit, _config(port), app=_app()))


def test_agent_retries_until_the_coordinator_starts(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Script()  # STOP at the first poll
    server: grpc.Server | None = None
    agent = SiteAgent(pki.kit, _config(port), app=_app())
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("code", agent.run(max_attempts=20)), daemon=True
    )
    try:
        with caplog.at_level(logging.INFO, logger="confide.site"):
            worker.start()
            time.sleep(1.2)
            server, _ = _serve(pki, script, port)
            worker.join(BOUND)
    finally:
        agent.stop()
        _stop(server, script)
    assert result.get("code") == 0
    retries = [r for r in caplog.records if getattr(r, "event", "") == "reconnecting"]
    assert retries and "UNAVAILABLE" in retries[0].getMessage()
    assert len(script.joins) == 1


def test_unreachable_coordinator_gives_up_after_max_attempts(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = SiteAgent(pki.kit, _config(port, max_backoff_seconds=0.1), app=_app())
    with pytest.raises(CoordinatorUnreachable, match="after 3 attempt"):
        _run(agent, max_attempts=3)


def test_a_failing_app_is_reported_and_the_agent_carries_on(
    pki: Pki, model: wire.Payload, coordinator: Callable[[Script], int]
) -> None:
    def train(msg: Message) -> Message:
        if msg.metadata.message_id == "t1":
            raise RuntimeError("patient 4711 has a malformed record")
        return Message(Error(code=3, reason="out of memory"), reply_to=msg)

    script = Script(tasks=[_task(TRAIN, 1), _task(TRAIN, 2), _task(EVALUATE, 3)], model=model)
    port = coordinator(script)
    assert _run(SiteAgent(pki.kit, _config(port), app=_app(train))) == 0

    assert [(e.task_id, e.code) for e in script.errors] == [
        ("t1", "TASK_FAILED"),
        ("t2", "TASK_FAILED"),
    ]
    assert "RuntimeError" in script.errors[0].message
    assert "4711" not in script.errors[0].message  # the exception text stays on the site
    assert "out of memory" in script.errors[1].message
    assert [u.task_id for u in script.uploads] == ["t3"]
    assert script.uploads[0].metrics == {"eval_accuracy": 0.5, "num-examples": 3}


def test_a_result_that_does_not_fit_the_model_is_reported_not_uploaded(
    pki: Pki, model: wire.Payload, coordinator: Callable[[Script], int]
) -> None:
    def train(msg: Message) -> Message:
        return Message(RecordDict({"m": MetricRecord({"num-examples": 1})}), reply_to=msg)

    script = Script(tasks=[_task(TRAIN, 1)], model=model)
    port = coordinator(script)
    assert _run(SiteAgent(pki.kit, _config(port), app=_app(train))) == 0
    assert script.uploads == [] and "no arrays" in script.errors[0].message


def test_an_oversized_model_is_refused(
    pki: Pki, model: wire.Payload, coordinator: Callable[[Script], int]
) -> None:
    script = Script(tasks=[_task(TRAIN, 1)], model=model)
    port = coordinator(script)
    agent = SiteAgent(pki.kit, _config(port, max_model_mb=0.01), app=_app())
    assert _run(agent) == 0
    assert script.errors[0].code == "MODEL_REJECTED" and "limit" in script.errors[0].message
    assert script.uploads == []


def test_a_lost_session_makes_the_agent_join_again(
    pki: Pki, model: wire.Payload, coordinator: Callable[[Script], int]
) -> None:
    script = Script(tasks=[_task(EVALUATE, 1)], model=model, pull_not_found_once=True)
    port = coordinator(script)
    assert _run(SiteAgent(pki.kit, _config(port), app=_app())) == 0
    assert len(script.joins) == 2
    assert [u.task_id for u in script.uploads] == ["t1"]


def test_heartbeats_flow_while_training_and_a_cancel_skips_the_upload(
    pki: Pki, model: wire.Payload, coordinator: Callable[[Script], int]
) -> None:
    def train(msg: Message) -> Message:
        time.sleep(0.7)
        arrays = msg.content.array_records["arrays"]
        return Message(RecordDict({"arrays": arrays}), reply_to=msg)

    script = Script(
        tasks=[_task(TRAIN, 1)], model=model, heartbeat_seconds=0.1, cancel_on_heartbeat=True
    )
    port = coordinator(script)
    assert _run(SiteAgent(pki.kit, _config(port), app=_app(train))) == 0
    assert script.heartbeats and script.heartbeats[0].task_id == "t1"
    assert script.heartbeats[0].session_id == "s1"
    assert {h.status for h in script.heartbeats} <= {"downloading", "training"}
    assert script.uploads == [] and script.errors == []


def test_stop_ends_a_long_poll_promptly(pki: Pki, coordinator: Callable[[Script], int]) -> None:
    script = Script(long_poll=True)
    port = coordinator(script)
    agent = SiteAgent(pki.kit, _config(port, poll_seconds=30), app=_app())
    threading.Timer(0.5, agent.stop, args=(143,)).start()
    started = time.monotonic()
    assert _run(agent) == 143
    assert time.monotonic() - started < 15  # not the 30 s poll: stop cut it short


# --------------------------------------------------------------------------- configuration


def test_site_toml_is_read_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        'app = "confide.client.apps:credit_lstm"\n'
        "[node_config]\npartition-id = 1\nnum-partitions = 3\n"
        '[run_config]\npartition = "dirichlet:0.5"\nseed = 0\n'
        "[agent]\npoll_seconds = 5\nlog_json = true\n"
    )
    cfg = load_site_config(path)
    assert cfg.node_config == {"partition-id": 1, "num-partitions": 3}
    assert cfg.run_config == {"partition": "dirichlet:0.5", "seed": 0}
    assert cfg.agent.poll_seconds == 5 and cfg.agent.log_json and cfg.coordinator is None
    assert load_site_config(path, coordinator="10.0.0.5:50051").coordinator == "10.0.0.5:50051"

    path.write_text("[agent]\npoll_seconds = -1\n")
    with pytest.raises(ConfigError, match=r"agent\.poll_seconds.*Fix:") as e:
        load_site_config(path)
    assert e.value.field == "agent.poll_seconds"

    path.write_text("[agent]\npoll = 5\n")
    with pytest.raises(ConfigError, match="unknown setting") as e:
        load_site_config(path)
    assert e.value.field == "agent.poll"

    path.write_text('app = "no colon here"\n')
    with pytest.raises(ConfigError, match="module:attribute") as e:
        load_site_config(path)
    assert e.value.field == "app"

    path.write_text("[run_config]\nnested = { a = 1 }\n")
    with pytest.raises(ConfigError) as e:
        load_site_config(path)
    assert e.value.field.startswith("run_config")

    path.write_text("")
    with pytest.raises(ConfigError) as e:
        load_site_config(path, coordinator="no-port")
    assert e.value.field == "--coordinator"


def test_bad_app_specs_name_the_app_field(tmp_path: Path) -> None:
    for spec, problem in (
        ("confide.client.no_such_module:app", "no module named"),
        ("confide.client.apps:no_such_app", "no attribute"),
        ("confide.client.apps:NUM_EXAMPLES", "not a flwr.clientapp.ClientApp"),
        ("apps", "module:attribute"),
    ):
        with pytest.raises(ConfigError, match=problem) as e:
            load_app(spec)
        assert e.value.field == "app"


def test_app_dir_loads_a_users_own_module(tmp_path: Path) -> None:
    (tmp_path / "my_site_app_for_agent_test.py").write_text(
        "from flwr.clientapp import ClientApp\napp = ClientApp()\n"
    )
    assert isinstance(load_app("my_site_app_for_agent_test:app", app_dir=tmp_path), ClientApp)
    with pytest.raises(ConfigError) as e:
        load_app("x:app", app_dir=tmp_path / "missing")
    assert e.value.field == "--app-dir"


def test_a_non_site_kit_is_refused_before_connecting(tmp_path: Path, pki: Pki) -> None:
    auditor = load_kit(issue(pki.coordinator_dir.parent, "auditor-1", "auditor"))
    with pytest.raises(ConfigError, match="--role site"):
        SiteAgent(auditor, SiteConfig(), app=_app())


def test_json_log_lines_carry_event_and_fields() -> None:
    stream = io.StringIO()
    handler = configure_logging(True, stream=stream)
    try:
        logging.getLogger("confide.site").info(
            "hello", extra={"event": "joined", "fields": {"site": "hospital-a"}}
        )
    finally:
        logging.getLogger("confide.site").removeHandler(handler)
        logging.getLogger("confide.site").propagate = True
    line = json.loads(stream.getvalue())
    assert line["event"] == "joined" and line["level"] == "info"
    assert line["fields"] == {"site": "hospital-a"} and line["message"] == "hello"
    assert line["ts"].endswith("+00:00")


def test_cli_parses_site_start() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="confide")
    add_site_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["site", "start", "--kit", "k", "--config", "s.toml", "--coordinator", "h:1"]
    )
    assert args.kit == Path("k") and args.config == Path("s.toml")
    assert args.coordinator == "h:1" and args.app_dir is None and callable(args.func)
