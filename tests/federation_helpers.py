"""Builders for end-to-end federation tests: PKI, configs, coordinator and site agents."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from confide.client.agent import SiteAgent, validate_site_config
from confide.demo import free_port
from confide.privacy.crypto import init_ca, issue, load_kit
from confide.server.config import FederationConfig
from confide.server.coordinator import Coordinator

FED = "testfed"
TESTS = Path(__file__).resolve().parent


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_tables(lines: list[str], prefix: str, doc: dict[str, Any]) -> None:
    for key, value in doc.items():
        if not isinstance(value, dict):
            lines.append(
                f'"{key}" = {_toml_value(value)}' if prefix else f"{key} = {_toml_value(value)}"
            )
    for key, value in doc.items():
        if isinstance(value, dict):
            name = f"{prefix}.{key}" if prefix else key
            lines.append(f"\n[{name}]")
            _toml_tables(lines, name, value)


def write_toml(path: Path, doc: dict[str, Any]) -> Path:
    """Write a TOML document; nested dicts become (sub-)tables such as [dp.example]."""
    lines: list[str] = []
    _toml_tables(lines, "", doc)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Federation:
    root: Path
    port: int
    doc: dict[str, Any]
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def toml(self) -> Path:
        return write_toml(self.root / "federation.toml", self.doc)

    def config(self) -> FederationConfig:
        return FederationConfig.load(self.toml)

    def kit(self, name: str) -> Path:
        return self.root / "kits" / name

    def site_doc(self, pid: int, num: int, **run_config: Any) -> dict[str, Any]:
        return {
            "app": "confide.client.apps:mnist_cnn",
            "node_config": {"partition-id": pid, "num-partitions": num},
            "run_config": {
                "model": "cnn-small",
                "max-samples-per-site": 300,
                "partition": "iid",
                **run_config,
            },
            "agent": {"poll_seconds": 1, "max_backoff_seconds": 1},
        }

    def agent(self, name: str, pid: int, num: int, app: Any = None, **run_config: Any) -> SiteAgent:
        cfg = validate_site_config(self.site_doc(pid, num, **run_config))
        return SiteAgent(load_kit(self.kit(name)), cfg, app=app)

    def start_agent(self, agent: SiteAgent, max_attempts: int = 40) -> threading.Thread:
        def run() -> None:
            try:
                agent.run(max_attempts=max_attempts)
            except BaseException as e:  # surfaced by the test
                self.errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def site_process(
        self,
        name: str,
        pid: int,
        num: int,
        *,
        app: str | None = None,
        hold_stage: int | None = None,
    ) -> subprocess.Popen[str]:
        """A real ``confide site start`` process (stdout and stderr merged, text).

        ``app``: a ClientApp spec importable from this folder (e.g.
        ``"federation_helpers:offset_client_app"``) instead of the MNIST app.
        ``hold_stage``: the process stops before sending its message of that
        secure-aggregation stage (see :func:`hold_secagg_upload`), for a test to kill it there.
        """
        doc = self.site_doc(pid, num)
        args = ["site", "start", "--kit", str(self.kit(name))]
        if app is not None:
            doc["app"] = app
            args += ["--app-dir", str(TESTS)]
        args += ["--config", str(write_toml(self.root / f"{name}.toml", doc))]
        if hold_stage is None:
            command = [sys.executable, "-m", "confide.cli", *args]
        else:
            bootstrap = (
                f"import sys; sys.path.insert(0, {str(TESTS)!r}); import federation_helpers; "
                f"federation_helpers.hold_secagg_upload({int(hold_stage)}); "
                "from confide.cli import main; sys.exit(main(sys.argv[1:]))"
            )
            command = [sys.executable, "-c", bootstrap, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    def coordinator_process(self) -> subprocess.Popen[str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "confide.cli",
                "coordinator",
                "start",
                "--config",
                str(self.toml),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )


def make_federation(
    root: Path,
    *,
    sites: tuple[str, ...] = ("site-1", "site-2"),
    others: tuple[tuple[str, str], ...] = (),
    rounds: int = 2,
    min_sites: int = 2,
    model: str = "cnn-small",
    max_attempts: int = 2,
    deadline: float = 120.0,
    expected: int = 0,
) -> Federation:
    port = free_port()
    init_ca(root / "pki", FED, coordinator_address=f"127.0.0.1:{port}")
    for name in sites:
        issue(root / "pki", name, "site", root / "kits" / name)
    for name, role in others:
        issue(root / "pki", name, role, root / "kits" / name)
    doc: dict[str, Any] = {
        "federation": {"name": FED, "model": model, "rounds": rounds, "seed": 0},
        "selection": {
            "min_sites": min_sites,
            "expected_sites": expected,
            "deadline_seconds": deadline,
            "wait_for_sites_seconds": 60,
            "max_attempts": max_attempts,
        },
        "evaluation": {"fraction": 1.0, "deadline_seconds": 60},
        "train": {"lr": 0.1, "local-epochs": 1, "batch-size": 10},
        "server": {
            "address": f"127.0.0.1:{port}",
            "coordinator_dir": "pki/coordinator",
            "state_dir": "state",
            "heartbeat_seconds": 1,
            "site_timeout_seconds": 4,
            "max_poll_seconds": 1,
        },
    }
    return Federation(root, port, doc)


@contextmanager
def running_coordinator(
    fed: Federation, *, start_with: int = 0, start_timeout: float = 120.0
) -> Iterator[tuple[Coordinator, list[int]]]:
    """A coordinator serving in this process, its run loop in a thread; always shut down.

    ``start_with``: the run loop starts once that many sites are connected (at most
    ``start_timeout`` seconds later), so that the rounds themselves can have a short
    ``selection.wait_for_sites_seconds`` (a retry after an aborted attempt).
    """
    coordinator = Coordinator(fed.config())
    coordinator.start()
    codes: list[int] = []

    def run() -> None:
        if start_with:
            coordinator.board.wait_for_sites(start_with, start_timeout, coordinator.stop_event)
        codes.append(coordinator.run())

    loop = threading.Thread(target=run, daemon=True)
    loop.start()
    try:
        yield coordinator, codes
    finally:
        coordinator.stop_event.set()
        loop.join(timeout=30)
        coordinator.shutdown()


OFFSET = 0.01  # site p adds (p + 1) * OFFSET to every floating parameter


def offset_app() -> ClientApp:
    """A deterministic 'training': site p returns global + (p+1)*OFFSET, 100*(p+1) examples."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = next(iter(msg.content.array_records.values())).to_numpy_ndarrays()
        out = [
            (a + np.float32((pid + 1) * OFFSET)).astype(a.dtype) if a.dtype.kind == "f" else a
            for a in arrays
        ]
        metrics = MetricRecord({"num-examples": 100 * (pid + 1), "train_loss": 1.0 + pid})
        return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 10, "eval_loss": 0.5, "eval_accuracy": 0.5})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


offset_client_app = offset_app()  # the spec "federation_helpers:offset_client_app"


def large_model() -> torch.nn.Module:
    """16 MiB of weights: more than HTTP/2 flow control lets through to a peer not reading."""
    return torch.nn.Linear(2048, 2048)


HOLD_MARK = "TEST HOLD:"


def hold_secagg_upload(stage: int, seconds: float = 300.0) -> None:
    """Make this process's site agents stop just before sending their message of secure-
    aggregation ``stage`` (1: the training result, which carries the keys): print
    ``HOLD_MARK`` and wait there (heartbeats go on), so a test can kill the process inside
    that stage. Only the timing changes; what the agent computes and sends does not."""
    from confide import wire
    from confide.protos.v1 import coordinator_pb2 as pb

    upload = SiteAgent._upload

    def held(self: SiteAgent, task: pb.Task, payload: wire.Payload) -> None:
        config = wire.decode_records(task.config)
        at = 1 if task.kind == pb.Task.TRAIN else config.get("secagg.stage")
        if "secagg.site" in config and at == stage:
            print(f"{HOLD_MARK} round {task.round} stage {stage}", flush=True)
            time.sleep(seconds)
        upload(self, task, payload)

    SiteAgent._upload = held  # type: ignore[method-assign]


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    """Read ``proc``'s output (in a thread, to its end) until a line holds ``needle``; the
    lines so far. After ``timeout`` seconds the process is killed and the test fails with
    its last lines."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if needle in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        proc.kill()
        raise AssertionError(f"{needle!r} not seen in {timeout} s:\n" + "".join(lines[-30:]))
    return lines


def wait_for(cond: Any, timeout: float, what: str) -> None:
    """Poll ``cond()`` every 0.2 s; fail the test naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
