"""Simulated federations: one round driver (the server logic) and the engines that reach sites.

:class:`RoundDriver` holds everything the coordinator does in a simulated round, once:
selection (with privacy budgets), the train messages, the site agent's DP release,
secure aggregation, the strategy, federated and central evaluation, ``history.json``
after every round, ``metrics.png`` and the final model. It reaches the sites through a
:class:`SiteLink`, one call per round step: "send this content to these sites, give me
their replies". Two links exist:

* :class:`InProcessLink` (``--engine inprocess``, the default) calls the site's Flower
  ``ClientApp.__call__`` itself, one site after another, with a ``Context`` per site that
  carries Flower's simulation ``node_config`` (``partition-id`` / ``num-partitions``);
* the Ray link (``--engine ray``, :mod:`confide.sims.ray_engine`) is a Flower ``ServerApp``
  that runs this same driver and sends through ``Grid`` to the same ``ClientApp`` under
  Flower's simulation engine (``flwr.simulation.run_simulation``).

Everything the driver decides comes from the seed, and replies are taken in selection
order whatever order they arrive in, so the same seed gives the same model on both.
An app that runs here runs under ``flwr run`` and under Flower's Ray engine unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import (
    DEFAULT_TTL,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.clientapp import ClientApp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from confide.client.apps import make_client_app
from confide.client.dialect import AppDialect
from confide.client.models import build_model, get_weights, set_weights
from confide.client.training import evaluate
from confide.errors import ConfideError, ConfigError
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
    WeightAverage,
    Weights,
    make_strategy,
    select_sites,
    weighted_metrics,
)
from confide.sims.config import SimRunConfig
from confide.sims.privacy import SimPrivacy
from confide.sims.report import plot_history, write_run_report
from confide.sims.wirebytes import ArraySpec, round_traffic


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
    report_path: Path | None = None


def run_config_for(cfg: SimRunConfig) -> dict[str, Any]:
    """The Flower ``run_config`` every simulated site receives (only set values)."""
    values: dict[str, Any] = {"seed": cfg.seed, "eval-fraction": cfg.eval_fraction}
    partition = cfg.data_settings().partition
    if partition:
        values["partition"] = partition
    if cfg.model_name:
        values["model"] = cfg.model_name
    if cfg.data_dir is not None:
        values["data-dir"] = str(cfg.data_dir)
    if cfg.max_samples_per_site is not None:
        values["max-samples-per-site"] = cfg.max_samples_per_site
    if cfg.dp.enabled:  # a simulation is reproducible from its seed, DP noise included
        values["dp-noise-seed"] = cfg.seed
    return values


def train_config_for(cfg: SimRunConfig, server_round: int) -> ConfigRecord:
    """Training hyper-parameters sent with each train message (task defaults filled in).

    A user's app without a built-in task gets only the values set in the run.
    """
    task = cfg.task_spec if cfg.task is not None else None
    lr = cfg.lr if cfg.lr is not None else (task.lr if task else None)
    values: dict[str, Any] = {
        "server-round": server_round,
        "lr": None if lr is None else lr * cfg.lr_decay ** (server_round - 1),
        "momentum": cfg.momentum if cfg.momentum is not None else (task and task.momentum),
        "local-epochs": cfg.local_epochs or (task and task.local_epochs),
        "batch-size": cfg.batch_size or (task and task.batch_size),
        "max-steps": cfg.max_steps,
    }
    return ConfigRecord({k: v for k, v in values.items() if v is not None})


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


# --- the two ways a Flower ClientApp speaks ---------------------------------------------


# --- how the driver reaches sites -------------------------------------------------------

#: A site's answer: its reply message, or why there is none ("TypeName: text").
Reply = Message | str


class SiteLink(Protocol):
    """Sends one round step to some sites and returns their replies, keyed by site."""

    def exchange(
        self,
        sites: Sequence[int],
        message_type: str,
        content: RecordDict,
        server_round: int,
        advance: Callable[[], None],
    ) -> dict[int, Reply]:
        """``advance()`` is called once per reply (progress); missing sites failed."""
        ...


class InProcessLink:
    """Calls the ClientApp of each site in this process, one after another.

    Contexts are made on first contact, so a federation of 100,000 sites costs only the
    sites a run selects. Like Flower's simulation engine, a site's ``Context.state``
    outlives rounds.
    """

    def __init__(self, app: ClientApp, run_config: dict[str, Any], num_sites: int) -> None:
        self.app = app
        self.run_config = run_config
        self.num_sites = num_sites
        self.contexts: dict[int, Context] = {}
        self._sent = 0

    def context(self, site: int) -> Context:
        if site not in self.contexts:
            self.contexts[site] = Context(
                run_id=1,
                node_id=site + 1,
                node_config={"partition-id": site, "num-partitions": self.num_sites},
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
        return self.contexts[site]

    def exchange(
        self,
        sites: Sequence[int],
        message_type: str,
        content: RecordDict,
        server_round: int,
        advance: Callable[[], None],
    ) -> dict[int, Reply]:
        replies: dict[int, Reply] = {}
        for site in sites:
            self._sent += 1
            try:
                # A fresh RecordDict per site (records shared): an app may pop from its copy.
                msg = instruction(
                    RecordDict(dict(content)),
                    site + 1,
                    message_type,
                    server_round,
                    f"{server_round}-{site}-{self._sent}",
                )
                replies[site] = self.app(msg, self.context(site))
            except Exception as e:  # a failing site is recorded, the round carries on
                replies[site] = f"{type(e).__name__}: {e}"
            advance()
        return replies


# --- the first global model -------------------------------------------------------------


@dataclass
class InitialModel:
    """The first global weights, their names, and (if there is one) a module to load them in."""

    names: list[str]
    weights: Weights
    module: Callable[[], nn.Module] | None = field(default=None)


def initial_model(cfg: SimRunConfig) -> InitialModel:
    """From ``initial`` (a user's callable), else the built-in ``model`` (or the task's)."""
    torch.manual_seed(cfg.seed)
    if cfg.initial is None:
        name = cfg.model_name
        model = build_model(name)
        return InitialModel(
            list(model.state_dict().keys()), get_weights(model), lambda: build_model(name)
        )
    from confide.client.agent import load_attribute  # the site agent's loader, not a copy

    what = "a callable returning a torch nn.Module or a list of NumPy arrays"
    factory = load_attribute(
        cfg.initial, app_dir=cfg.app_dir, field="initial", fix_name=f"name {what} as module:attr"
    )
    if not callable(factory):
        raise ConfigError("initial", f"{cfg.initial} is a {type(factory).__name__}", f"name {what}")
    value = factory()
    if isinstance(value, nn.Module):
        module = value
        return InitialModel(
            list(module.state_dict().keys()), get_weights(module), lambda: copy.deepcopy(module)
        )
    if isinstance(value, (list, tuple)) and value and all(isinstance(a, np.ndarray) for a in value):
        weights: list[npt.NDArray[Any]] = [np.array(a, copy=True) for a in value]
        return InitialModel([str(i) for i in range(len(weights))], weights)
    raise ConfigError(
        "initial",
        f"{cfg.initial}() returned a {type(value).__name__}",
        "return a torch nn.Module or a non-empty list of NumPy arrays",
    )


def resolve_app(cfg: SimRunConfig) -> ClientApp:
    """The run's ClientApp: the user's ``app`` (loaded like the site agent does) or the task's."""
    if cfg.app is not None:
        from confide.client.agent import load_app  # agent imports this module: load lazily

        return load_app(cfg.app, app_dir=cfg.app_dir)
    return make_client_app(cfg.task_spec.name)


# --- the server logic -------------------------------------------------------------------


class RoundDriver:
    """The coordinator's side of a simulated federation, independent of how sites are reached."""

    def __init__(
        self,
        cfg: SimRunConfig,
        app: ClientApp,
        *,
        console: Console | None = None,
        show_progress: bool = True,
        on_round: Callable[[RoundRecord], None] | None = None,
        stop_when: Callable[[RoundRecord], bool] | None = None,
    ) -> None:
        cfg.check_app()
        cfg.check_secure_aggregation()
        self.cfg = cfg
        self.dialect = AppDialect.of(app)
        self.console = console if console is not None else Console(stderr=True)
        self.show_progress = show_progress
        self.on_round = on_round
        self.stop_when = stop_when
        self.rng = np.random.default_rng([cfg.seed, 2024])
        self._traffic_cache: dict[tuple[int, bool], dict[str, Any]] = {}
        self.run_config = run_config_for(cfg)
        init = initial_model(cfg)
        self.names = init.names
        self.weights: Weights = init.weights
        self.module = init.module
        self.strategy = make_strategy(cfg.strategy, cfg.server_lr)
        self.test_set = (
            cfg.task_spec.test_data(cfg.data_settings())
            if cfg.central_eval and cfg.task is not None and self.module is not None
            else None
        )
        self.dp = SimPrivacy(cfg) if cfg.dp.enabled else None
        self.average = WeightAverage(cfg.server_ema) if cfg.server_ema is not None else None
        self.served: Weights = self.weights  # what is evaluated and exported

    def _central_eval(self, record: RoundRecord) -> None:
        if self.test_set is None or self.module is None:
            return
        model = self.module()
        set_weights(model, self.served)
        result = evaluate(model, self.test_set)
        record.test_loss, record.test_accuracy = result.loss, result.accuracy

    # --- one round --------------------------------------------------------------------

    def _exchange(
        self,
        link: SiteLink,
        sites: Sequence[int],
        message_type: str,
        content: RecordDict,
        server_round: int,
        progress: Progress | None,
        label: str,
    ) -> dict[int, Reply]:
        bar = (
            progress.add_task(f"round {server_round}/{self.cfg.rounds} {label}", total=len(sites))
            if progress is not None
            else None
        )

        def advance() -> None:
            if progress is not None and bar is not None:
                progress.advance(bar)

        try:
            return link.exchange(sites, message_type, content, server_round, advance)
        finally:
            if progress is not None and bar is not None:
                progress.remove_task(bar)

    def _train_round(
        self, link: SiteLink, server_round: int, record: RoundRecord, progress: Progress | None
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
        config = train_config_for(cfg, server_round)
        if dp is not None:
            config = ConfigRecord({**dict(config), **dp.round_config(len(selected))})
        content = self.dialect.train_content(self.names, self.weights, config)
        replies = self._exchange(
            link, selected, MessageType.TRAIN, content, server_round, progress, "train"
        )
        results: list[SiteResult] = []
        results_by_site: dict[int, SiteResult] = {}
        metrics: list[tuple[int, dict[str, float]]] = []
        for site in selected:  # selection order, whatever order the replies came in
            reply = replies.get(site, "no reply")
            if isinstance(reply, str):
                record.failures.append(f"site {site}: {reply}")
                continue
            if reply.has_error():
                record.failures.append(f"site {site}: {reply.error.reason}")
                continue
            try:
                got = self.dialect.train_reply(reply)
                weights, n = got.weights, got.num_examples
                if dp is not None:  # what the site agent does: check, clip, record
                    weights, n = dp.release(
                        site, server_round, dict(config), self.weights, weights, got.metrics
                    )
            except Exception as e:  # a bad reply is recorded, the round carries on
                record.failures.append(f"site {site}: {type(e).__name__}: {e}")
                continue
            results.append(SiteResult(weights, n))
            results_by_site[site] = results[-1]
            metrics.append(
                (
                    got.num_examples,
                    {
                        k: float(v)
                        for k, v in got.metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                    },
                )
            )
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
            # The rounding dither is seeded: a simulation repeats exactly from its seed.
            agg = secure_mean(sa, updates, rounding_seed=(cfg.seed, server_round))
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

    def _federated_eval(
        self, link: SiteLink, server_round: int, record: RoundRecord, progress: Progress | None
    ) -> None:
        cfg = self.cfg
        fraction = cfg.fraction_evaluate if cfg.fraction_evaluate is not None else cfg.fraction
        sites = select_sites(cfg.sites, fraction, 1, self.rng)
        config = ConfigRecord({"server-round": server_round})
        content = self.dialect.evaluate_content(self.names, self.served, config)
        replies = self._exchange(
            link, sites, MessageType.EVALUATE, content, server_round, progress, "evaluate"
        )
        pairs: list[tuple[int, dict[str, float]]] = []
        for site in sites:
            reply = replies.get(site, "no reply")
            if isinstance(reply, str):
                record.failures.append(f"site {site} (evaluate): {reply}")
                continue
            if reply.has_error():
                record.failures.append(f"site {site} (evaluate): {reply.error.reason}")
                continue
            try:
                n, loss, accuracy = self.dialect.evaluate_reply(reply)
            except Exception as e:
                record.failures.append(f"site {site} (evaluate): {type(e).__name__}: {e}")
                continue
            if n > 0:
                pairs.append(
                    (n, {"loss": math.nan if loss is None else loss, "accuracy": accuracy or 0.0})
                )
        agg = weighted_metrics(pairs)
        record.eval_examples = sum(n for n, _ in pairs)
        record.eval_loss = agg.get("loss")
        record.eval_accuracy = agg.get("accuracy")

    # --- the whole run ----------------------------------------------------------------

    def run(self, link: SiteLink, *, engine: str = "inprocess") -> SimResult:
        cfg = self.cfg
        out_dir = cfg.out_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        history = History(
            task=cfg.label,
            strategy=cfg.strategy,
            meta={
                "config": json.loads(cfg.model_dump_json()),
                "model": cfg.model_name or cfg.initial,
                "engine": engine,
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
                self._train_round(link, server_round, record, progress)
                self.served = (
                    self.average.update(self.weights) if self.average is not None else self.weights
                )
                self._federated_eval(link, server_round, record, progress)
                record.traffic = self._modelled_traffic(record)
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
        model_path = self._save_model(out_dir)
        report_path, _ = write_run_report(history, out_dir, self._estimate(history))
        return SimResult(
            history, self.served, out_dir, history_path, plot_path, model_path, report_path
        )

    def _modelled_traffic(self, record: RoundRecord) -> dict[str, Any]:
        """The bytes this round would put on a real coordinator's wire (confide.sims.wirebytes).

        Training: the selected sites; evaluation: the sites that evaluated. Sizes are
        those of the real messages, so a simulation's report is comparable with the
        metered traffic of a networked run.
        """
        key = (record.sites_selected, record.eval_examples > 0)
        if key not in self._traffic_cache:
            specs = [
                ArraySpec(n, np.dtype(w.dtype).newbyteorder("<").str, tuple(w.shape))
                for n, w in zip(self.names, self.weights, strict=True)
            ]
            secagg = self.cfg.secagg if self.cfg.secure_aggregation != "none" else None
            sites = max(1, record.sites_selected)
            t = round_traffic(specs, sites=sites, secagg=secagg, evaluate=key[1])
            self._traffic_cache[key] = {
                "up_bytes": t.up_per_site * record.sites_selected,
                "down_bytes": t.down_per_site * record.sites_selected,
                "messages": t.messages_per_site * record.sites_selected,
                "source": "model",
            }
        return dict(self._traffic_cache[key])

    def _estimate(self, history: History) -> dict[str, Any] | None:
        """The cost model's estimate of this run (the catalog's default profiles), or None."""
        from confide.sims.cost import CostSettings, CustomModel, estimate_run

        trained = [r for r in history.rounds if r.round > 0 and r.sites_succeeded > 0]
        if not trained:
            return None
        examples = max(
            1,
            round(sum(r.train_examples for r in trained) / sum(r.sites_succeeded for r in trained)),
        )
        custom = None
        if not self.cfg.model_name:  # an app's own model: priced by its size
            params = int(sum(w.size for w in self.weights if np.issubdtype(w.dtype, np.floating)))
            custom = CustomModel(parameters=max(1, params))
        try:
            est = estimate_run(self.cfg, CostSettings(model=custom, examples_per_site=examples))
        except ConfideError as e:  # the run's results stand without their price
            self.console.print(f"[yellow]no cost estimate for this run: {e}[/yellow]")
            return None
        return est.to_json()

    def _save_model(self, out_dir: Path) -> Path:
        """``model.pt`` (a state dict) for a torch model, ``model.npz`` for bare arrays."""
        if self.module is not None:
            model = self.module()
            set_weights(model, self.served)
            path = out_dir / "model.pt"
            torch.save(model.state_dict(), path)
            return path
        path = out_dir / "model.npz"
        np.savez(path, **dict(zip(self.names, self.served, strict=True)))  # type: ignore[arg-type]
        return path

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


# --- the engines ------------------------------------------------------------------------


class SimEngine:
    """What every engine holds: the validated config, the sites' ClientApp and the driver."""

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
        cfg.check_app()
        self.cfg = cfg
        self.app = app if app is not None else resolve_app(cfg)
        self.driver = RoundDriver(
            cfg,
            self.app,
            console=console,
            show_progress=show_progress,
            on_round=on_round,
            stop_when=stop_when,
        )


class InProcessEngine(SimEngine):
    """Runs a federation described by a :class:`SimRunConfig` inside this process."""

    def __init__(self, cfg: SimRunConfig, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.link = InProcessLink(self.app, self.driver.run_config, cfg.sites)

    def run(self) -> SimResult:
        return self.driver.run(self.link)


def run_inprocess(cfg: SimRunConfig, **kwargs: Any) -> SimResult:
    """Run a simulated federation in this process; see :class:`InProcessEngine`."""
    return InProcessEngine(cfg, **kwargs).run()


def run_simulation(cfg: SimRunConfig, **kwargs: Any) -> SimResult:
    """Run ``cfg`` on the engine it names (``inprocess`` or ``ray``); same arguments."""
    if cfg.engine == "ray":
        from confide.sims.ray_engine import run_ray  # Ray is an optional extra

        return run_ray(cfg, **kwargs)
    return run_inprocess(cfg, **kwargs)
