"""Metrics history of a federation: one record per round, saved as JSON and plotted."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RoundRecord:
    """What happened in one round. Round 0 is the initial model, before any training."""

    round: int
    sites_selected: int = 0
    sites_succeeded: int = 0
    train_loss: float | None = None
    train_accuracy: float | None = None
    train_examples: int = 0
    # Federated evaluation: the sites evaluate the new global model on their own data.
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_examples: int = 0
    # Central evaluation on a held-out test set (simulations only: a real
    # coordinator has no data of its own).
    test_loss: float | None = None
    test_accuracy: float | None = None
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    # Secure aggregation of the round, when on: k, t, survivors, dropped, error bound.
    secure_aggregation: dict[str, Any] | None = None
    # DP rounds: ε spent so far per site that took part (PRV), refusals, client clip norm.
    dp: dict[str, Any] | None = None
    # Bytes on the wire during the round, as the coordinator's gRPC meter counted them
    # (messages + 5-byte prefixes): up_bytes, down_bytes, messages, by_method.
    traffic: dict[str, Any] | None = None


@dataclass
class History:
    """Per-round records plus the run's identity, serialisable to ``history.json``."""

    task: str
    strategy: str
    rounds: list[RoundRecord] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, record: RoundRecord) -> None:
        self.rounds.append(record)

    def last(self) -> RoundRecord | None:
        return self.rounds[-1] if self.rounds else None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Rounds and values of one metric, skipping rounds where it was not measured."""
        xs: list[int] = []
        ys: list[float] = []
        for r in self.rounds:
            value = getattr(r, key)
            if value is not None:
                xs.append(r.round)
                ys.append(float(value))
        return xs, ys

    def first_round_reaching(self, key: str, target: float) -> int | None:
        """First round whose metric is at least ``target``, or None if never reached."""
        for r, v in zip(*self.series(key), strict=True):
            if v >= target:
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "strategy": self.strategy,
            "meta": self.meta,
            "rounds": [asdict(r) for r in self.rounds],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(
            task=str(data["task"]),
            strategy=str(data["strategy"]),
            meta=dict(data.get("meta", {})),
            rounds=[RoundRecord(**r) for r in data["rounds"]],
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))  # C encoder: rewritten every round
        tmp.replace(path)  # atomic: a crash never leaves half a history behind

    @classmethod
    def load(cls, path: Path) -> History:
        return cls.from_dict(json.loads(path.read_text()))
