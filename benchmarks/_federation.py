"""Shared by the benchmarks that run a real federation on loopback (transport.py, load.py).

A federation CA and site kits made by the project's own PKI (``init_ca`` / ``issue``),
the coordinator's configuration, the 1M / 10M-parameter models, a ClientApp that trains
nothing, and real :class:`SiteAgent` objects in threads, either of the calling process
(:class:`AgentThreads`) or of a few helper processes (:class:`AgentProcs`; each runs this
file, ``python _federation.py SPEC.json``, and prints a JSON summary). The agents' own
timing events (``downloaded`` / ``trained`` / ``uploaded`` ...) are collected by
:class:`AgentLog`. Only light imports at the top: the transport benchmark's throughput
client process imports this module and needs neither torch nor flwr.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

if __name__ == "__main__":  # a helper process: the repository's modules come first
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confide.privacy.crypto import init_ca, issue, load_kit

FED = "bench"
HERE = Path(__file__).resolve().parent
ECHO_APP = "_federation:echo_app"
DELTA_APP = "_federation:delta_app"


# --------------------------------------------------------------------------- models, app


def linear_1m() -> Any:
    """1,001,000 float32 parameters (4.0 MB)."""
    from torch import nn

    return nn.Linear(1000, 1000)


def linear_10m() -> Any:
    """10,001,000 float32 parameters (40.0 MB)."""
    from torch import nn

    return nn.Linear(10_000, 1000)


MODEL_1M = "_federation:linear_1m"
MODEL_10M = "_federation:linear_10m"


_apps: dict[str, Any] = {}
_apps_lock = threading.Lock()


def echo_app() -> Any:
    """A Flower ClientApp that trains nothing: it echoes the arrays, with num-examples = 1."""
    return _synthetic_app(offset=False)


def delta_app() -> Any:
    """No training either: site p returns the global model + (1 + p mod 7) * 1e-3 on every
    float parameter, with num-examples = 10 + p (a real, site-dependent update)."""
    return _synthetic_app(offset=True)


def _synthetic_app(offset: bool) -> Any:
    import numpy as np
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        arrays = next(iter(msg.content.array_records.values()))
        examples = 1
        if offset:
            pid = int(context.node_config["partition-id"])
            step, examples = np.float32(1e-3 * (1 + pid % 7)), 10 + pid
            arrays = ArrayRecord(
                [a + step if a.dtype.kind == "f" else a for a in arrays.to_numpy_ndarrays()]
            )
        reply = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples})})
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 1, "eval_loss": 0.0, "eval_accuracy": 0.0})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def client_app(spec: str) -> Any:
    """The ClientApp made by the factory ``module:function`` (made once per process)."""
    with _apps_lock:
        if spec not in _apps:
            module, _, attr = spec.partition(":")
            _apps[spec] = getattr(importlib.import_module(module), attr)()
        return _apps[spec]


# --------------------------------------------------------------------------- PKI, config


def make_pki(root: Path, sites: int) -> tuple[Path, list[Path]]:
    """A federation CA in ``root``, the coordinator's folder and ``sites`` site kits."""
    init_ca(root, FED)
    kits = [issue(root, f"site-{i:03d}", "site") for i in range(sites)]
    return root / "coordinator", kits


def federation_doc(
    coordinator_dir: Path,
    state_dir: Path,
    *,
    model: str,
    sites: int,
    rounds: int,
    eval_fraction: float,
    long_lived: bool = False,
    address: str = "127.0.0.1:0",
) -> dict[str, Any]:
    """The ``federation.toml`` of a benchmark federation, as a dict (FedAvg, one attempt)."""
    deadline = 3600.0 if long_lived else 120.0
    return {
        "federation": {"name": FED, "model": model, "rounds": rounds, "seed": 0},
        "selection": {
            "min_sites": sites,
            "fraction": 1.0,
            "deadline_seconds": deadline,
            "max_attempts": 1,
            "wait_for_sites_seconds": 180.0,
        },
        "evaluation": {"fraction": eval_fraction, "deadline_seconds": deadline},
        "server": {
            "address": address,
            "coordinator_dir": coordinator_dir,
            "state_dir": state_dir,
            "chunk_mb": 4.0,
            "heartbeat_seconds": 1.0,
            "site_timeout_seconds": deadline if long_lived else 30.0,
            "max_poll_seconds": 2.0,
        },
    }


def federation_config(coordinator_dir: Path, state_dir: Path, **kw: Any) -> Any:
    """:func:`federation_doc`, validated as the coordinator's ``FederationConfig``."""
    from confide.server.config import FederationConfig

    return FederationConfig(**federation_doc(coordinator_dir, state_dir, **kw))


# --------------------------------------------------------------------------- site agents


class AgentLog(logging.Handler):
    """Collects the agents' own per-task timings (their `downloaded`/`uploaded`/... events).

    ``uploads`` holds one ``[kind, seconds, bytes]`` per upload; kind is ``train`` or
    ``evaluate``, or ``secagg-N`` when the task was SecAgg+ stage N (stage 1 is the train
    task's upload of public keys).
    """

    EVENTS: ClassVar[dict[str, str]] = {
        "downloaded": "download",
        "trained": "app",
        "evaluated": "app",
        "uploaded": "upload",
    }

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.timings: dict[str, list[float]] = {v: [] for v in self.EVENTS.values()}
        self.uploads: list[list[Any]] = []
        self.problems: list[str] = []
        self.late_cancels = 0
        self._kinds: dict[str, str] = {}  # task id -> what the task was, until its upload
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", "")
        fields = getattr(record, "fields", {})
        with self._guard:
            if event in self.EVENTS and "seconds" in fields:
                self.timings[self.EVENTS[event]].append(float(fields["seconds"]))
            task = fields.get("task_id")
            if task is not None:
                if event in ("trained", "evaluated"):
                    self._kinds[task] = "train" if event == "trained" else "evaluate"
                elif event == "secagg" and "stage" in fields:
                    self._kinds[task] = f"secagg-{int(fields['stage'])}"
                elif event == "uploaded" and "seconds" in fields:
                    kind = self._kinds.pop(task, "?")
                    self.uploads.append([kind, float(fields["seconds"]), fields.get("bytes", 0)])
            if event == "cancelled":  # a heartbeat answered after the phase closed: benign
                self.late_cancels += 1
            elif record.levelno >= logging.WARNING or event == "rejected":
                self.problems.append(f"{event}: {record.getMessage()}")

    def install(self) -> None:
        logger = logging.getLogger("confide.site")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(self)

    def uninstall(self) -> None:
        logging.getLogger("confide.site").removeHandler(self)


class AgentThreads:
    """SiteAgents, each in a thread; bounded waits, always stoppable."""

    def __init__(
        self,
        kit_dirs: Sequence[Path],
        address: str,
        partitions: Sequence[int],
        total: int,
        app: str = ECHO_APP,
    ):
        from confide.client.agent import AgentSettings, SiteAgent, SiteConfig

        self.agents = [
            SiteAgent(
                load_kit(k),
                SiteConfig(
                    app=app,
                    coordinator=address,
                    node_config={"partition-id": pid, "num-partitions": total},
                    agent=AgentSettings(
                        poll_seconds=2.0, max_backoff_seconds=2.0, transfer_timeout_seconds=120.0
                    ),
                ),
                app=client_app(app),
            )
            for k, pid in zip(kit_dirs, partitions, strict=True)
        ]
        self.codes: list[Any] = [None] * len(self.agents)
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(len(self.agents)):
            t = threading.Thread(target=self._run, args=(i,), name=f"bench-site-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, i: int) -> None:
        try:
            self.codes[i] = self.agents[i].run(max_attempts=5)
        except Exception as e:
            self.codes[i] = f"{type(e).__name__}: {e}"

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def stop(self) -> None:
        for a in self.agents:
            a.stop(0)
        self.wait(10.0)


class _Terminated(Exception):
    pass


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


class ThreadProfiles:
    """cProfile (CPU time per thread) of every thread started while installed, merged.

    ``skip``: thread-name prefixes left unprofiled (the transport benchmark profiles the
    coordinator and skips in-process site agents; an agent host profiles everything).
    """

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        self.profiles: list[Any] = []
        self._skip = skip
        self._lock = threading.Lock()

    def _boot(self, frame: Any, event: str, arg: Any) -> None:
        import cProfile

        sys.setprofile(None)
        if self._skip and threading.current_thread().name.startswith(self._skip):
            return
        p = cProfile.Profile(time.thread_time)
        with self._lock:
            self.profiles.append(p)
        p.enable()

    def install(self) -> None:
        threading.setprofile(self._boot)

    def uninstall(self) -> None:
        threading.setprofile(None)

    def stats(self) -> Any:
        """The merged ``pstats.Stats`` (None before any thread was profiled)."""
        import pstats

        with self._lock:
            profiles = list(self.profiles)
        if not profiles:
            return None
        stats = pstats.Stats(profiles[0])
        for p in profiles[1:]:
            stats.add(p)
        return stats


def agent_host(spec_path: str) -> int:
    """Helper process: runs a group of SiteAgents in threads, prints a JSON summary.

    SIGTERM (the driver ending a run early) stops the agents; the summary is still printed.
    """
    spec = json.loads(Path(spec_path).read_text())
    log = AgentLog()
    log.install()
    agents = AgentThreads(
        [Path(k) for k in spec["kits"]],
        spec["address"],
        spec["partitions"],
        spec["total"],
        spec.get("app", ECHO_APP),
    )
    cpu_start = time.process_time()  # after the imports and kit loading
    profile_to = os.environ.get("CONFIDE_BENCH_AGENT_PROFILE")
    profiles = ThreadProfiles() if profile_to else None
    if profiles is not None:
        profiles.install()
    signal.signal(signal.SIGTERM, _terminated)
    finished = False
    try:
        agents.start()
        finished = agents.wait(spec["deadline"])
    except _Terminated:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not finished:
        agents.stop()
    if profiles is not None and profile_to:
        profiles.uninstall()
        if (stats := profiles.stats()) is not None:
            stats.dump_stats(str(Path(profile_to) / f"agents-{os.getpid()}.pstats"))
    print(
        json.dumps(
            {
                "finished": finished,
                "codes": agents.codes,
                "timings": log.timings,
                "uploads": log.uploads,
                "problems": log.problems[:20],
                "late_cancels": log.late_cancels,
                "cpu_seconds": time.process_time() - cpu_start,
            }
        ),
        flush=True,
    )
    return 0


class HelperProcs:
    """Helper processes, one per JSON spec (``command`` + the spec's path), started and
    always ended by us; each prints a JSON summary as the last line of its output."""

    def __init__(
        self,
        command: Sequence[str],
        specs: Sequence[tuple[Path, dict[str, Any]]],
        missing: dict[str, Any],
    ) -> None:
        self.command = list(command)
        self.missing = missing  # the summary of a helper that printed none
        self.specs = []
        for path, spec in specs:
            path.write_text(json.dumps(spec))
            self.specs.append(path)
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for spec in self.specs:
            out = spec.with_suffix(".out")
            with out.open("wb") as stdout, spec.with_suffix(".err").open("wb") as stderr:
                p = subprocess.Popen(
                    [*self.command, str(spec)],
                    stdout=stdout,
                    stderr=stderr,
                    env=env,
                    start_new_session=True,
                )
            self.procs.append((p, out))

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for p, _ in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, end - time.monotonic()))
        return all(p.poll() is not None for p, _ in self.procs)

    def stop(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.terminate()
        for p, _ in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def results(self) -> list[dict[str, Any]]:
        out = []
        for _, path in self.procs:
            lines = path.read_text().strip().splitlines()
            out.append(json.loads(lines[-1]) if lines else dict(self.missing))
        return out

    def stderr_tails(self, chars: int = 500) -> list[str]:
        return [out.with_suffix(".err").read_text()[-chars:] for _, out in self.procs]


class AgentProcs(HelperProcs):
    """SiteAgents spread over a few helper processes (:func:`agent_host`)."""

    def __init__(
        self,
        kit_dirs: Sequence[Path],
        address: str,
        procs: int,
        tmp: Path,
        deadline: float,
        app: str = ECHO_APP,
    ):
        groups = [list(range(i, len(kit_dirs), procs)) for i in range(procs)]
        specs = [
            (
                tmp / f"agents-{g}.json",
                {
                    "kits": [str(kit_dirs[i]) for i in idx],
                    "partitions": idx,
                    "total": len(kit_dirs),
                    "address": address,
                    "deadline": deadline,
                    "app": app,
                },
            )
            for g, idx in enumerate(g for g in groups if g)
        ]
        super().__init__(
            [sys.executable, str(Path(__file__).resolve())],
            specs,
            missing={"finished": False, "codes": []},
        )


# --------------------------------------------------------------------------- environment


def background() -> list[str]:
    """Other busy processes on the machine (a concurrent benchmark skews every figure)."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.splitlines()[1:]
    except (OSError, subprocess.TimeoutExpired):
        return []
    mine = {os.getpid()}
    busy = []
    for line in out:
        parts = line.split(None, 3)
        if len(parts) < 4 or int(parts[0]) in mine or "ps -eo" in parts[3]:
            continue
        if float(parts[1]) >= 10.0:
            busy.append(f"pid {parts[0]} {parts[1]}% cpu, up {parts[2]}: {parts[3][:110]}")
    return busy


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def print_environment(
    load_before: str, load_after: str, busy_before: list[str], busy_after: list[str]
) -> None:
    print(f"load average before {load_before}, after {load_after} ({os.cpu_count()} cores)")
    for line in sorted(set(busy_before + busy_after)):
        print(f"  also running: {line}")


if __name__ == "__main__":
    sys.exit(agent_host(sys.argv[1]))
