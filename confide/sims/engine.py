"""In-process engine: the server logic and N Flower ClientApp instances in one Python process.

Sites are driven one after another through the very ``ClientApp.__call__`` that
Flower's runtimes use, with a ``Context`` per site carrying Flower's simulation
``node_config`` (``partition-id`` / ``num-partitions``). That keeps the engine honest:
an app that runs here runs under ``flwr run`` and under Flower's Ray engine unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from confide.client.apps import make_client_app
from confide.client.models import build_model, get_weights, set_weights
from confide.client.training import evaluate
from confide.errors import ConfideError
from confide.privacy.secagg import SecAggAborted
from confide.privacy.secagg.federated import (
    apply_mean_update,
    flatten_update,
    round_config,
    secure_mean,
    update_dim,
)
from confide.server.history import History, RoundRecord
from confide.server.strategy import (
    SiteResult,
    Weights,
    make_strategy,
    select_sites,
    weighted_metrics,
)
from confide.sims.config import SimRunConfig
from confide.sims.privacy import SimPrivacy
from confide.sims.report import plot_history
from confide.wire import NUM_EXAMPLES


class BudgetsExhausted(ConfideError, RuntimeError):
    """Too few simulated sites have privacy budget left for the next round."""


class RoundFailed(ConfideError, RuntimeError):
    """No selected site returned a usable result, so the round cannot be aggregated."""


@dataclass
class SimResult:
    """What a simulated federation produced."""

    history: History
    weights: Weights
    out_dir: Path
    history_path: Path
    plot_path: Path
    model_path: Path


def _arrays(names: Sequence[str], weights: Weights) -> ArrayRecord:
    return ArrayRecord(
        {n: Array(np.ascontiguousarray(w)) for n, w in zip(names, weights, strict=True)}
    )


def _metric(record: MetricRecord, key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def run_config_for(cfg: SimRunConfig) -> dict[str, Any]:
    """The Flower ``run_config`` every simulated site receives (only set values)."""
    values: dict[str, Any] = {
        "partition": cfg.data_settings().partition,
        "seed": cfg.seed,
        "eval-fraction": cfg.eval_fraction,
        "model": cfg.model_name,
    }
    if cfg.data_dir is not None:
        values["data-dir"] = str(cfg.data_dir)
    if cfg.max_samples_per_site is not None:
        values["max-samples-per-site"] = cfg.max_samples_per_site
    if cfg.dp.enabled:  # a simulation is reproducible from its seed, DP noise included
        values["dp-noise-seed"] = cfg.seed
    return values


def train_config_for(cfg: SimRunConfig, server_round: int) -> ConfigRecord:
    """Training hyper-parameters sent with each train message (task defaults filled in)."""
    task = cfg.task_spec
    config: dict[str, Any] = {
        "server-round": server_round,
        "lr": (cfg.lr if cfg.lr is not None else task.lr) * cfg.lr_decay ** (server_round - 1),
        "momentum": cfg.momentum if cfg.momentum is not None else task.momentum,
        "local-epochs": cfg.local_epochs or task.local_epochs,
        "batch-size": cfg.batch_size or task.batch_size,
    }
    if cfg.max_steps is not None:
        config["max-steps"] = cfg.max_steps
    return ConfigRecord(config)


def instruction(
    content: RecordDict, node_id: int, message_type: str, server_round: int, message_id: str
) -> Message:
    """A server-to-site message with the metadata a SuperLink would stamp on it.

    Flower's convenience constructor reads a process-global task identity that only
    its own runtimes set; stamping the metadata here keeps the engine free of globals.
    """
    metadata = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    return Message(content, metadata=metadata)  # type: ignore[call-overload,no-any-return]


class InProcessEngine:
    """Runs a federation described by a :class:`SimRunConfig` inside this process."""

    def __init__(
        self,
        cfg: SimRunConfig,
        *,
        app: ClientApp | None = None,
        console: Console | None = None,
        show_progress: bool = True,
        on_round: Callable[[RoundRecord], None] | None = None,
        stop_when: Callable[[RoundRecord], bool] | None = None,
    ) -> None:
        cfg.check_secure_aggregation()
        self.cfg = cfg
        self.app = app if app is not None else make_client_app(cfg.task)
        self.console = console if console is not None else Console(stderr=True)
        self.show_progress = show_progress
        self.on_round = on_round
        self.stop_when = stop_when
        self.rng = np.random.default_rng([cfg.seed, 2024])
        self._sent = 0
        run_config = run_config_for(cfg)
        self.contexts = [
            Context(
                run_id=1,
                node_id=i + 1,
                node_config={"partition-id": i, "num-partitions": cfg.sites},
                state=RecordDict(),
                run_config=run_config,
            )
            for i in range(cfg.sites)
        ]
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model_name)
        self.names = list(model.state_dict().keys())
        self.weights: Weights = get_weights(model)
        self.strategy = make_strategy(cfg.strategy, cfg.server_lr)
        self.test_set = cfg.task_spec.test_data(cfg.data_settings()) if cfg.central_eval else None
        self.dp = SimPrivacy(cfg) if cfg.dp.enabled else None

    # --- one site ---------------------------------------------------------------------

    def _call(
        self, site: int, message_type: str, content: RecordDict, server_round: int
    ) -> Message:
        self._sent += 1
        msg = instruction(
            content, site + 1, message_type, server_round, f"{server_round}-{site}-{self._sent}"
        )
        return self.app(msg, self.contexts[site])

    def _central_eval(self, record: RoundRecord) -> None:
        if self.test_set is None:
            return
        model = build_model(self.cfg.model_name)
        set_weights(model, self.weights)
        result = evaluate(model, self.test_set)
        record.test_loss, record.test_accuracy = result.loss, result.accuracy

    # --- one round --------------------------------------------------------------------

    def _train_round(
        self, server_round: int, record: RoundRecord, progress: Progress | None
    ) -> None:
        cfg = self.cfg
        dp = self.dp
        candidates = list(range(cfg.sites))
        if dp is not None:
            candidates = dp.eligible(candidates, server_round)
            if len(candidates) < cfg.min_sites:
                raise BudgetsExhausted(
                    f"round {server_round}: only {len(candidates)} site(s) have privacy budget "
                    f"left, {cfg.min_sites} needed. Fix: plan fewer rounds or more noise, or "
                    "raise site_epsilon_max"
                )
        selected = [
            candidates[i]
            for i in select_sites(len(candidates), cfg.fraction, cfg.min_sites, self.rng)
        ]
        record.sites_selected = len(selected)
        arrays = _arrays(self.names, self.weights)
        config = train_config_for(cfg, server_round)
        if dp is not None:
            config = ConfigRecord({**dict(config), **dp.round_config(len(selected))})
        bar = (
            progress.add_task(f"round {server_round}/{cfg.rounds} train", total=len(selected))
            if progress is not None
            else None
        )
        results: list[SiteResult] = []
        results_by_site: dict[int, SiteResult] = {}
        metrics: list[tuple[int, dict[str, float]]] = []
        for site in selected:
            content = RecordDict({"arrays": arrays, "config": config})
            try:
                reply = self._call(site, MessageType.TRAIN, content, server_round)
                if reply.has_error():
                    raise RuntimeError(reply.error.reason)
                out = reply.content
                weights = next(iter(out.array_records.values())).to_numpy_ndarrays()
                mrec = next(iter(out.metric_records.values()))
                n = int(mrec[NUM_EXAMPLES])  # type: ignore[arg-type]
                if dp is not None:  # what the site agent does: check, clip, record
                    weights, n = dp.release(
                        site, server_round, dict(config), self.weights, weights, dict(mrec)
                    )
            except Exception as e:  # a failing site is recorded, the round carries on
                record.failures.append(f"site {site}: {type(e).__name__}: {e}")
            else:
                results.append(SiteResult(weights, n))
                results_by_site[site] = results[-1]
                metrics.append(
                    (n, {k: float(v) for k, v in mrec.items() if isinstance(v, (int, float))})
                )
            if progress is not None and bar is not None:
                progress.advance(bar)
        if progress is not None and bar is not None:
            progress.remove_task(bar)
        if not results:
            raise RoundFailed(
                f"round {server_round}: none of the {len(selected)} selected sites returned a "
                f"result; first failure: {record.failures[0] if record.failures else 'unknown'}"
            )
        if cfg.secure_aggregation == "secagg+":
            self.weights = self._secure_aggregate(server_round, selected, results_by_site, record)
        elif dp is not None and dp.aggregator is not None:
            mean = dp.aggregator.client_mean(
                self.weights, [r.weights for r in results], dp.min_survivors(len(selected))
            )
            self.weights = self.strategy.apply(self.weights, mean)
        else:
            self.weights = self.strategy.aggregate(self.weights, results)
        if dp is not None:
            record.dp = dp.round_summary(server_round, sorted(results_by_site), record.failures)
        agg = weighted_metrics(metrics)
        record.sites_succeeded = len(results)
        record.train_examples = sum(r.num_examples for r in results)
        record.train_loss = agg.get("train_loss")
        record.train_accuracy = agg.get("train_accuracy")

    def _secure_aggregate(
        self,
        server_round: int,
        selected: list[int],
        results: dict[int, SiteResult],
        record: RoundRecord,
    ) -> Weights:
        """SecAgg+ over the sites' updates; the strategy sees only their weighted mean.

        The protocol runs in memory through the same client, server and record code as
        over the network; sites that failed to train count as dropped before stage 1.
        """
        cfg = self.cfg
        ids = {site: i + 1 for i, site in enumerate(selected)}  # protocol ids 1..N
        sa = round_config(
            cfg.secagg,
            len(selected),
            update_dim(self.weights),
            federation="simulation",
            rnd=server_round,
        )
        updates = {
            ids[site]: (flatten_update(r.weights, self.weights), r.num_examples)
            for site, r in results.items()
        }
        try:
            agg = secure_mean(sa, updates)
        except SecAggAborted as e:
            raise RoundFailed(f"round {server_round}: secure aggregation aborted: {e}") from e
        record.secure_aggregation = {
            "mode": "full" if sa.full else "secagg+",
            "neighbours": sa.neighbours,
            "threshold": sa.threshold,
            "survivors": len(agg.survivors),
            "dropped": len(agg.dropped),
            "excluded": len(agg.excluded),
            "error_bound": agg.error_bound,
        }
        mean = apply_mean_update(self.weights, agg.mean)
        if self.dp is not None and self.dp.aggregator is not None:
            mean = self.dp.aggregator.secure_mean(
                self.weights, mean, len(agg.survivors), self.dp.min_survivors(len(selected))
            )
        return self.strategy.apply(self.weights, mean)

    def _federated_eval(self, server_round: int, record: RoundRecord) -> None:
        cfg = self.cfg
        fraction = cfg.fraction_evaluate if cfg.fraction_evaluate is not None else cfg.fraction
        sites = select_sites(cfg.sites, fraction, 1, self.rng)
        arrays = _arrays(self.names, self.weights)
        pairs: list[tuple[int, dict[str, float]]] = []
        for site in sites:
            try:
                reply = self._call(
                    site, MessageType.EVALUATE, RecordDict({"arrays": arrays}), server_round
                )
                if reply.has_error():
                    raise RuntimeError(reply.error.reason)
                mrec = next(iter(reply.content.metric_records.values()))
                n = int(mrec[NUM_EXAMPLES])  # type: ignore[arg-type]
            except Exception as e:
                record.failures.append(f"site {site} (evaluate): {type(e).__name__}: {e}")
                continue
            if n > 0:
                pairs.append(
                    (
                        n,
                        {
                            "loss": _metric(mrec, "eval_loss") or math.nan,
                            "accuracy": _metric(mrec, "eval_accuracy") or 0.0,
                        },
                    )
                )
        agg = weighted_metrics(pairs)
        record.eval_examples = sum(n for n, _ in pairs)
        record.eval_loss = agg.get("loss")
        record.eval_accuracy = agg.get("accuracy")

    # --- the whole run ----------------------------------------------------------------

    def run(self) -> SimResult:
        cfg = self.cfg
        out_dir = cfg.out_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        history = History(
            task=cfg.task,
            strategy=cfg.strategy,
            meta={
                "config": json.loads(cfg.model_dump_json()),
                "model": cfg.model_name,
                "parameters": int(sum(w.size for w in self.weights)),
            },
        )
        history_path = out_dir / "history.json"
        (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))

        initial = RoundRecord(round=0)
        self._central_eval(initial)
        history.add(initial)
        self._report(initial)

        progress = self._progress()
        with progress if progress is not None else contextlib.nullcontext():
            overall = progress.add_task("federation", total=cfg.rounds) if progress else None
            for server_round in range(1, cfg.rounds + 1):
                start = time.perf_counter()
                record = RoundRecord(round=server_round)
                self._train_round(server_round, record, progress)
                self._federated_eval(server_round, record)
                self._central_eval(record)
                record.seconds = time.perf_counter() - start
                history.add(record)
                history.save(history_path)  # after every round: a crash keeps what was done
                self._report(record)
                if progress is not None and overall is not None:
                    progress.advance(overall)
                if self.stop_when is not None and self.stop_when(record):
                    history.meta["stopped_early_at"] = server_round
                    break

        history.save(history_path)
        if self.dp is not None:
            history.meta["dp"] = self.dp.write_ledger(out_dir / "ledger.db")
            history.save(history_path)
        plot_path = plot_history(history, out_dir / "metrics.png")
        model = build_model(cfg.model_name)
        set_weights(model, self.weights)
        model_path = out_dir / "model.pt"
        torch.save(model.state_dict(), model_path)
        return SimResult(history, self.weights, out_dir, history_path, plot_path, model_path)

    def _progress(self) -> Progress | None:
        if not self.show_progress:
            return None
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )

    def _report(self, r: RoundRecord) -> None:
        if self.on_round is not None:
            self.on_round(r)
        if not self.show_progress:
            return
        parts = [f"round {r.round:>3}/{self.cfg.rounds}"]
        for label, value in (
            ("train loss", r.train_loss),
            ("train acc", r.train_accuracy),
            ("site eval acc", r.eval_accuracy),
            ("test loss", r.test_loss),
            ("test acc", r.test_accuracy),
        ):
            if value is not None:
                parts.append(
                    f"{label} {100 * value:5.1f}%" if "acc" in label else f"{label} {value:.3f}"
                )
        if r.round > 0:
            parts.append(f"{r.sites_succeeded}/{r.sites_selected} sites")
            if r.secure_aggregation is not None:
                parts.append(f"secagg ±{r.secure_aggregation['error_bound']:.1e}")
            if r.dp is not None:
                parts.append(f"ε≤{r.dp['epsilon_max_site']:.2f}")
            parts.append(f"{r.seconds:.1f} s")
        if r.failures:
            parts.append(f"[yellow]{len(r.failures)} failure(s): {r.failures[0]}[/yellow]")
        self.console.print("  ".join(parts))


def run_inprocess(cfg: SimRunConfig, **kwargs: Any) -> SimResult:
    """Run a simulated federation in this process; see :class:`InProcessEngine`."""
    return InProcessEngine(cfg, **kwargs).run()
