"""A tiny Flower app for simulations: logistic regression on synthetic data, two flavours.

Each site draws its own data from its ``partition-id`` and the run's ``seed`` (no files,
nothing to download), so a federation of 10,000 sites costs nothing to set up. Two
flavours of the same client, both ordinary Flower code that runs unchanged under
``flwr run``, Flower's simulation engine and ``confide sim run``:

* ``logreg:app``: a classic ``NumPyClient`` wrapped in ``ClientApp(client_fn=...)``;
* ``logreg:message_app``: a message-API ``ClientApp`` (``@app.train()`` / ``@app.evaluate()``).

``logreg:initial`` returns the first global model as a list of NumPy arrays::

    confide sim run --app logreg:app --app-dir examples/apps --initial logreg:initial \\
        --sites 1000 --fraction 0.01 --rounds 2 --engine ray
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

FEATURES = 8
SAMPLES = 64  # per site, unless the run config sets max-samples-per-site


def initial() -> list[np.ndarray]:
    """The first global model: zero weights and bias."""
    return [np.zeros(FEATURES, np.float32), np.zeros(1, np.float32)]


def site_data(context: Context) -> tuple[np.ndarray, np.ndarray]:
    """This site's synthetic examples: a shared true model, site-specific inputs and noise."""
    seed = int(context.run_config.get("seed", 0))
    pid = int(context.node_config.get("partition-id", 0))
    n = int(context.run_config.get("max-samples-per-site", SAMPLES))
    truth = np.random.default_rng([seed, 99]).normal(size=FEATURES)
    rng = np.random.default_rng([seed, pid])
    x = rng.normal(loc=0.3 * rng.normal(size=FEATURES), size=(n, FEATURES))
    y = (x @ truth + 0.5 * rng.normal(size=n) > 0).astype(np.float64)
    return x, y


def _loss_acc(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
    eps = 1e-12
    loss = -float(np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
    return loss, float(np.mean((p > 0.5) == (y > 0.5)))


def fit(
    weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, config: dict[str, Any]
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Full-batch gradient descent for ``local-epochs`` steps (default 5) at ``lr`` (0.5)."""
    w, b = weights[0].astype(np.float64), float(weights[1][0])
    lr = float(config.get("lr", 0.5))
    for _ in range(int(config.get("local-epochs", 5))):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        w = w - lr * (x.T @ (p - y)) / len(y)
        b = b - lr * float(np.mean(p - y))
    loss, acc = _loss_acc(w, b, x, y)
    return [w.astype(np.float32), np.array([b], np.float32)], {
        "train_loss": loss,
        "train_accuracy": acc,
    }


class LogRegClient(NumPyClient):
    """The classic flavour."""

    def __init__(self, context: Context) -> None:
        self.x, self.y = site_data(context)

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return initial()

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        weights, metrics = fit(parameters, self.x, self.y, config)
        return weights, len(self.y), dict(metrics)

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        loss, acc = _loss_acc(parameters[0], float(parameters[1][0]), self.x, self.y)
        return loss, len(self.y), {"accuracy": acc}


def client_fn(context: Context) -> Any:
    return LogRegClient(context).to_client()


app = ClientApp(client_fn=client_fn)

message_app = ClientApp()


@message_app.train()
def _train(msg: Message, context: Context) -> Message:
    x, y = site_data(context)
    arrays = msg.content.array_records["arrays"]
    config = dict(msg.content.config_records.get("config", {}))
    weights, metrics = fit(arrays.to_numpy_ndarrays(), x, y, config)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(weights),
            "metrics": MetricRecord({**metrics, "num-examples": len(y)}),
        }
    )
    return Message(reply, reply_to=msg)


@message_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    x, y = site_data(context)
    w, b = msg.content.array_records["arrays"].to_numpy_ndarrays()
    loss, acc = _loss_acc(w, float(b[0]), x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_accuracy": acc, "num-examples": len(y)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
