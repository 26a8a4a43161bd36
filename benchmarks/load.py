"""Load: 100 site agents against one coordinator, SecAgg+ on, over loopback mutual TLS; a soak.

Everything runs on 127.0.0.1 with real mutual TLS, made by the project's own PKI
(``init_ca`` / ``issue``) in a temporary folder; every wait has a timeout.

* The coordinator is its own process, as in a deployment: ``python -m confide.cli
  coordinator start --config federation.toml`` on a free port, FedAvg on a 1,001,000-
  parameter float32 model (``nn.Linear(1000, 1000)``, 4 MB), ``secure_aggregation =
  "secagg+"`` (the ``[secagg]`` defaults: k = 2 ceil(log2 N) neighbours, t about 2k/3),
  ``min_sites`` = every site, one attempt per round, no federated evaluation, the
  server's default thread pool (``server.workers`` = 64) unless ``--workers``. A thread of
  this script reads its ``/proc/<pid>/status`` every 0.5 s: VmRSS, and VmHWM (the peak,
  reset at each round's end through ``/proc/<pid>/clear_refs`` where allowed, so each
  round's own peak is known).
* The sites are real :class:`SiteAgent` objects, in threads of ``--agent-procs`` helper
  processes (``_federation.AgentProcs``, shared with transport.py), each running a light
  synthetic Flower ClientApp (``_federation.delta_app``: the global model plus a small
  deterministic offset per site, ``num-examples`` = 10 + partition id, no training).
* Upload latency: the agents' own ``uploaded`` events (wall seconds of one
  ``UploadResult`` call: the signed stream sent and the coordinator's reply, which comes
  after it has decoded and checked the whole upload). Under SecAgg+ the train task uploads
  only public keys (stage 1), stage 2 the key shares, stage 3 the masked 4 MB vector and
  stage 4 the unmasking shares; p50 / p95 / max over every upload of every round, and per
  stage.
* Rounds per minute: completed rounds / the span from the first round's start to the last
  one's end (the coordinator's ``state.db`` rows), x 60; also from the sum of the round
  records' ``seconds`` (``history.json``). A round completes when its row says ``ok`` at
  the first attempt and every site survived the secure aggregation.
* Soak (``--soak-minutes M``, 20 sites by default): rounds until M minutes have passed,
  then SIGTERM to the coordinator (it stops the round under way; the agents' reconnect
  attempts after it are not counted as problems). Memory growth is the median of the
  coordinator's per-round peak RSS over the last 20 rounds against the median over the 20
  rounds from round ``--warmup-rounds`` (30) on: glibc's heap fills with retained message
  buffers over the first 20-30 rounds and then stays, and one round's peak jitters by
  tens of MB (medians, not single rounds). To tell a leak from the allocator keeping
  freed 4 MB buffers (``confide.tuning``), also the least-squares slope of the per-round
  peaks over the second half of the rounds and the RSS floor (smallest sample) in the
  first and last third of the rounds after warm-up: a leak raises the floor too.
  (``confide.tuning`` caps glibc at two arenas; without it the 64 gRPC workers spread
  retained buffers over up to 8 per core.) Every round's checkpoint stays in the
  temporary state folder (4 MB a round; its size is in the JSON).

Targets: every round completes at 100 sites (5 rounds); soak memory growth < 10 % over 30
minutes at 20 sites. Rounds per minute, p95 upload latency and peak coordinator memory are
reported. On a 2-core machine the coordinator, 100 agents and their TLS all share two cores:
the times are an upper bound for a deployment where every site has its own machine.

    python benchmarks/load.py                                  # 100 sites, 5 rounds: minutes
    python benchmarks/load.py --soak-minutes 30 --sites 20     # the soak: 30 minutes
    python benchmarks/load.py --quick                          # smoke run (CI): < 90 s
    python benchmarks/load.py --json benchmarks/results/load.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from _federation import (
    DELTA_APP,
    HERE,
    MODEL_1M,
    AgentProcs,
    background,
    federation_doc,
    load_average,
    make_pki,
    print_environment,
)

COORDINATOR = [sys.executable, "-m", "confide.cli", "coordinator", "start"]
TARGET_GROWTH = 0.10  # soak: coordinator memory growth after warm-up
WARMUP_ROUNDS = 30  # glibc's heap fills up with retained buffers until about here
WINDOW = 20  # rounds whose median peak RSS is compared
SAMPLE_SECONDS = 0.5
STAGES = {
    "train": "train (no SecAgg)",
    "secagg-1": "train (stage 1: keys)",
    "secagg-2": "stage 2: shares",
    "secagg-3": "stage 3: masked input",
    "secagg-4": "stage 4: unmask",
}


# --------------------------------------------------------------------------- coordinator


def write_toml(path: Path, doc: dict[str, dict[str, Any]]) -> Path:
    """One ``[section]`` per key; values are numbers, booleans, strings or paths."""
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


class CoordinatorProcess:
    """``confide coordinator start`` in its own process; its memory sampled from a thread.

    ``samples`` holds ``(seconds since start, RSS MB, rounds completed)``; ``round_peak_mb``
    each completed round's peak RSS (VmHWM, reset at each round's end when the kernel
    allows, else the largest sample).
    """

    def __init__(self, config: Path, state_dir: Path, log: Path) -> None:
        self.config, self.state_dir, self.log = config, state_dir, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.samples: list[tuple[float, float, int]] = []
        self.round_peak_mb: dict[int, float] = {}
        self.round_floor_mb: dict[int, float] = {}  # the smallest RSS sample of each round
        self.peak_mb = 0.0
        self.hwm_resets = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="load-memory", daemon=True)
        self._t0 = 0.0

    def start(self) -> None:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*COORDINATOR, "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._t0 = time.monotonic()
        self._thread.start()

    def wait_listening(self, port: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited at start:\n{self.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the coordinator did not listen within {timeout:.0f} s")

    def rounds_done(self) -> int:
        try:
            rounds = json.loads((self.state_dir / "history.json").read_text())["rounds"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(1 for r in rounds if r["round"] >= 1)

    def _sample(self) -> None:
        assert self.proc is not None
        pid, done, mtime, round_max, round_min = self.proc.pid, 0, 0.0, 0.0, float("inf")
        history = self.state_dir / "history.json"
        while not self._stop.is_set() and self.proc.poll() is None:
            kb = _status_kb(pid)
            if "VmRSS" in kb:
                rss, hwm = kb["VmRSS"] / 1024, kb.get("VmHWM", 0) / 1024
                self.peak_mb = max(self.peak_mb, hwm, rss)
                round_max = max(round_max, hwm if self.hwm_resets else rss, rss)
                round_min = min(round_min, rss)
                with contextlib.suppress(OSError):
                    if history.stat().st_mtime != mtime:
                        mtime = history.stat().st_mtime
                        now = self.rounds_done()
                        for r in range(done + 1, now + 1):
                            self.round_peak_mb[r] = round_max
                            self.round_floor_mb[r] = round_min
                        if now > done:
                            done, round_max, round_min = now, rss, rss
                            self._reset_hwm(pid)
                self.samples.append((time.monotonic() - self._t0, rss, done))
            self._stop.wait(SAMPLE_SECONDS)

    def _reset_hwm(self, pid: int) -> None:
        if not self.hwm_resets:
            return
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS
        except OSError:
            self.hwm_resets = False  # per-round peaks then come from the 0.5 s samples

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.proc.wait(timeout=timeout)
        return None

    def stop(self) -> int | None:
        """SIGTERM (the coordinator stops its round and exits), then SIGKILL after 60 s."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            code = self.wait(60.0)
            if code is None:
                self.proc.kill()
                code = self.wait(10.0)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        return code

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""


# --------------------------------------------------------------------------- one run


def percentiles(xs: Sequence[float]) -> dict[str, float | int]:
    if not xs:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "max": float("nan")}
    a = np.asarray(xs, dtype=float)
    return {
        "n": len(xs),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
    }


def run_federation(
    *,
    label: str,
    sites: int,
    rounds: int,
    soak_seconds: float,
    agent_procs: int,
    workers: int | None,
    stage_deadline: float,
    warmup: int,
    tmp: Path,
) -> dict[str, Any]:
    from confide.demo import free_port
    from confide.server.config import FederationConfig
    from confide.server.store import Store

    work = tmp / label
    work.mkdir()
    t0 = time.perf_counter()
    coordinator_dir, kits = make_pki(work / "pki", sites)
    pki_s = time.perf_counter() - t0
    port = free_port()
    address = f"127.0.0.1:{port}"
    state_dir = work / "state"
    soak = soak_seconds > 0
    doc = federation_doc(
        coordinator_dir,
        state_dir,
        model=MODEL_1M,
        sites=sites,
        rounds=100_000 if soak else rounds,  # a soak ends by SIGTERM when its time is up
        eval_fraction=0.0,
        address=address,
    )
    doc["federation"]["secure_aggregation"] = "secagg+"
    doc["secagg"] = {"stage_deadline_seconds": stage_deadline}
    if workers is not None:
        doc["server"]["workers"] = workers
    FederationConfig(**doc)  # the file is checked here, not by a failing coordinator
    coordinator = CoordinatorProcess(
        write_toml(work / "federation.toml", doc), state_dir, work / "coordinator.log"
    )
    budget = soak_seconds + 300.0 if soak else 300.0 + 120.0 * rounds
    agents = AgentProcs(kits, address, agent_procs, work, deadline=budget, app=DELTA_APP)
    started = time.perf_counter()
    code: int | None = None
    try:
        coordinator.start()
        coordinator.wait_listening(port, 120.0)
        agents.start()
        if soak:
            end = time.monotonic() + soak_seconds
            while time.monotonic() < end and coordinator.wait(5.0) is None:
                pass
            code = coordinator.stop()
            agents.stop()
        else:
            code = coordinator.wait(budget)
            agents.wait(60.0)
    finally:
        agents.stop()
        stopped = coordinator.stop()
        code = stopped if code is None else code
    wall = time.perf_counter() - started

    history = []
    with contextlib.suppress(OSError, ValueError):
        history = json.loads((state_dir / "history.json").read_text())["rounds"]
    records = {r["round"]: r for r in history if r["round"] >= 1}
    with Store(state_dir) as store:
        rows = [r for r in store.rounds() if r.round >= 1]
    ok_rows = [r for r in rows if r.status == "ok"]
    survivors = {
        rnd: (r.get("secure_aggregation") or {}).get("survivors", 0) for rnd, r in records.items()
    }
    complete = [
        rnd
        for rnd, r in sorted(records.items())
        if r["sites_succeeded"] == sites and survivors[rnd] == sites
    ]
    span = (
        max(r.finished or r.started for r in ok_rows) - min(r.started for r in ok_rows)
        if ok_rows
        else 0.0
    )
    seconds = [records[r]["seconds"] for r in sorted(records)]

    codes: list[Any] = []
    problems: list[str] = []
    uploads: list[list[Any]] = []
    agent_cpu = 0.0
    for res in agents.results():
        codes += res.get("codes", [])
        problems += res.get("problems", [])
        uploads += res.get("uploads", [])
        agent_cpu += res.get("cpu_seconds", 0.0)
    by_kind = {
        kind: percentiles([s for k, s, _ in uploads if k == kind])
        for kind in sorted({k for k, _, _ in uploads})
    }
    every_round = (
        not soak
        and code == 0
        and sorted(complete) == list(range(1, rounds + 1))
        and len(rows) == rounds
        and all(r.status == "ok" and r.attempt == 1 for r in rows)
    )
    if soak:  # the round under way at SIGTERM is 'interrupted'; every other one must be ok
        every_round = (
            code in (0, 130)
            and bool(complete)
            and complete == list(range(1, len(complete) + 1))
            and all(r.status == "ok" for r in rows if r.round <= len(complete))
            and all(r.attempt == 1 for r in rows)
        )
    peaks = coordinator.round_peak_mb
    trend = memory_trend(peaks, coordinator.round_floor_mb, warmup) if soak else {}
    if soak:  # SIGTERM stops the round under way (late uploads are refused), and the agents
        # lose the coordinator: neither is a problem of the soak
        cut = f"round {len(complete) + 1}:"
        problems = [m for m in problems if "reconnecting:" not in m and cut not in m]
        rows_shown = [r for r in rows if r.round <= len(complete)]
    else:
        rows_shown = rows
    disk = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
    return {
        "label": label,
        "sites": sites,
        "agent_procs": agent_procs,
        "workers": workers,
        "stage_deadline_s": stage_deadline,
        "rounds_planned": None if soak else rounds,
        "soak_minutes": soak_seconds / 60 if soak else None,
        "rounds_completed": len(complete),
        "every_round_completed": every_round,
        "coordinator_exit_code": code,
        "round_rows": [
            {"round": r.round, "attempt": r.attempt, "status": r.status, "failures": r.failures}
            for r in rows_shown
            if r.status != "ok" or r.failures
        ][:10],
        "round_seconds": seconds,
        "survivors": [survivors[r] for r in sorted(survivors)],
        "rounds_per_minute": 60 * len(ok_rows) / span if span > 0 else float("nan"),
        "rounds_per_minute_records": 60 * len(seconds) / sum(seconds) if seconds else float("nan"),
        "upload_s": percentiles([s for _, s, _ in uploads]),
        "upload_s_by_kind": by_kind,
        "upload_array_bytes_by_kind": {  # the arrays only (stage 3: the masked vector)
            kind: int(np.median([b for k, _, b in uploads if k == kind])) for kind in by_kind
        },
        "coordinator_peak_rss_mb": coordinator.peak_mb,
        "round_peak_rss_mb": {str(r): peaks[r] for r in sorted(peaks)},
        "hwm_reset_per_round": coordinator.hwm_resets,
        "round_floor_rss_mb": {str(r): v for r, v in sorted(coordinator.round_floor_mb.items())},
        "warmup_rounds": warmup,
        **trend,
        "rss_samples": [[round(t, 1), round(m, 1), n] for t, m, n in coordinator.samples[::4]],
        # a soak ends the agents by SIGTERM after the coordinator has gone: not judged
        "agents_exit_ok": None if soak else all(c == 0 for c in codes) and len(codes) == sites,
        "agents_cpu_s": agent_cpu,
        "problems": problems[:10],
        "state_dir_mb": disk / 1e6,
        "pki_s": pki_s,
        "wall_s": wall,
        "coordinator_log_tail": "" if every_round else coordinator.tail(),
    }


def memory_trend(peaks: dict[int, float], floors: dict[int, float], warmup: int) -> dict[str, Any]:
    """Growth of the per-round peak RSS after warm-up: the median peak of the last
    ``WINDOW`` rounds against the median peak of the ``WINDOW`` rounds from round
    ``warmup`` on (medians: a single round's peak jitters by tens of MB). Also what tells
    a leak from the allocator keeping freed buffers: the slope of the peaks over the second
    half of the rounds, and the smallest RSS sample (the floor) early and late."""
    after = [r for r in sorted(peaks) if r >= warmup]
    if len(after) < 2:
        return {"memory_growth": None}
    window = min(WINDOW, len(after) // 2)
    early, final = after[:window], after[-window:]
    base = float(np.median([peaks[r] for r in early]))
    end = float(np.median([peaks[r] for r in final]))
    late = after[len(after) // 2 :]
    third = max(1, len(after) // 3)
    slope = None
    if len(late) >= 4:
        slope = 100 * float(np.polyfit(late, [peaks[r] for r in late], 1)[0])
    return {
        "rss_warmup_mb": base,
        "rss_end_mb": end,
        "growth_windows": [[early[0], early[-1]], [final[0], final[-1]]],
        "memory_growth": (end - base) / base,
        "rss_slope_mb_per_100_rounds_late": slope,
        "rss_floor_early_mb": min(floors[r] for r in after[:third]),
        "rss_floor_late_mb": min(floors[r] for r in after[-third:]),
    }


# --------------------------------------------------------------------------- main


def verdict(ok: bool | None) -> str:
    return "not run" if ok is None else ("met" if ok else "MISSED")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sites", type=int, default=None, help="default 100 (20 for the soak)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--soak-minutes", type=float, default=0.0, help="run the soak instead")
    p.add_argument("--agent-procs", type=int, default=4, help="helper processes for the sites")
    p.add_argument("--workers", type=int, default=None, help="server.workers (default: 64)")
    p.add_argument("--stage-deadline", type=float, default=120.0, help="[secagg] seconds")
    p.add_argument("--warmup-rounds", type=int, default=WARMUP_ROUNDS, help="soak warm-up")
    p.add_argument("--quick", action="store_true", help="smoke run: 6 sites, 2 rounds")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.sites, args.rounds, args.agent_procs, args.soak_minutes = 6, 2, 2, 0.0
    soak = args.soak_minutes > 0
    sites = args.sites or (20 if soak else 100)
    if sites < 3:
        p.error("SecAgg+ needs at least 3 sites")

    os.environ.setdefault("COLUMNS", "150")  # rich tables: wide enough when not on a TTY
    from _common import print_table, write_json

    busy_before, load_before = background(), load_average()
    with tempfile.TemporaryDirectory(prefix="confide-load-") as tmp:
        result = run_federation(
            label=f"soak-{sites}" if soak else f"load-{sites}",
            sites=sites,
            rounds=args.rounds,
            soak_seconds=60 * args.soak_minutes,
            agent_procs=args.agent_procs,
            workers=args.workers,
            stage_deadline=args.stage_deadline,
            warmup=args.warmup_rounds,
            tmp=Path(tmp),
        )
    busy_after, load_after = background(), load_average()

    r = result
    print(
        f"{sites} sites in {args.agent_procs} helper processes, coordinator in its own process, "
        f"1,001,000-parameter model, SecAgg+, loopback mutual TLS; wall {r['wall_s']:.0f} s "
        f"(PKI {r['pki_s']:.1f} s)"
    )
    print_environment(load_before, load_after, busy_before, busy_after)
    rows: list[tuple[Any, ...]] = [
        (
            "rounds completed",
            f"{r['rounds_completed']}" + ("" if soak else f" of {args.rounds}"),
            " ".join(f"{s:.1f}" for s in r["round_seconds"][:12])
            + (" ..." if len(r["round_seconds"]) > 12 else "")
            + " s",
        ),
        ("rounds per minute", r["rounds_per_minute"], "first start to last end (state.db)"),
        ("rounds per minute (records)", r["rounds_per_minute_records"], "60 / mean seconds"),
        (
            "upload latency p50 / p95 / max s",
            f"{r['upload_s']['p50']:.3f} / {r['upload_s']['p95']:.3f} / {r['upload_s']['max']:.3f}",
            f"{r['upload_s']['n']} uploads, all kinds",
        ),
        ("coordinator peak RSS MB", r["coordinator_peak_rss_mb"], "VmHWM, whole run"),
    ]
    growth = r.get("memory_growth")
    if soak and growth is not None:
        slope = r["rss_slope_mb_per_100_rounds_late"]
        rows += [
            (
                "RSS after warm-up MB",
                r["rss_warmup_mb"],
                "median peak of rounds {}-{}".format(*r["growth_windows"][0]),
            ),
            (
                "RSS at the end MB",
                r["rss_end_mb"],
                "median peak of rounds {}-{}".format(*r["growth_windows"][1]),
            ),
            ("memory growth", f"{100 * growth:+.1f} %", "end against warm-up"),
            (
                "peak trend, 2nd half",
                "-" if slope is None else f"{slope:+.1f} MB / 100 rounds",
                "least squares over the rounds' peaks",
            ),
            (
                "RSS floor, early / late MB",
                f"{r['rss_floor_early_mb']:.0f} / {r['rss_floor_late_mb']:.0f}",
                "smallest sample, first / last third of the rounds after warm-up",
            ),
        ]
    print_table(
        ("Soak" if soak else "Load") + f": {sites} sites, SecAgg+, 1M parameters",
        ["measure", "value", "note"],
        rows,
    )
    print_table(
        "Upload latency by kind (the agents' own `uploaded` events, seconds)",
        ["upload", "n", "p50 s", "p95 s", "max s"],
        [
            (
                STAGES.get(kind, kind),
                v["n"],
                v["p50"],
                v["p95"],
                v["max"],
            )
            for kind, v in r["upload_s_by_kind"].items()
        ],
    )
    growth_ok = None if growth is None else growth < TARGET_GROWTH
    goals = [
        {
            "goal": f"every round completes ({sites} sites, SecAgg+)",
            "measured": f"{r['rounds_completed']} rounds, survivors {sorted(set(r['survivors']))}",
            "status": verdict(r["every_round_completed"]),
        },
        {
            "goal": f"soak: coordinator memory growth < {100 * TARGET_GROWTH:.0f} %",
            "measured": "-" if growth is None else f"{100 * growth:+.1f} %",
            "status": verdict(growth_ok),
        },
    ]
    print_table("Targets", ["goal", "measured", "status"], [tuple(g.values()) for g in goals])
    if r["problems"] or r["round_rows"] or r["agents_exit_ok"] is False:
        print(f"agents exited cleanly: {r['agents_exit_ok']}; problems: {r['problems'][:5]}")
        for row in r["round_rows"]:
            print(f"  round {row['round']}.{row['attempt']}: {row['status']} {row['failures']}")
    if r["coordinator_log_tail"]:
        print("coordinator log (tail):\n" + r["coordinator_log_tail"])
    write_json(
        args.json,
        {
            "benchmark": "load",
            "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"sites": sites},
            "environment": {
                "load_before": load_before,
                "load_after": load_after,
                "busy_before": busy_before,
                "busy_after": busy_after,
            },
            "result": result,
            "goals": goals,
        },
    )
    return 0 if r["every_round_completed"] and growth_ok is not False else 1


if __name__ == "__main__":
    sys.exit(main())
