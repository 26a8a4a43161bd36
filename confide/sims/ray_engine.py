"""Ray engine: Confide's round driver as a Flower ``ServerApp`` on Flower's simulation engine.

``confide sim run --engine ray`` runs the very :class:`~confide.sims.engine.RoundDriver`
of the in-process engine inside a Flower ``ServerApp``, launched with
``flwr.simulation.run_simulation``: ``num_supernodes`` virtual sites, each site's
``ClientApp`` executed by a pool of Ray actors. The driver reaches the sites through
``Grid.push_messages`` / ``pull_messages`` instead of calling the app itself, so selection,
the site agent's DP release, secure aggregation and the strategy are literally the same
code, and the same seed gives the same model on both engines.

What Flower's simulation does not give a ``ServerApp``, this module adds:

* **Which node holds which partition.** Node ids are random; the partition ids live in
  each node's ``node_config``, which only the node sees. Flower's simulation registers
  node ``i`` for partition ``i``, in order, and its in-memory link state keeps that
  order, so the map is read from there. Every reply is stamped with the partition id the
  node really has, and a mismatch fails the run instead of training the wrong site.
  On a grid that keeps no order the map is asked from every node once (one small
  ``query`` message each).
* **The run config.** ``run_simulation`` has no ``run_config``; the site wrapper merges
  the run's (seed, data layout, ``dp-noise-seed``...) into each node's ``Context`` the way
  ``flwr run`` would, keeping anything the node already has.
* **Bounded, quiet Ray.** ``num_cpus`` from ``ray_cpus`` (default: this machine's),
  one CPU per site by default, one torch thread per actor, Ray and Flower logging at
  warning, no Flower telemetry unless ``FLWR_TELEMETRY_ENABLED`` is set, and a shutdown
  that cannot hang the caller.

Ray is an optional extra (``pip install 'confide[ray]'``); it is imported only here.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Message, RecordDict

from confide.errors import ConfideError, ConfigError
from confide.sims.config import SimRunConfig
from confide.sims.engine import Reply, SimEngine, SimResult
from confide.sims.site import PARTITION_QUERY, SimSiteApp, ray_backend, stamped_partition

log = logging.getLogger("confide.sims.ray")


class RayNotInstalled(ConfigError):
    """``engine = "ray"`` without Ray in this Python environment."""

    def __init__(self) -> None:
        super().__init__(
            "engine",
            "ray is not installed in this Python environment",
            "pip install 'confide[ray]' (Flower's simulation extra), or use --engine inprocess",
        )


class RunAborted(ConfideError, RuntimeError):
    """The run was interrupted (Ctrl-C) while the ServerApp thread waited for sites."""


class NodeMapError(ConfideError, RuntimeError):
    """A node answered for another partition than the driver addressed it as."""


def require_ray() -> None:
    """Fail early, with the fix, when Ray (Flower's simulation extra) is missing."""
    try:
        importlib.import_module("ray")
    except ImportError:
        raise RayNotInstalled() from None


# --- the driver side: a SiteLink over Flower's Grid -------------------------------------


class GridLink:
    """Reaches sites through a Flower ``Grid``: push one message per site, pull replies."""

    def __init__(
        self,
        grid: Any,
        num_sites: int,
        *,
        abort: threading.Event,
        poll_seconds: float = 0.1,  # what Flower's own send_and_receive waits
        node_timeout: float = 120.0,
    ) -> None:
        self.grid = grid
        self.num_sites = num_sites
        self.abort = abort
        self.poll_seconds = poll_seconds
        self.node_of = self._node_map(node_timeout)

    def _node_ids(self, timeout: float) -> set[int]:
        """Wait until every virtual node has registered (they do so after the ServerApp starts)."""
        deadline = time.monotonic() + timeout
        while True:
            ids = set(self.grid.get_node_ids())
            if len(ids) >= self.num_sites:
                return ids
            if self.abort.is_set():
                raise RunAborted("interrupted")
            if time.monotonic() > deadline:
                raise ConfideError(
                    f"only {len(ids)} of {self.num_sites} simulated nodes registered in "
                    f"{timeout:.0f} s. Fix: run fewer sites, or on a less busy machine"
                )
            time.sleep(0.05)

    def _node_map(self, timeout: float) -> list[int]:
        """Node id of each partition: from the link state's registration order, else asked."""
        ids = self._node_ids(timeout)
        state = getattr(self.grid, "state", None)
        info = getattr(state, "get_node_info", None)
        if callable(info):
            ordered = [n.node_id for n in info() if n.node_id in ids]
            if len(ordered) == self.num_sites:
                return ordered
        return self._ask_partitions(sorted(ids))

    def _ask_partitions(self, ids: Sequence[int]) -> list[int]:
        messages = [
            Message(RecordDict(), dst_node_id=node, message_type=PARTITION_QUERY, group_id="0")
            for node in ids
        ]
        node_of: dict[int, int] = {}
        for reply in self._send(messages, lambda: None).values():
            partition = stamped_partition(reply)
            if partition is not None:
                node_of[partition] = reply.metadata.src_node_id
        missing = [p for p in range(self.num_sites) if p not in node_of]
        if missing:
            raise NodeMapError(
                f"{len(missing)} partition(s) have no node (first: {missing[0]}). Fix: report "
                "this with the Flower version; the simulation did not start every node"
            )
        return [node_of[p] for p in range(self.num_sites)]

    def _send(self, messages: Sequence[Message], advance: Callable[[], None]) -> dict[str, Message]:
        """Push, then pull until every message has its reply; replies keyed by message id."""
        ids = list(self.grid.push_messages(messages))
        pending = set(ids)
        replies: dict[str, Message] = {}
        while pending:
            if self.abort.is_set():
                raise RunAborted("interrupted")
            got = list(self.grid.pull_messages(list(pending)))
            for reply in got:
                key = reply.metadata.reply_to_message_id
                if key in pending:
                    pending.discard(key)
                    replies[key] = reply
                    advance()
            if pending and not got:
                time.sleep(self.poll_seconds)
        return replies

    def exchange(
        self,
        sites: Sequence[int],
        message_type: str,
        content: RecordDict,
        server_round: int,
        advance: Callable[[], None],
    ) -> dict[int, Reply]:
        messages = [
            Message(
                content,
                dst_node_id=self.node_of[site],
                message_type=message_type,
                group_id=str(server_round),
            )
            for site in sites
        ]
        by_id = self._send(messages, advance)
        replies: dict[int, Reply] = {}
        for site, msg in zip(sites, messages, strict=True):
            reply = by_id.get(msg.metadata.message_id)
            if reply is None:
                replies[site] = "no reply from the simulation engine"
                continue
            got = stamped_partition(reply)
            if got is not None and got != site:
                raise NodeMapError(
                    f"node {self.node_of[site]} answered as partition {got}, addressed as "
                    f"{site}. Fix: report this with the Flower version; the engine's node "
                    "order is not the registration order"
                )
            replies[site] = reply
        return replies


# --- Ray and Flower set-up --------------------------------------------------------------


def backend_config(cfg: SimRunConfig) -> dict[str, Any]:
    """Flower's ``backend_config`` for ``cfg``: ``ray_cpus`` (default: every core)."""
    return ray_backend(cfg.ray_cpus or os.cpu_count() or 1)


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage().lower()


@contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower at warning without its deprecation notes; no telemetry unless asked for."""
    from flwr.supercore import telemetry

    logger = logging.getLogger("flwr")
    level, drop = logger.level, _DropDeprecation()
    logger.setLevel(logging.WARNING)
    logger.addFilter(drop)
    telemetry_was = telemetry.FLWR_TELEMETRY_ENABLED
    if "FLWR_TELEMETRY_ENABLED" not in os.environ:  # a privacy tool does not phone home
        telemetry.FLWR_TELEMETRY_ENABLED = "0"
    pythonpath = os.environ.get("PYTHONPATH")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(drop)
        telemetry.FLWR_TELEMETRY_ENABLED = telemetry_was
        # Flower's Ray backend grows PYTHONPATH by this process's sys.path on every start.
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath


def shutdown_ray(timeout: float = 30.0) -> bool:
    """Stop Ray if it still runs; gives up after ``timeout`` seconds instead of hanging."""
    import ray

    if not ray.is_initialized():
        return True
    done = threading.Thread(target=ray.shutdown, name="confide-ray-shutdown", daemon=True)
    done.start()
    done.join(timeout)
    if done.is_alive():
        log.warning("Ray did not shut down within %.0f s; leaving it to exit with Python", timeout)
        return False
    return True


# --- the engine -------------------------------------------------------------------------


class RayEngine(SimEngine):
    """Runs a federation on Flower's simulation engine (Ray), with Confide's server logic."""

    def __init__(self, cfg: SimRunConfig, *, torch_threads: int = 1, **kwargs: Any) -> None:
        require_ray()
        super().__init__(cfg, **kwargs)
        self.site_app = SimSiteApp(self.app, self.driver.run_config, torch_threads)

    def run(self) -> SimResult:
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation

        outcome: dict[str, SimResult] = {}
        abort = threading.Event()
        server = ServerApp()

        @server.main()
        def _main(grid: Grid, context: Context) -> None:
            link = GridLink(grid, self.cfg.sites, abort=abort)
            outcome["result"] = self.driver.run(link, engine="ray")

        with _quiet_flower():
            try:
                run_simulation(
                    server_app=server,
                    client_app=self.site_app,
                    num_supernodes=self.cfg.sites,
                    backend_config=backend_config(self.cfg),
                )
            except KeyboardInterrupt:
                abort.set()  # the ServerApp thread stops at its next poll
                raise
            finally:
                shutdown_ray()
        if "result" not in outcome:
            raise ConfideError(
                "Flower's simulation ended without a result. Fix: rerun with fewer sites or "
                "--engine inprocess to see the error"
            )
        return outcome["result"]


def run_ray(cfg: SimRunConfig, **kwargs: Any) -> SimResult:
    """Run a simulated federation on Flower's simulation engine; see :class:`RayEngine`."""
    return RayEngine(cfg, **kwargs).run()
