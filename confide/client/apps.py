"""The built-in tasks as ordinary Flower apps: a message-API ``ClientApp`` and a ``NumPyClient``.

Nothing here is Confide-specific at the edge: ``flwr run``, Flower's simulation
engine, Confide's in-process engine and the Confide site agent all load these the same
way (``confide.client.apps:mnist_cnn``). The site reads which part of the data it
holds from ``context.node_config`` (``partition-id`` / ``num-partitions``, as in Flower's
simulation) and how the data is laid out from ``context.run_config``; the training
hyper-parameters arrive with each train message in its ``config`` record.

``run_config`` keys (all optional): ``data-dir``, ``partition``, ``seed``,
``max-samples-per-site``, ``eval-fraction``, ``model``, ``dp-noise-seed`` (simulations only:
makes DP-SGD's sampling and noise reproducible, and therefore removable by whoever knows
it; a real site leaves it unset and draws both from the operating system's entropy).
A train ``config`` carrying ``dp.sgd.*`` keys (see ``confide.privacy.dp.federated``) makes
the built-in apps train with Opacus DP-SGD exactly as planned and report what they spent.
Train ``config`` keys (all optional, task defaults otherwise): ``lr``, ``momentum``,
``local-epochs``, ``batch-size``, ``max-steps``, ``server-round``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Scalar
from torch import nn

from confide.client.models import build_model, get_weights, set_weights
from confide.client.tasks import DataSettings, SiteData, Task, get_task
from confide.client.training import evaluate, train
from confide.errors import ConfigError
from confide.privacy.dp import federated as dpfed
from confide.wire import NUM_EXAMPLES

#: ``Context.state`` record where a site's ClientApp keeps its DP-SGD events across rounds.
DP_STATE = "confide.dp"


def data_settings(context: Context) -> tuple[DataSettings, int]:
    """Data layout and this site's partition id, read from a Flower ``Context``."""
    node = context.node_config
    run = context.run_config
    try:
        pid = int(node.get("partition-id", 0))
        num = int(node.get("num-partitions", 1))
    except (TypeError, ValueError):
        raise ConfigError(
            "node_config",
            "partition-id / num-partitions are not integers",
            "set them as integers in the node config",
        ) from None
    max_samples = run.get("max-samples-per-site")
    data_dir = run.get("data-dir")
    settings = DataSettings(
        data_dir=str(data_dir) if data_dir else None,
        partition=str(run.get("partition", "")),
        num_sites=num,
        seed=int(run.get("seed", 0)),
        max_samples_per_site=int(max_samples) if max_samples else None,
        eval_fraction=float(run.get("eval-fraction", 0.1)),
    )
    return settings, pid


class TaskRunner:
    """One site's model and data for a task; the shared body of both app flavours."""

    def __init__(self, task: Task, context: Context) -> None:
        self.task = task
        self.settings, self.partition_id = data_settings(context)
        self.model_name = str(context.run_config.get("model", task.model))
        if self.model_name not in task.models:
            raise ConfigError(
                "model",
                f"{self.model_name!r} is not a model of task {task.name}",
                f"use one of: {', '.join(task.models)}",
            )
        self.seed = self.settings.seed
        # DP-SGD's batch sampling and noise must be secret: anyone who can regenerate them
        # can subtract the noise. Only simulations (and tests) pin them, via this key.
        noise_seed = context.run_config.get("dp-noise-seed")
        self.dp_noise_seed = None if noise_seed is None else int(noise_seed)
        self._data: SiteData | None = None

    @property
    def data(self) -> SiteData:
        if self._data is None:
            self._data = self.task.site_data(self.settings, self.partition_id)
        return self._data

    def model(self, weights: list[np.ndarray] | None = None) -> nn.Module:
        model = build_model(self.model_name)
        if weights is not None:
            set_weights(model, weights)
        return model

    def fit(
        self, weights: list[np.ndarray], config: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, float]]:
        plan = dpfed.sgd_from_config(config)
        if plan is not None:
            return self.fit_private(weights, config, plan)
        model = self.model(weights)
        server_round = int(config.get("server-round", 0))
        max_steps = config.get("max-steps")
        result = train(
            model,
            self.data.train,
            epochs=int(config.get("local-epochs", self.task.local_epochs)),
            batch_size=int(config.get("batch-size", self.task.batch_size)),
            lr=float(config.get("lr", self.task.lr)),
            momentum=float(config.get("momentum", self.task.momentum)),
            # A different shuffle every round and every site, reproducible from the seed.
            seed=self.seed * 1_000_003 + server_round * 10_007 + self.partition_id,
            max_steps=int(max_steps) if max_steps else None,
        )
        metrics = {
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            "train_seconds": result.seconds,
            "train_steps": float(result.steps),
        }
        return get_weights(model), result.num_examples, metrics

    def fit_private(
        self, weights: list[np.ndarray], config: Mapping[str, Any], plan: dpfed.SgdPlan
    ) -> tuple[list[np.ndarray], int, dict[str, float]]:
        """Example-level DP-SGD (Opacus) exactly as the round's plan says: σ, q, steps, C.

        The reply reports what was applied (``dp.*`` metrics); the site agent records it in
        the site's privacy ledger before the result leaves the site.
        """
        from confide.privacy.dp.sgd import train_private

        model = build_model(self.model_name, dp=True)
        set_weights(model, weights)
        server_round = int(config.get("server-round", 0))
        result = train_private(
            model,
            self.data.train,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            clip_norm=plan.clip_norm,
            lr=float(config.get("lr", self.task.lr)),
            momentum=float(config.get("momentum", self.task.momentum)),
            seed=(
                secrets.randbits(62)
                if self.dp_noise_seed is None
                else self.dp_noise_seed * 1_000_003 + server_round * 10_007 + self.partition_id
            ),
        )
        metrics: dict[str, float] = {
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            "train_seconds": result.seconds,
            "train_steps": float(result.steps),
            **dpfed.sgd_reply_metrics(plan, result.steps, result.num_examples),
        }
        return get_weights(model), result.num_examples, metrics

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, int, dict[str, float]]:
        result = evaluate(self.model(weights), self.data.eval)
        return result.loss, result.num_examples, {"eval_accuracy": result.accuracy}


class TaskClient(NumPyClient):
    """The task as a classic Flower ``NumPyClient``."""

    def __init__(self, task: Task, context: Context) -> None:
        self.runner = TaskRunner(task, context)

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
        return get_weights(self.runner.model())

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        weights, n, metrics = self.runner.fit(parameters, config)
        return weights, n, dict(metrics)

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        loss, n, metrics = self.runner.evaluate(parameters)
        return loss, n, dict(metrics)


def make_numpy_client_app(task_name: str) -> ClientApp:
    """A ``ClientApp`` wrapping :class:`TaskClient` through Flower's own adapter."""
    task = get_task(task_name)

    def client_fn(context: Context) -> Any:
        return TaskClient(task, context).to_client()

    return ClientApp(client_fn=client_fn)


def make_client_app(task_name: str) -> ClientApp:
    """A message-API ``ClientApp`` for a built-in task (train and evaluate handlers)."""
    task = get_task(task_name)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        runner = TaskRunner(task, context)
        arrays = msg.content.array_records["arrays"]
        config = msg.content.config_records.get("config", ConfigRecord())
        weights, n, metrics = runner.fit(arrays.to_numpy_ndarrays(), dict(config))
        _remember_dp(context, metrics, config)
        names = list(arrays.keys())
        reply = RecordDict(
            {
                "arrays": ArrayRecord(dict(zip(names, _as_arrays(weights), strict=True))),
                "metrics": MetricRecord({**metrics, NUM_EXAMPLES: n}),
            }
        )
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        runner = TaskRunner(task, context)
        arrays = msg.content.array_records["arrays"]
        loss, n, metrics = runner.evaluate(arrays.to_numpy_ndarrays())
        reply = RecordDict(
            {"metrics": MetricRecord({"eval_loss": loss, **metrics, NUM_EXAMPLES: n})}
        )
        return Message(reply, reply_to=msg)

    return app


def _remember_dp(context: Context, metrics: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Keep this round's DP-SGD event in ``context.state``: the app's own accountant state.

    The state outlives rounds (Flower keeps ``Context.state`` per node for the whole run,
    and so does the site agent), so costs compose and are never reset between rounds. The
    site agent's ledger is the authoritative record; this copy serves plain Flower runs.
    """
    if dpfed.SGD_NOISE not in metrics:
        return
    plan = dpfed.plan_from_config(config, int(config.get("server-round", 0)))
    if plan is None or plan.sgd is None:
        return
    event = dpfed.sgd_event_from_metrics(plan, metrics)
    record = context.state.config_records.get(DP_STATE, ConfigRecord({"events": "[]"}))
    events = dpfed.events_from_json(str(record["events"]))
    events.append(event.to_dict())
    context.state.config_records[DP_STATE] = ConfigRecord(
        {"events": json.dumps(events, sort_keys=True), "steps": sum(e["steps"] for e in events)}
    )


def dp_events_of(context: Context) -> list[dict[str, Any]]:
    """The DP-SGD events a built-in app has recorded in ``context.state`` (oldest first)."""
    record = context.state.config_records.get(DP_STATE)
    return [] if record is None else dpfed.events_from_json(str(record["events"]))


def _as_arrays(weights: list[np.ndarray]) -> list[Array]:
    return [Array(np.require(w, requirements="C")) for w in weights]


# module:attribute names for `flwr run`, the site agent and `confide sim run --app`.
mnist_cnn = make_client_app("mnist-cnn")
shakespeare_lstm = make_client_app("shakespeare-lstm")
shakespeare_transformer = make_client_app("shakespeare-transformer")
credit_lstm = make_client_app("credit-lstm")
credit_transformer = make_client_app("credit-transformer")
mnist_cnn_numpy = make_numpy_client_app("mnist-cnn")
