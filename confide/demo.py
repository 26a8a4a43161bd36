"""`confide demo`: a real federation on this machine, a coordinator and three site processes.

Everything a real deployment has is here, on loopback: a federation CA and startup
kits, a coordinator serving mutual TLS on a free port, three separate site processes
(MNIST CNN, Dirichlet label split) that connect out to it. Every child process is
stopped on success, failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from confide.errors import ConfideError, ConfigError

FEDERATION = "demo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pump(prefix: str, stream: IO[str], log_file: Path, show: bool) -> None:
    with log_file.open("a") as log:
        for line in stream:
            log.write(line)
            log.flush()
            if show:
                print(f"{prefix} {line}", end="", flush=True)


def write_configs(
    out: Path,
    *,
    sites: int,
    rounds: int,
    port: int,
    data_dir: Path | None,
    samples: int,
    model: str,
    secure_aggregation: bool = False,
    train: dict[str, float | int] | None = None,
    extra_toml: str = "",
    federation: str = FEDERATION,
    partition: str = "dirichlet:0.5",
    site_extra_toml: str = "",
) -> tuple[Path, list[Path]]:
    """PKI, kits and the TOML files of a local federation under ``out``.

    ``train`` replaces the ``[train]`` table sent to the sites' ClientApps; ``extra_toml``
    is appended to ``federation.toml`` (e.g. a ``[dp]`` section) and ``site_extra_toml``
    to every site file (e.g. a ``[privacy]`` budget).
    """
    from confide.privacy.crypto import init_ca, issue

    address = f"127.0.0.1:{port}"
    init_ca(out / "pki", federation, coordinator_address=address)
    train = train or {"lr": 0.05, "local-epochs": 1, "batch-size": 10}
    train_lines = "\n".join(f'"{k}" = {v!r}' for k, v in train.items())
    fed = out / "federation.toml"
    secure = 'secure_aggregation = "secagg+"   # the coordinator learns only the sum\n'
    min_sites = max(3, sites - 1) if secure_aggregation else max(1, sites - 1)
    fed.write_text(
        f"""# The demo federation: {sites} sites, {rounds} rounds of FedAvg on the MNIST CNN.
[federation]
name = "{federation}"
model = "{model}"
rounds = {rounds}
strategy = "fedavg"
seed = 0
{secure if secure_aggregation else ""}
[selection]
min_sites = {min_sites}      # a round still counts if one site drops out
expected_sites = {sites}  # wait for everyone before the first round
fraction = 1.0
deadline_seconds = 300
wait_for_sites_seconds = 120

[evaluation]
fraction = 1.0

[train]          # sent to every site's ClientApp as its Flower ConfigRecord
{train_lines}

[server]
address = "{address}"
coordinator_dir = "pki/coordinator"
state_dir = "state"
chunk_mb = 4
heartbeat_seconds = 2
site_timeout_seconds = 30
max_poll_seconds = 5
{extra_toml}"""
    )
    site_files = []
    for i in range(sites):
        name = f"site-{i + 1}"
        issue(out / "pki", name, "site", out / "kits" / name)
        data_line = f'data-dir = "{data_dir}"\n' if data_dir else ""
        cfg = out / f"{name}.toml"
        cfg.write_text(
            f"""# Site {name}: the built-in MNIST CNN app on its part of a {partition} split.
app = "confide.client.apps:mnist_cnn"

[node_config]
partition-id = {i}
num-partitions = {sites}

[run_config]
{data_line}partition = "{partition}"
seed = 0
max-samples-per-site = {samples}
model = "{model}"

[agent]
poll_seconds = 5
{site_extra_toml}"""
        )
        site_files.append(cfg)
    return fed, site_files


def run_demo(
    out: Path,
    *,
    sites: int = 3,
    rounds: int = 3,
    samples: int = 2000,
    model: str = "cnn",
    data_dir: Path | None = None,
    timeout: float = 900.0,
    verbose_sites: bool = False,
    secure_aggregation: bool = False,
) -> int:
    """Run the demo federation; returns the coordinator's exit code."""
    out = out.resolve()  # the children run inside `out`, so every path must be absolute
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    port = free_port()
    if secure_aggregation and sites < 3:
        raise ConfigError("--sites", "secure aggregation needs at least 3 sites", "use --sites 3")
    fed, site_files = write_configs(
        out,
        sites=sites,
        rounds=rounds,
        port=port,
        data_dir=data_dir,
        samples=samples,
        model=model,
        secure_aggregation=secure_aggregation,
    )
    print(
        f"federation {FEDERATION!r}: coordinator on 127.0.0.1:{port}, "
        f"{sites} sites, {rounds} rounds"
        + (", secure aggregation (SecAgg+)" if secure_aggregation else "")
    )
    print(f"  CA and kits:  {out / 'pki'} , {out / 'kits'}")
    code = run_local(out, fed, site_files, timeout=timeout, show_sites=verbose_sites)
    _summary(out, code)
    return code


def run_local(
    out: Path,
    federation_toml: Path,
    site_files: Sequence[Path],
    *,
    timeout: float = 900.0,
    show_coordinator: bool = True,
    show_sites: bool = False,
    threads_per_site: int = 1,
) -> int:
    """Run a coordinator and one process per site file (kits in ``out/kits/site-N``).

    Output goes to ``out/logs``; children run inside ``out`` and are stopped on success,
    failure, timeout or Ctrl-C (exit code 130). Returns the coordinator's exit code.
    """
    env = dict(os.environ)
    # Several trainers share the cores: one thread each avoids oversubscription stalls.
    env.setdefault("OMP_NUM_THREADS", str(threads_per_site))
    env["PYTHONUNBUFFERED"] = "1"
    cli = [sys.executable, "-m", "confide.cli"]
    procs: list[tuple[str, subprocess.Popen[str]]] = []
    threads: list[threading.Thread] = []

    def spawn(name: str, args: list[str], show: bool) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            cli + args,
            cwd=out,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert p.stdout is not None
        t = threading.Thread(
            target=_pump,
            args=(f"[{name}]", p.stdout, out / "logs" / f"{name}.log", show),
            daemon=True,
        )
        t.start()
        procs.append((name, p))
        threads.append(t)
        return p

    code = 1
    try:
        coordinator = spawn(
            "coordinator",
            ["coordinator", "start", "--config", str(federation_toml)],
            show_coordinator,
        )
        for i, cfg in enumerate(site_files):
            name = f"site-{i + 1}"
            spawn(
                name,
                ["site", "start", "--kit", str(out / "kits" / name), "--config", str(cfg)],
                show_sites,
            )
        end = time.monotonic() + timeout
        reported: set[str] = set()
        while coordinator.poll() is None:
            if time.monotonic() > end:
                raise ConfideError(
                    f"the federation did not finish within {timeout:.0f} s; see {out / 'logs'}. "
                    "Fix: allow more time, or read the logs for a site that stopped"
                )
            for name, p in procs[1:]:
                if p.poll() not in (None, 0) and name not in reported:
                    reported.add(name)
                    print(
                        f"[local] {name} exited with code {p.returncode}; "
                        f"see {out / 'logs' / (name + '.log')}"
                    )
            time.sleep(0.5)
        code = coordinator.returncode
        for _, p in procs[1:]:  # sites stop by themselves when told the federation is over
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=20)
    except KeyboardInterrupt:
        print("\n[local] interrupted: stopping every process")
        code = 130
    finally:
        _stop_all([p for _, p in procs])
        for t in threads:
            t.join(timeout=2)
    return code


def _stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


def _summary(out: Path, code: int) -> None:
    from confide.server.history import History

    history_path = out / "state" / "history.json"
    print()
    if history_path.exists():
        history = History.load(history_path)
        for r in history.rounds:
            acc = f"{100 * r.eval_accuracy:.1f}%" if r.eval_accuracy is not None else "-"
            who = (
                "initial model" if r.round == 0 else f"{r.sites_succeeded}/{r.sites_selected} sites"
            )
            print(f"round {r.round}: {who}, federated eval accuracy {acc}, {r.seconds:.1f} s")
    print("demo " + ("finished" if code == 0 else f"failed (exit {code})"))
    print(f"  state database: {out / 'state' / 'state.db'}")
    print(f"  history, plot:  {history_path} , {out / 'state' / 'metrics.png'}")
    print(f"  logs:           {out / 'logs'}")
    print(f"  kits:           {out / 'kits'}")
    print(f"  status:         confide coordinator status --config {out / 'federation.toml'}")
