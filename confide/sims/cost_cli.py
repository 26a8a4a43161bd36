"""`confide sim estimate` and `confide sim calibrate`: argument parsing and rich output."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import RenderableType

    from confide.sims.cost import Estimate

__all__ = ["add_sim_parsers", "estimate_renderables", "run_calibrate", "run_estimate"]


def add_sim_parsers(sim_sub: Any) -> None:
    """Add ``estimate`` and ``calibrate`` to the ``confide sim`` subcommands."""
    est = sim_sub.add_parser(
        "estimate",
        help="price a federation (time, bytes, energy, CO2, dollars) without training",
        description="Analytic what-if of the federation --config describes ([sim] as for "
        "`confide sim run`, plus [cost]; see docs/cost-model.md): round and total time by "
        "Monte Carlo, traffic, energy, CO2, dollars by site group and datacenter, TCO and "
        "ROI against central training. No training runs.",
    )
    est.add_argument("--config", type=Path, required=True, help="TOML file with [sim] and [cost]")
    est.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write JSON")
    est.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write a self-contained HTML report with plots (cost by category and site)",
    )
    est.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="PATH",
        help="calibration JSON from `confide sim calibrate` (overrides [cost] calibration)",
    )
    est.add_argument("--quiet", action="store_true", help="no tables (with --json)")
    est.set_defaults(func=run_estimate)

    cal = sim_sub.add_parser(
        "calibrate",
        help="measure this machine's training throughput for the cost model",
        description="Time real training steps of a built-in model here (plain SGD and, with "
        "--dp, DP-SGD as the built-in apps run it) and FedAvg aggregation; fit the "
        "utilization, DP factor and aggregation cost that `confide sim estimate` uses.",
    )
    cal.add_argument("--model", required=True, help="built-in model (see `confide sim tasks`)")
    cal.add_argument("--batch-size", type=int, default=None, metavar="B", help="(task default)")
    cal.add_argument("--steps", type=int, default=20, metavar="S", help="timed steps (20)")
    cal.add_argument("--repeats", type=int, default=3, metavar="R", help="repeats, median (3)")
    cal.add_argument("--dp", action="store_true", help="also time DP-SGD: fits the DP factor")
    cal.add_argument(
        "--threads", type=int, default=None, metavar="N", help="torch threads (torch's choice)"
    )
    cal.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="with --threads 1: also time N single-threaded trainers at once (a host of "
        "N colocated sites); fits the host's parallel speedup",
    )
    cal.add_argument(
        "--hardware",
        default="local",
        help="catalog profile whose peak FLOP/s to fit against (local: this machine)",
    )
    cal.add_argument(
        "--out", type=Path, default=Path("calibration.json"), help="(calibration.json)"
    )
    cal.set_defaults(func=run_calibrate)


# --- estimate ----------------------------------------------------------------------------


def run_estimate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from confide.sims.cost import estimate, load_estimate_config

    cfg = load_estimate_config(args.config, calibration=args.calibration)
    result = estimate(cfg)
    if not args.quiet:
        console = Console(width=max(Console().width, 150))
        for part in estimate_renderables(result, title=str(args.config)):
            console.print(part)
    if args.json is not None or args.html is not None:
        from confide.sims.report import write_estimate_report

        for path in write_estimate_report(result.to_json(), args.html, args.json):
            print(f"wrote {path}")
    return 0


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} days"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _usd(x: float) -> str:
    sign = "-" if x < 0 else ""
    return f"{sign}${abs(x):,.0f}" if abs(x) >= 100 else f"{sign}${abs(x):,.2f}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def estimate_renderables(est: Estimate, *, title: str = "") -> list[RenderableType]:
    """Rich tables of an estimate: summary, site groups, costs, datacenter, TCO, notes."""
    from rich.table import Table
    from rich.text import Text

    m = est.model
    head = (
        f"{m.name} model, {m.parameters:,} parameters ({_bytes(m.nbytes)}), "
        f"{m.train_flops_per_example:.3g} training FLOPs/example; {est.sites:,} sites, "
        f"{est.rounds:,} rounds, {est.selected_per_round:,} selected for {est.target_per_round:,}"
        f" per round; secure aggregation {est.secure_aggregation}; DP factor {est.dp_factor:g}"
    )
    out: list[RenderableType] = [Text(f"confide sim estimate {title}".rstrip(), style="bold")]
    out.append(Text(head))
    summary = Table(title="One run (one federation)", show_header=True)
    summary.add_column("quantity")
    summary.add_column("value", justify="right")
    r, t = est.round_seconds, est.total_seconds
    rows = [
        (
            "round time p50 / p95 / mean",
            f"{_duration(r.p50)} / {_duration(r.p95)} / {_duration(r.mean)}",
        ),
        ("total time p50 / p95", f"{_duration(t.p50)} / {_duration(t.p95)}"),
        ("attempts per round", f"{est.attempts_per_round:.3g}"),
        (
            "per site and round: down / up",
            f"{_bytes(est.bytes_down_per_site_round)} / {_bytes(est.bytes_up_per_site_round)}",
        ),
        ("traffic: down / up", f"{_bytes(est.bytes_down)} / {_bytes(est.bytes_up)}"),
        (
            "energy: sites / network / datacenter",
            f"{_num(est.kwh_sites)} / {_num(est.kwh_network)} / {_num(est.kwh_datacenter)} kWh",
        ),
        ("CO2", f"{_num(est.kg_co2)} kg"),
        (
            "cost: sites / datacenter / total",
            f"{_usd(est.usd_sites)} / {_usd(est.usd_datacenter)} / {_usd(est.usd_total)}",
        ),
    ]
    for quantity, value in rows:
        summary.add_row(quantity, value)
    out.append(summary)

    groups = Table(title="Site groups (per run)")
    for col in (
        "group",
        "sites",
        "hardware",
        "network",
        "region",
        "compute s/round",
        "transfer s/round",
        "back/round",
        "kWh",
        "kg CO2",
        "cost",
    ):
        groups.add_column(
            col, justify="left" if col in ("group", "hardware", "network") else "right"
        )
    for g in est.per_site_group:
        groups.add_row(
            g.name + (" (colocated)" if g.colocated else ""),
            f"{g.sites:,}",
            g.hardware,
            g.network,
            g.region,
            _num(g.compute_seconds),
            _num(g.transfer_seconds),
            f"{g.returned_per_round:.3g}",
            _num(g.kwh),
            _num(g.kg_co2),
            _usd(g.usd_total),
        )
    out.append(groups)

    costs = Table(title="Cost by category (per run)")
    costs.add_column("category")
    costs.add_column("USD", justify="right")
    for name, usd in est.cost_by_category.items():
        costs.add_row(name, _usd(usd))
    costs.add_row("total", _usd(est.usd_total))
    out.append(costs)

    dc = est.datacenter
    plan = Table(title=f"Datacenter ({dc.mode})")
    plan.add_column("quantity")
    plan.add_column("value", justify="right")
    plan.add_row("servers", f"{dc.servers} x {dc.server}")
    plan.add_row("bandwidth in a round", f"{dc.bandwidth_bps / 1e9:.3g} Gbit/s")
    plan.add_row("aggregation per round", _duration(dc.aggregation_seconds_per_round))
    plan.add_row("storage (checkpoints, ledger)", f"{dc.storage_gb:.3g} GB")
    if dc.capex_usd:
        plan.add_row("servers' purchase", _usd(dc.capex_usd))
    plan.add_row(
        "servers / energy / storage / egress",
        " / ".join(_usd(x) for x in (dc.usd_servers, dc.usd_energy, dc.usd_storage, dc.usd_egress)),
    )
    out.append(plan)

    tco = Table(title="Total cost of ownership: federated vs. central training")
    for col in ("years", "federated", "central", "savings", "ROI"):
        tco.add_column(col, justify="right")
    for row in est.tco:
        tco.add_row(
            str(row.years),
            _usd(row.federated_usd),
            _usd(row.central_usd) if row.central_usd is not None else "-",
            _usd(row.savings_usd) if row.savings_usd is not None else "-",
            f"{100 * row.roi:.0f} %" if row.roi is not None else "-",
        )
    out.append(tco)
    if est.central is not None:
        c = est.central
        out.append(
            Text(
                f"central: {c.gpus} x {c.hardware}, {c.hours:.3g} h of training per run, "
                f"{c.data_gb:.3g} GB of data moved once "
                f"(slowest site {_duration(c.transfer_seconds)})"
            )
        )
    for note in est.assumptions:
        out.append(Text(f"- {note}", style="dim"))
    return out


# --- calibrate ---------------------------------------------------------------------------


def run_calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from confide.sims.calibrate import calibrate, save_calibration

    console = Console(stderr=True)
    units = 3 + args.repeats * (2 if args.dp else 1)  # FLOPs, warm-up, repeats, aggregation
    with Progress(
        TextColumn("[bold]calibrate[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=units)
        started = [False]

        def progress(what: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=what)

        result = calibrate(
            args.model,
            batch_size=args.batch_size,
            steps=args.steps,
            repeats=args.repeats,
            dp=args.dp,
            hardware=args.hardware,
            threads=args.threads,
            parallel=args.parallel,
            progress=progress,
        )
        bar.advance(task)
    path = save_calibration(result, args.out)
    table = Table(title=f"Calibration of {result.model} on {result.cpu} ({result.cores} cores)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("peak FLOP/s", f"{result.peak_flops:.3g} ({result.peak_source})")
    table.add_row("achieved FLOP/s", f"{result.achieved_flops:.3g}")
    table.add_row(f"utilization of {result.hardware}", f"{result.utilization:.3g}")
    if result.dp_factor is not None:
        table.add_row("DP-SGD factor", f"{result.dp_factor:.3g}x")
    if result.parallel_speedup is not None:
        table.add_row(
            f"{args.parallel} single-threaded trainers at once", f"{result.parallel_speedup:.3g}x"
        )
    table.add_row(
        "FedAvg aggregation, s per parameter",
        f"{result.aggregation_seconds_per_parameter:.3g} + "
        f"{result.aggregation_seconds_per_parameter_site:.3g} x sites",
    )
    Console(width=max(Console().width, 100)).print(table)
    print(f"wrote {path}")
    return 0
