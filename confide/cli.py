"""The one `confide` command: simulation and PKI today; coordinator, site and audit as they land."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confide import __version__
from confide.errors import ConfideError

EXIT_USAGE = 2


def _sim_run_args(p: argparse.ArgumentParser) -> None:
    # Numbers are read as text and validated by the pydantic model, so a bad value gets
    # the same one-line message whether it came from a flag or from --config.
    p.add_argument("--config", type=Path, help="TOML file with the settings (flags override it)")
    p.add_argument("--task", help="built-in task (see `confide sim tasks`)")
    p.add_argument("--model", help="model of the task (default: the task's own)")
    p.add_argument("--sites", metavar="N", help="number of simulated sites (default 10)")
    p.add_argument("--rounds", metavar="N", help="number of rounds (default 20)")
    p.add_argument(
        "--partition",
        metavar="SPEC",
        help="iid | dirichlet:ALPHA | shards:N | natural (default: the task's)",
    )
    p.add_argument("--fraction", metavar="F", help="fraction of sites trained per round (1.0)")
    p.add_argument("--fraction-evaluate", metavar="F", help="fraction evaluated (= --fraction)")
    p.add_argument("--min-sites", metavar="N", help="minimum sites per round (1)")
    p.add_argument("--local-epochs", metavar="E", help="local epochs per round (task default)")
    p.add_argument("--batch-size", metavar="B", help="local batch size (task default)")
    p.add_argument("--lr", metavar="LR", help="local learning rate (task default)")
    p.add_argument("--momentum", metavar="M", help="local SGD momentum (task default)")
    p.add_argument("--max-steps", metavar="S", help="cap on local steps per round")
    p.add_argument("--strategy", help="fedavg | fedadam (fedavg)")
    p.add_argument("--server-lr", metavar="LR", help="server learning rate")
    p.add_argument(
        "--server-ema",
        metavar="DECAY",
        help="evaluate and export a moving average of the global models, e.g. 0.9",
    )
    p.add_argument("--seed", metavar="S", help="seed of everything (0)")
    p.add_argument("--data-dir", metavar="DIR", help="data folder (default ../shared/data)")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/TASK-TIME)")
    p.add_argument("--max-samples-per-site", metavar="N", help="cap on each site's training set")
    p.add_argument("--eval-fraction", metavar="F", help="share of a site's data held out (0.1)")
    p.add_argument("--max-test-samples", metavar="N", help="cap on the central test set")
    p.add_argument(
        "--no-central-eval",
        dest="central_eval",
        action="store_const",
        const=False,
        help="skip the central test-set evaluation",
    )
    p.add_argument(
        "--secure-aggregation",
        metavar="MODE",
        help="none | secagg+ (the server learns only the sum of the updates)",
    )
    p.add_argument(
        "--engine",
        metavar="NAME",
        help="inprocess (default) | ray: Flower's simulation engine (pip install 'confide[ray]')",
    )
    p.add_argument("--ray-cpus", metavar="N", help="CPUs Ray may use (default: all)")
    p.add_argument(
        "--app", metavar="MODULE:ATTR", help="your own Flower ClientApp instead of a task's"
    )
    p.add_argument("--app-dir", metavar="DIR", help="folder holding the --app module")
    p.add_argument(
        "--initial",
        metavar="MODULE:ATTR",
        help="callable giving the first global model (nn.Module or list of arrays) for --app",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")


def _cmd_sim_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from confide.sims.config import SimRunConfig
    from confide.sims.engine import run_simulation

    values: dict[str, Any] = {f: getattr(args, f, None) for f in SimRunConfig.model_fields}
    if args.config is None and values["task"] is None and values["app"] is None:
        raise ConfideError(
            "--task: missing. Fix: pass --task NAME (see `confide sim tasks`) or --app MODULE:ATTR"
        )
    cfg = SimRunConfig.build(values, config_file=args.config)
    if cfg.engine == "ray":  # before anything is printed: one line with the fix
        from confide.sims.ray_engine import require_ray

        require_ray()
    console = Console(stderr=True)
    out = console if not args.quiet else None
    if out is not None:
        s = cfg.data_settings()
        what = (
            f"task {cfg.task} (model {cfg.model_name})"
            if cfg.task is not None and cfg.app is None
            else f"app {cfg.app} (model {cfg.model_name or cfg.initial})"
        )
        out.print(
            f"[bold]confide sim run[/bold]: {what}, {cfg.sites} sites, "
            f"partition {s.partition or '-'}, {cfg.rounds} rounds, strategy {cfg.strategy}, "
            f"seed {cfg.seed}, engine {cfg.engine}"
        )
    result = run_simulation(cfg, console=console, show_progress=not args.quiet)
    last = result.history.last()
    summary = (
        f"test accuracy {100 * last.test_accuracy:.1f}%" if last and last.test_accuracy else ""
    )
    print(f"done: {cfg.rounds} rounds {summary}".rstrip())
    print(f"history: {result.history_path}")
    print(f"plot:    {result.plot_path}")
    print(f"model:   {result.model_path}")
    if result.report_path is not None:
        print(f"report:  {result.report_path} (and report.json: curves, bytes, cost)")
    return 0


def _cmd_sim_tasks(args: argparse.Namespace) -> int:
    from confide.client.tasks import TASKS

    for t in TASKS.values():
        print(f"{t.name:<24} {t.description}")
        print(
            f"{'':<24} models: {', '.join(t.models)}; partitions: {', '.join(t.partitions)} "
            f"(default {t.default_partition})"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from confide.demo import run_demo

    return run_demo(
        args.out,
        sites=args.sites,
        rounds=args.rounds,
        samples=args.samples,
        model=args.model,
        data_dir=args.data_dir,
        verbose_sites=args.show_sites,
        secure_aggregation=args.secure_aggregation,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="confide",
        description="Privacy-preserving federated training on Flower.",
    )
    parser.add_argument("--version", action="version", version=f"confide {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sim = sub.add_parser("sim", help="simulate a federation on this machine")
    sim_sub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    run = sim_sub.add_parser(
        "run",
        help="run a federation in this process or on Ray",
        description="Run a whole federation (a built-in task or your own Flower ClientApp) "
        "in this process or on Flower's simulation engine (--engine ray), and save "
        "history.json, metrics.png and model.pt to --out.",
    )
    _sim_run_args(run)
    run.set_defaults(func=_cmd_sim_run)
    tasks = sim_sub.add_parser("tasks", help="list the built-in tasks")
    tasks.set_defaults(func=_cmd_sim_tasks)
    from confide.sims.cost_cli import add_sim_parsers

    add_sim_parsers(sim_sub)  # estimate, calibrate
    sim.set_defaults(func=lambda a: _help(sim))

    from confide.privacy.crypto.pki_cli import add_pki_parser

    add_pki_parser(sub)

    from confide.server.cli import add_coordinator_parser

    add_coordinator_parser(sub)

    from confide.client.agent_cli import add_site_parser

    add_site_parser(sub)

    from confide.privacy.audit_cli import add_audit_parser

    add_audit_parser(sub)

    deid = sub.add_parser(
        "deid",
        help="de-identify site data before training (tables and free text, offline)",
        description="De-identify a site's data: `table` (roles per column, k-anonymity "
        "gate, report) and `text` (scrub identifiers from notes). Runs offline.",
    )
    deid_sub = deid.add_subparsers(dest="deid_command", metavar="SUBCOMMAND")
    from confide.privacy.deid import table_cli, text_cli

    table = deid_sub.add_parser(
        "table",
        help="de-identify a CSV table with a k-anonymity gate",
        description="De-identify --in with the roles of --config; writes --out and --report "
        "only when the k-anonymity / l-diversity gate passes (exit 3 when it fails).",
    )
    table_cli.add_arguments(table)
    table.set_defaults(func=table_cli.run)
    text = deid_sub.add_parser(
        "text",
        help="scrub identifiers from JSON-lines notes",
        description='Each input line {"id", "text"} becomes {"id", "text", "spans"} with the '
        "identifiers replaced and their spans over the input text.",
    )
    text_cli.add_arguments(text)
    text.set_defaults(func=text_cli.run)
    deid.set_defaults(func=lambda a: _help(deid))

    demo = sub.add_parser(
        "demo",
        help="run a real local federation: a coordinator and three sites over mutual TLS",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder (recreated)")
    demo.add_argument("--sites", type=int, default=3)
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--samples", type=int, default=2000, help="training images per site")
    demo.add_argument("--model", default="cnn", choices=["cnn", "cnn-small"])
    demo.add_argument("--data-dir", type=Path, default=None)
    demo.add_argument("--show-sites", action="store_true", help="print the sites' logs too")
    demo.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="aggregate with SecAgg+: the coordinator learns only the sum of the updates",
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        return _help(parser)
    try:
        return int(args.func(args))
    except ConfideError as e:
        print(f"confide: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("confide: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
