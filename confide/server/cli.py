"""`confide coordinator start | status`: run a federation's coordinator, or look at its state."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from confide.errors import ConfideError

if TYPE_CHECKING:
    from confide.server.store import Store


def add_coordinator_parser(sub: Any) -> None:
    p = sub.add_parser("coordinator", help="run or inspect a federation's coordinator")
    csub = p.add_subparsers(dest="coordinator_command", metavar="SUBCOMMAND")
    start = csub.add_parser(
        "start",
        help="serve the federation over mutual TLS and run its rounds",
        description="Start the coordinator described by federation.toml. It listens with "
        "mutual TLS only, runs the rounds, checkpoints into server.state_dir after each "
        "round and resumes from there after a restart.",
    )
    start.add_argument("--config", type=Path, required=True, help="federation.toml")
    start.add_argument("--address", help="override server.address (HOST:PORT)")
    start.add_argument("--state-dir", help="override server.state_dir")
    start.set_defaults(func=_start)
    status = csub.add_parser("status", help="rounds, connected sites, last accuracy")
    status.add_argument("--config", type=Path, required=True, help="federation.toml")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)
    key = csub.add_parser(
        "seal-key",
        help="create a key file that seals checkpoints at rest (32 random bytes, mode 0600)",
        description="Write a new AES-256 seal key to --out (mode 0600, never overwritten). "
        "Point server.seal_key_file at it; back it up: without it no sealed checkpoint opens.",
    )
    key.add_argument("--out", type=Path, required=True, metavar="PATH", help="key file to create")
    key.set_defaults(func=_seal_key)
    migrate = csub.add_parser(
        "seal-checkpoints",
        help="seal the checkpoints written before sealing was configured (one-time migration)",
        description="Seal every plaintext checkpoint in server.state_dir with the configured "
        "seal key, verifying each first; safe to run again after an interruption.",
    )
    migrate.add_argument("--config", type=Path, required=True, help="federation.toml")
    migrate.set_defaults(func=_seal_checkpoints)
    export = csub.add_parser(
        "export",
        help="write the latest checkpoint's model to a file (sealed when sealing is on)",
        description="Write the newest checkpoint's model as an .npz of named arrays, verified "
        "first. With server.seal_key_file / seal_passphrase_env the file is sealed unless "
        "--plaintext is given.",
    )
    export.add_argument("--config", type=Path, required=True, help="federation.toml")
    export.add_argument("--out", type=Path, required=True, metavar="PATH", help="model file")
    export.add_argument(
        "--plaintext", action="store_true", help="write it unsealed even when sealing is on"
    )
    export.set_defaults(func=_export)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _start(args: argparse.Namespace) -> int:
    from confide.server.config import FederationConfig
    from confide.server.coordinator import Coordinator, configure_logging

    cfg = FederationConfig.load(
        args.config, **{"server.address": args.address, "server.state_dir": args.state_dir}
    )
    configure_logging(cfg.state_dir, json_lines=cfg.server.log_json)
    coordinator = Coordinator(cfg)
    coordinator.start()
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()
        coordinator.stop_event.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = coordinator.run()
    finally:
        coordinator.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
    print(f"state:   {cfg.state_dir / 'state.db'}")
    print(f"history: {cfg.state_dir / 'history.json'}")
    print(f"log:     {cfg.state_dir / 'coordinator.log'}")
    return 130 if stopping.is_set() and code == 0 else code


def _seal_key(args: argparse.Namespace) -> int:
    from confide.privacy.crypto import create_key_file

    key = create_key_file(args.out)
    print(f"seal key {key.key_id} written to {args.out} (mode 0600)")
    print(f'set server.seal_key_file = "{args.out}" in federation.toml, and back the key up')
    return 0


def _open_store(config: Path) -> Store:
    from confide.server.config import FederationConfig
    from confide.server.store import Store

    cfg = FederationConfig.load(config)
    if not (cfg.state_dir / "state.db").exists():
        raise ConfideError(
            f"no coordinator state in {cfg.state_dir}. Fix: start the coordinator with "
            f"`confide coordinator start --config {config}` first"
        )
    return Store(cfg.state_dir, cfg.seal_key())


def _seal_checkpoints(args: argparse.Namespace) -> int:
    with _open_store(args.config) as store:
        sealed = store.seal_checkpoints()
    print(f"sealed {len(sealed)} checkpoint file(s) in {store.models_dir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    with _open_store(args.config) as store:
        out, rnd, sealed = store.export_model(args.out, plaintext=args.plaintext)
    print(f"model of round {rnd} written to {out} ({'sealed' if sealed else 'plaintext'})")
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from confide.server.config import FederationConfig
    from confide.server.store import Store

    cfg = FederationConfig.load(args.config)
    if not (cfg.state_dir / "state.db").exists():
        raise ConfideError(
            f"no coordinator state in {cfg.state_dir}. Fix: start the coordinator with "
            f"`confide coordinator start --config {args.config}` first"
        )
    store = Store(cfg.state_dir)
    try:
        rounds = store.rounds()
        sites = store.sites()
        events = store.events("checkpoint")
        traffic = {e["round"]: e for e in store.events("traffic")}  # the meter, per round
    finally:
        store.close()
    now = time.time()
    timeout = cfg.server.site_timeout_seconds
    done = [r for r in rounds if r.status == "ok"]
    last_acc = next(
        (r.eval_metrics.get("eval_accuracy") for r in reversed(done) if r.eval_metrics), None
    )
    down = sum(int(t.get("down_bytes", 0)) for t in traffic.values())
    up = sum(int(t.get("up_bytes", 0)) for t in traffic.values())
    summary = {
        "federation": cfg.federation.name,
        "rounds_planned": cfg.federation.rounds,
        "rounds_completed": len({r.round for r in done if r.round > 0}),
        "last_checkpoint": events[-1]["round"] if events else 0,
        "last_eval_accuracy": last_acc,
        "sites_connected": sum(1 for s in sites if now - s.last_seen <= timeout),
        "sites_known": len(sites),
        "bytes_down": down,
        "bytes_up": up,
    }
    if args.json:
        print(
            json.dumps(
                {
                    **summary,
                    "rounds": [r.__dict__ for r in rounds],
                    "sites": [s.__dict__ for s in sites],
                    "traffic": [
                        {k: v for k, v in t.items() if k not in ("ts", "kind", "site_id")}
                        for t in traffic.values()
                    ],
                },
                indent=2,
            )
        )
        return 0
    console = Console()
    acc = f"{100 * last_acc:.1f}%" if last_acc is not None else "-"
    console.print(
        f"[bold]{cfg.federation.name}[/bold]: {summary['rounds_completed']}/"
        f"{cfg.federation.rounds} rounds, {summary['sites_connected']} of {len(sites)} sites "
        f"connected, last accuracy {acc}, {down / 1e6:.3g} MB down / {up / 1e6:.3g} MB up"
    )
    table = Table(title="rounds")
    for col in (
        "round",
        "attempt",
        "status",
        "sites ok",
        "failures",
        "train loss",
        "eval acc",
        "MB down/up",
        "s",
    ):
        table.add_column(col)
    for r in rounds[-20:]:
        table.add_row(
            str(r.round),
            str(r.attempt),
            r.status,
            f"{len(r.succeeded)}/{len(r.selected)}",
            "; ".join(f"{k}: {v}" for k, v in r.failures.items())[:60],
            f"{r.train_metrics['train_loss']:.3f}" if "train_loss" in r.train_metrics else "-",
            f"{100 * r.eval_metrics['eval_accuracy']:.1f}%"
            if "eval_accuracy" in r.eval_metrics
            else "-",
            f"{t['down_bytes'] / 1e6:.3g}/{t['up_bytes'] / 1e6:.3g}"
            if r.status == "ok" and (t := traffic.get(r.round)) is not None
            else "-",
            f"{(r.finished or now) - r.started:.1f}",
        )
    console.print(table)
    st = Table(title="sites")
    for col in ("site", "connected", "last seen", "tasks ok", "failed", "last error"):
        st.add_column(col)
    for s in sites:
        st.add_row(
            s.site_id,
            "yes" if now - s.last_seen <= timeout else "no",
            f"{now - s.last_seen:.0f} s ago",
            str(s.tasks_done),
            str(s.tasks_failed),
            (s.last_error or "")[:60],
        )
    console.print(st)
    return 0
