"""`confide site start`: the site operator's command, a thin shell around the site agent."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confide.client.agent import SiteAgent

EXIT_USAGE = 2


def add_site_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``site`` and its ``start`` subcommand to the ``confide`` parser; each sets ``func``."""
    p = subparsers.add_parser(
        "site",
        help="run this site's agent (connects out to the coordinator)",
        description="Run a site of a federation: host a Flower ClientApp and work for the "
        "coordinator over mutual TLS. The site connects out; it never listens.",
    )
    sub = p.add_subparsers(dest="site_command", metavar="SUBCOMMAND")
    start = sub.add_parser(
        "start",
        help="join the federation and train until it ends",
        description="Join the coordinator named in the kit (or site.toml, or --coordinator), "
        "run the ClientApp of site.toml for every task, and reconnect with backoff when the "
        "coordinator is away. Exits 0 when the federation finishes, 2 when the coordinator "
        "refuses this site, 130/143 on SIGINT/SIGTERM.",
    )
    start.add_argument(
        "--kit", type=Path, required=True, metavar="DIR", help="the site's startup kit folder"
    )
    start.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="site.toml (app, [agent], ...)"
    )
    start.add_argument(
        "--app-dir",
        type=Path,
        metavar="DIR",
        help="folder put first on the Python path to import the app from (like flwr's)",
    )
    start.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="coordinator address (overrides site.toml and the kit)",
    )
    start.add_argument("-v", "--verbose", action="store_true", help="also log debug details")
    start.set_defaults(func=_cmd_start)
    p.set_defaults(func=lambda a: _help(p))
    return p


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


def _cmd_start(args: argparse.Namespace) -> int:
    from confide.client.agent import SiteAgent, configure_logging, load_app, load_site_config
    from confide.privacy.crypto import load_kit

    config = load_site_config(args.config, coordinator=args.coordinator)
    kit = load_kit(args.kit)
    app = load_app(config.app, app_dir=args.app_dir)
    configure_logging(config.agent.log_json, verbose=args.verbose)
    agent = SiteAgent(kit, config, app=app)
    with stop_on_signals(agent):
        return agent.run()


@contextmanager
def stop_on_signals(agent: SiteAgent) -> Iterator[None]:
    """SIGINT/SIGTERM stop the agent (exit 130/143); a second signal acts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous: dict[signal.Signals, Any] = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)
        # stop() takes locks and cancels a gRPC call: never from inside a signal handler,
        # which may have interrupted this very thread while it held one of those locks.
        threading.Thread(target=agent.stop, args=(128 + signum,), daemon=True).start()

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
