"""Flower's two ClientApp dialects: the message API and the legacy ``NumPyClient`` adapter.

A site may bring any Flower ClientApp: one written with the message API
(``@app.train()``, ``@app.evaluate()``) or a ``ClientApp(client_fn=...)`` around a
``NumPyClient``. They read and write different records; :class:`AppDialect` speaks to
each in its own, for the simulator's round driver and for the site agent alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.typing import EvaluateIns
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)

from confide.wire import NUM_EXAMPLES


def _arrays(names: Sequence[str], weights: list[npt.NDArray[Any]]) -> ArrayRecord:
    return ArrayRecord(
        {n: Array(np.require(w, requirements="C")) for n, w in zip(names, weights, strict=True)}
    )


def _number(metrics: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


@dataclass(frozen=True)
class TrainReply:
    """A site's train reply, whichever API its app speaks."""

    weights: list[npt.NDArray[Any]]
    num_examples: int
    metrics: dict[str, Any]


class AppDialect:
    """How to talk to one ClientApp: Flower's message API, or a legacy ``NumPyClient``.

    Message-API apps (``@app.train()``) get ``{"arrays", "config"}`` and answer with one
    ``ArrayRecord`` and a ``MetricRecord`` holding ``num-examples``, as Flower's own
    strategies expect. A ``ClientApp(client_fn=...)`` around a ``NumPyClient`` only
    understands the legacy ``fitins.*`` / ``evaluateins.*`` records; Flower's own adapter
    converts them, and this class speaks them.
    """

    def __init__(self, legacy: bool) -> None:
        self.legacy = legacy

    @classmethod
    def of(cls, app: ClientApp) -> AppDialect:
        return cls(_speaks_legacy(app))

    def train_content(
        self, names: Sequence[str], weights: list[npt.NDArray[Any]], config: ConfigRecord
    ) -> RecordDict:
        if self.legacy:
            fitins = FitIns(ndarrays_to_parameters(weights), dict(config))  # type: ignore[arg-type]
            return fitins_to_recorddict(fitins, keep_input=True)
        return RecordDict({"arrays": _arrays(names, weights), "config": config})

    def evaluate_content(
        self, names: Sequence[str], weights: list[npt.NDArray[Any]], config: ConfigRecord
    ) -> RecordDict:
        if self.legacy:
            ins = EvaluateIns(ndarrays_to_parameters(weights), dict(config))  # type: ignore[arg-type]
            return evaluateins_to_recorddict(ins, keep_input=True)
        return RecordDict({"arrays": _arrays(names, weights), "config": config})

    def train_reply(self, reply: Message) -> TrainReply:
        content = reply.content
        if self.legacy:
            res = recorddict_to_fitres(content, keep_input=False)
            n = int(res.num_examples)
            return TrainReply(
                parameters_to_ndarrays(res.parameters), n, {**res.metrics, NUM_EXAMPLES: n}
            )
        arrays = next(iter(content.array_records.values()), None)
        metrics = next(iter(content.metric_records.values()), None)
        if arrays is None or metrics is None or NUM_EXAMPLES not in metrics:
            raise ValueError(
                f"a train reply needs an ArrayRecord and a MetricRecord with {NUM_EXAMPLES!r}"
            )
        n = int(metrics[NUM_EXAMPLES])  # type: ignore[arg-type]
        return TrainReply(arrays.to_numpy_ndarrays(), n, dict(metrics))

    def evaluate_reply(self, reply: Message) -> tuple[int, float | None, float | None]:
        """``(num_examples, loss, accuracy)`` of an evaluate reply."""
        if self.legacy:
            res = recorddict_to_evaluateres(reply.content)
            metrics = dict(res.metrics)
            return (
                int(res.num_examples),
                float(res.loss),
                _number(metrics, "accuracy", "eval_accuracy", "eval_acc"),
            )
        record = next(iter(reply.content.metric_records.values()), None)
        if record is None or NUM_EXAMPLES not in record:
            raise ValueError(f"an evaluate reply needs a MetricRecord with {NUM_EXAMPLES!r}")
        values = dict(record)
        return (
            int(record[NUM_EXAMPLES]),  # type: ignore[arg-type]
            _number(values, "eval_loss", "loss"),
            _number(values, "eval_accuracy", "eval_acc", "accuracy"),
        )

    def modern_reply(self, reply: Message, train: bool, names: Sequence[str]) -> RecordDict:
        """A reply as message-API records: ``{"arrays", "metrics"}`` (train) or ``{"metrics"}``.

        The site agent reads every reply this way, whichever dialect its app speaks.
        Evaluation metrics are named ``eval_loss`` / ``eval_accuracy`` as the built-in
        apps name them.
        """
        if not self.legacy:
            return reply.content
        if train:
            got = self.train_reply(reply)
            metrics: dict[str, Any] = {
                k: v
                for k, v in got.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            return RecordDict(
                {"arrays": _arrays(names, got.weights), "metrics": MetricRecord(metrics)}
            )
        n, loss, accuracy = self.evaluate_reply(reply)
        values: dict[str, Any] = {NUM_EXAMPLES: n}
        if loss is not None:
            values["eval_loss"] = loss
        if accuracy is not None:
            values["eval_accuracy"] = accuracy
        return RecordDict({"metrics": MetricRecord(values)})


def _speaks_legacy(app: ClientApp) -> bool:
    """Whether ``app`` was built as ``ClientApp(client_fn=...)`` (Flower's legacy adapter).

    Message-API apps register handlers and leave ``_call`` unset; ``client_fn`` apps set it
    to Flower's adapter function (wrapped by their mods). An app whose ``_call`` defers to
    another ClientApp (a hand-written wrapper) speaks what that app speaks.
    """
    call = getattr(app, "_call", None)
    if call is None:
        return False
    stack: list[Any] = [call]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ClientApp):
            return _speaks_legacy(obj)
        if getattr(obj, "__qualname__", "") == "ClientApp.__init__.<locals>.ffn":
            return True
        for cell in getattr(obj, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                stack.append(cell.cell_contents)
    return False


__all__ = ["AppDialect", "TrainReply"]
