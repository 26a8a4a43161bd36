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
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from confide.client.agent import SiteAgent, validate_site_config
from confide.demo import free_port
from confide.privacy.crypto import init_ca, issue, load_kit
from confide.server.config import FederationConfig
from confide.server.coordinator import Coordinator

FED = "testfed"


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

    def site_process(self, name: str, pid: int, num: int) -> subprocess.Popen[str]:
        cfg = write_toml(self.root / f"{name}.toml", self.site_doc(pid, num))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "confide.cli",
                "site",
                "start",
                "--kit",
                str(self.kit(name)),
                "--config",
                str(cfg),
            ],
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
def running_coordinator(fed: Federation) -> Iterator[tuple[Coordinator, list[int]]]:
    """A coordinator serving in this process, its run loop in a thread; always shut down."""
    coordinator = Coordinator(fed.config())
    coordinator.start()
    codes: list[int] = []
    loop = threading.Thread(target=lambda: codes.append(coordinator.run()), daemon=True)
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


def wait_for(cond: Any, timeout: float, what: str) -> None:
    """Poll ``cond()`` every 0.2 s; fail the test naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
