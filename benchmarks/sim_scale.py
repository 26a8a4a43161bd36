"""Simulation at scale: 1,000 and 10,000 virtual sites, Confide's engines against Flower's.

One workload, three ways: 2 rounds, each training and then evaluating 10 sites drawn
from N virtual sites, with a trivial ClientApp (``examples/apps/logreg.py:message_app``,
logistic regression on 64 synthetic examples per site, data made from the partition id):

* ``flower``: Flower's own simulation (``flwr.simulation.run_simulation``) with a plain
  Flower ``ServerApp`` running Flower's ``FedAvg`` (``fraction_train`` = 10 / N);
* ``confide-ray``: ``confide sim run --engine ray``, Confide's round driver as a Flower
  ServerApp on the same simulation engine, the same ClientApp, the same Ray settings
  (all cores, one CPU per site);
* ``confide-inprocess``: ``confide sim run`` (the default engine), every site's ClientApp
  called in this process.

Each configuration runs in a fresh Python process, so memory and Ray state do not leak
between them. ``wall s`` is the run itself (Ray start and shutdown included, Python
imports not); ``peak MB`` is the driver process's peak resident memory (``VmHWM``; Ray's
own worker processes not included). Confide's runs also write what ``confide sim run``
always writes (history.json, metrics.png, the model). Ratios are Confide / Flower.

    python benchmarks/sim_scale.py                   # N = 1,000 and 10,000 (minutes)
    python benchmarks/sim_scale.py --huge            # and N = 100,000
    python benchmarks/sim_scale.py --quick           # smoke run (CI): N = 30, 3 per round
    python benchmarks/sim_scale.py --json benchmarks/results/sim_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

APPS = ROOT / "examples" / "apps"
ENGINES = ("flower", "confide-ray", "confide-inprocess")
RESULT = "SIM_SCALE_RESULT "


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (/proc, else getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def run_flower(sites: int, per_round: int, rounds: int, cpus: int) -> dict[str, Any]:
    """Flower's own simulation: a plain ServerApp with Flower's FedAvg."""
    import logging

    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    sys.path.insert(0, str(APPS))
    import logreg

    logging.getLogger("flwr").setLevel(logging.WARNING)
    outcome: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=per_round / sites,
            fraction_evaluate=per_round / sites,
            min_train_nodes=per_round,
            min_evaluate_nodes=per_round,
            min_available_nodes=sites,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(logreg.initial()),
            num_rounds=rounds,
            train_config=ConfigRecord({"lr": 0.5}),
        )
        outcome["weights"] = result.arrays.to_numpy_ndarrays()

    from confide.sims.site import ray_backend  # Flower imports only: a fair peak memory

    start = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=logreg.message_app,
        num_supernodes=sites,
        backend_config=ray_backend(cpus),  # type: ignore[arg-type]
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "ok": "weights" in outcome}


def run_confide(
    engine: str, sites: int, per_round: int, rounds: int, cpus: int, out: Path
) -> dict[str, Any]:
    from confide.sims.config import SimRunConfig
    from confide.sims.engine import run_simulation

    cfg = SimRunConfig(
        app="logreg:message_app",
        app_dir=APPS,
        initial="logreg:initial",
        sites=sites,
        fraction=per_round / sites,
        rounds=rounds,
        lr=0.5,
        seed=0,
        engine="ray" if engine == "confide-ray" else "inprocess",
        ray_cpus=cpus,
        out=out,
    )
    start = time.perf_counter()
    result = run_simulation(cfg, show_progress=False)
    seconds = time.perf_counter() - start
    last = result.history.rounds[-1]
    return {
        "seconds": seconds,
        "ok": last.sites_succeeded == per_round and not last.failures,
        "sites_trained_last_round": last.sites_succeeded,
    }


def worker(args: argparse.Namespace) -> int:
    """One configuration, in this (fresh) process; prints one JSON line."""
    with TemporaryDirectory() as tmp:
        if args.worker == "flower":
            row = run_flower(args.sites[0], args.per_round, args.rounds, args.cpus)
        else:
            row = run_confide(
                args.worker, args.sites[0], args.per_round, args.rounds, args.cpus, Path(tmp)
            )
    row.update(engine=args.worker, sites=args.sites[0], peak_mb=peak_rss_mb())
    print(RESULT + json.dumps(row), flush=True)
    return 0


def measure(engine: str, sites: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        engine,
        "--sites",
        str(sites),
        "--per-round",
        str(args.per_round),
        "--rounds",
        str(args.rounds),
        "--cpus",
        str(args.cpus),
    ]
    # The same quiet, offline set-up for every engine: no telemetry, no usage stats.
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=False
    )
    process_seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise SystemExit(f"{engine} at N={sites} failed (exit {proc.returncode}):\n{tail}")
    row: dict[str, Any] = json.loads(lines[-1][len(RESULT) :])
    row["process_seconds"] = process_seconds
    return row


def summarize(sites: int, engine: str, got: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of the repeats (wall, process, peak), the wall range, and every run."""
    seconds = [g["seconds"] for g in got]
    return {
        "sites": sites,
        "engine": engine,
        "seconds": statistics.median(seconds),
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
        "process_seconds": statistics.median(g["process_seconds"] for g in got),
        "peak_mb": statistics.median(g["peak_mb"] for g in got),
        "ok": all(g["ok"] for g in got),
        "runs": got,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, nargs="+", default=None, help="N (1000 10000)")
    p.add_argument("--huge", action="store_true", help="also N = 100,000")
    p.add_argument("--per-round", type=int, default=10, help="sites trained per round (10)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for Ray")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs of each configuration, interleaved (median)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: N = 30, 3 per round")
    p.add_argument("--json", help="write the results (and the machine) here")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from _common import machine, print_table, write_json

    if args.quick:
        args.sites, args.per_round = args.sites or [30], 3
    sites = args.sites or [1000, 10000]
    if args.huge and 100000 not in sites:
        sites = [*sites, 100000]
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for n in sites:
        for i in range(args.repeat):  # interleaved: a busy spell hits every engine alike
            for engine in args.engines:
                print(
                    f"N={n:,} {engine} run {i + 1}/{args.repeat} ...", file=sys.stderr, flush=True
                )
                runs.setdefault((n, engine), []).append(measure(engine, n, args))
    rows = [summarize(n, engine, got) for (n, engine), got in runs.items()]
    flower = {r["sites"]: r for r in rows if r["engine"] == "flower"}
    for r in rows:
        base = flower.get(r["sites"])
        if base is not None and r["engine"] != "flower":
            r["wall_ratio"] = r["seconds"] / base["seconds"]
            r["peak_ratio"] = r["peak_mb"] / base["peak_mb"]
    table = [
        [
            f"{r['sites']:,}",
            r["engine"],
            f"{r['seconds']:.3g}"
            + (f" ({r['seconds_min']:.3g}-{r['seconds_max']:.3g})" if args.repeat > 1 else ""),
            r["process_seconds"],
            r["peak_mb"],
            f"{r['wall_ratio']:.2f}x" if "wall_ratio" in r else "-",
            f"{r['peak_ratio']:.2f}x" if "peak_ratio" in r else "-",
            "yes" if r["ok"] else "NO",
        ]
        for r in rows
    ]
    m = machine()
    print_table(
        f"{args.rounds} rounds x {args.per_round} sites of N, trivial ClientApp; "
        f"{m['cpu']}, {m['cores']} cores, {args.cpus} Ray CPUs",
        [
            "N",
            "engine",
            "wall s" + (f" (median of {args.repeat}, range)" if args.repeat > 1 else ""),
            "process s",
            "peak MB",
            "wall / Flower",
            "peak / Flower",
            "ok",
        ],
        table,
    )
    import flwr

    versions: dict[str, str] = {"flwr": flwr.__version__}
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:
        versions["ray"] = "not installed"
    write_json(
        args.json,
        {
            "workload": {
                "rounds": args.rounds,
                "sites_per_round": args.per_round,
                "app": "examples/apps/logreg.py:message_app",
                "ray_cpus": args.cpus,
                "repeat": args.repeat,
            },
            "versions": versions,
            "rows": rows,
        },
    )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
