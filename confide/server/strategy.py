"""Server aggregation as pure array code: FedAvg and FedAdam over lists of NumPy arrays.

A strategy never sees transport or files. It receives the current global weights and
the sites' results and returns the next global weights, so the same object runs in a
unit test, the in-process simulator and the coordinator. The weighted mean of large
arrays is computed block by block on a small pool of threads (NumPy releases the GIL),
with the same operations in the same order per element as one pass: identical results.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from confide.errors import ConfideError, ConfigError

Array = npt.NDArray[Any]
Weights = list[Array]


class AggregationError(ConfideError, ValueError):
    """Site results cannot be aggregated (no results, or shapes that do not match)."""


@dataclass(frozen=True)
class SiteResult:
    """What one site returned from a training round."""

    weights: Weights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


def _check_compatible(reference: Sequence[Array], weights: Sequence[Array], who: str) -> None:
    if len(weights) != len(reference):
        raise AggregationError(
            f"{who} sent {len(weights)} arrays but the model has {len(reference)}; "
            "the site runs a different model than the federation"
        )
    for i, (ref, arr) in enumerate(zip(reference, weights, strict=True)):
        if ref.shape != arr.shape:
            raise AggregationError(
                f"{who} array {i} has shape {arr.shape}, expected {ref.shape}; "
                "the site runs a different model than the federation"
            )


def weighted_mean(results: Sequence[SiteResult]) -> Weights:
    """Mean of the sites' weights, each weighted by its number of training examples.

    Floating arrays are averaged in float64 and cast back to their dtype; integer
    arrays (counters such as ``num_batches_tracked``) take the first site's value
    because averaging a counter has no meaning.
    """
    if not results:
        raise AggregationError("no site results to aggregate")
    total = sum(r.num_examples for r in results)
    if total <= 0:
        raise AggregationError("the sites reported zero training examples in total")
    reference = results[0].weights
    for i, r in enumerate(results):
        _check_compatible(reference, r.weights, f"site result {i}")
        if r.num_examples < 0:
            raise AggregationError(f"site result {i} reports {r.num_examples} examples")
    scales = [r.num_examples / total for r in results]
    out: Weights = []
    for j, ref in enumerate(reference):
        if not np.issubdtype(ref.dtype, np.floating):
            out.append(ref.copy())
            continue
        mean = np.empty(ref.shape, dtype=ref.dtype)
        fill = partial(_mean_block, [np.ravel(r.weights[j]) for r in results], scales, mean)
        if ref.size > _BLOCK:
            list(_pool().map(fill, range(0, ref.size, _BLOCK)))
        elif ref.size:
            fill(0)
        out.append(mean)
    return out


# Elements per block of the weighted mean: its float64 sums (1 MiB) stay in cache while
# every site's slice is added, and a 1M-parameter layer makes eight blocks to share out.
_BLOCK = 1 << 17
_pool_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _pool_lock:
        if _executor is None:
            workers = max(1, min(4, os.cpu_count() or 1))
            _executor = ThreadPoolExecutor(workers, thread_name_prefix="confide-mean")
        return _executor


def _mean_block(flat: Sequence[Array], scales: Sequence[float], mean: Array, lo: int) -> None:
    """Elements ``lo:lo + _BLOCK`` of ``mean``: the sum of ``scale * site`` in float64, cast
    back to ``mean``'s dtype. Cast and scale into one reused buffer, then add: two passes
    per site, nothing of size D x N."""
    out = mean.reshape(-1)
    hi = min(lo + _BLOCK, out.size)
    acc = np.zeros(hi - lo, dtype=np.float64)
    scaled = np.empty_like(acc)
    for w, s in zip(flat, scales, strict=True):
        np.multiply(w[lo:hi], s, out=scaled, dtype=np.float64)
        acc += scaled
    out[lo:hi] = acc


def weighted_metrics(
    pairs: Sequence[tuple[int, Mapping[str, float]]],
) -> dict[str, float]:
    """Example-weighted average of each metric over the sites that reported it."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for n, metrics in pairs:
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + n * float(value)
            counts[key] = counts.get(key, 0) + n
    return {k: sums[k] / counts[k] for k in sums if counts[k] > 0}


class Strategy(Protocol):
    """Turns the global weights and the round's site results into new global weights."""

    name: str

    def aggregate(self, global_weights: Weights, results: Sequence[SiteResult]) -> Weights:
        """Return the next global weights."""
        ...

    def apply(self, global_weights: Weights, mean: Weights) -> Weights:
        """Return the next global weights given the sites' weighted mean model."""
        ...


class FedAvg:
    """Federated averaging (McMahan et al. 2017) with an optional server learning rate.

    ``server_lr = 1`` replaces the global model by the example-weighted mean of the
    sites' models; smaller values move only part of the way (server momentum-free SGD).
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ConfigError("server_lr", f"must be > 0 (got {server_lr})", "use e.g. 1.0")
        self.server_lr = server_lr

    def aggregate(self, global_weights: Weights, results: Sequence[SiteResult]) -> Weights:
        return self.apply(global_weights, weighted_mean(results))

    def apply(self, global_weights: Weights, mean: Weights) -> Weights:
        """Next global weights from the sites' example-weighted mean model (which secure
        aggregation delivers without any single site's model)."""
        _check_compatible(global_weights, mean, "the aggregate")
        if self.server_lr == 1.0:
            return mean
        out: Weights = []
        for g, m in zip(global_weights, mean, strict=True):
            if np.issubdtype(g.dtype, np.floating):
                out.append((g + self.server_lr * (m - g)).astype(g.dtype))
            else:
                out.append(m)
        return out


class FedAdam:
    """FedAdam server optimizer (Reddi et al. 2021, "Adaptive Federated Optimization").

    The pseudo-gradient is the weighted mean of the sites' updates (site minus global);
    the server applies Adam to it with the paper's adaptivity ``tau`` in the
    denominator and no bias correction, as in Algorithm 2 of the paper.
    """

    name = "fedadam"

    def __init__(
        self,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if not server_lr > 0:
            raise ConfigError("server_lr", f"must be > 0 (got {server_lr})", "use e.g. 0.01")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ConfigError(
                "beta1/beta2", f"must lie in [0, 1) (got {beta1}, {beta2})", "use 0.9 and 0.99"
            )
        if not tau > 0:
            raise ConfigError("tau", f"must be > 0 (got {tau})", "use e.g. 1e-3")
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: list[npt.NDArray[np.float64]] | None = None
        self.v: list[npt.NDArray[np.float64]] | None = None

    def aggregate(self, global_weights: Weights, results: Sequence[SiteResult]) -> Weights:
        return self.apply(global_weights, weighted_mean(results))

    def apply(self, global_weights: Weights, mean: Weights) -> Weights:
        """Next global weights from the sites' example-weighted mean model."""
        _check_compatible(global_weights, mean, "the aggregate")
        if self.m is None or self.v is None:
            self.m = [np.zeros(g.shape, dtype=np.float64) for g in global_weights]
            # v starts at tau^2 as in the paper's experiments, so early steps are bounded.
            self.v = [np.full(g.shape, self.tau**2, dtype=np.float64) for g in global_weights]
        out: Weights = []
        for j, (g, avg) in enumerate(zip(global_weights, mean, strict=True)):
            if not np.issubdtype(g.dtype, np.floating):
                out.append(avg)
                continue
            delta = avg.astype(np.float64) - g.astype(np.float64)
            m, v = self.m[j], self.v[j]
            m *= self.beta1
            m += (1.0 - self.beta1) * delta
            v *= self.beta2
            v += (1.0 - self.beta2) * np.square(delta)
            step = self.server_lr * m / (np.sqrt(v) + self.tau)
            out.append((g.astype(np.float64) + step).astype(g.dtype))
        return out

    def state(self) -> dict[str, Weights]:
        """Optimizer moments, for checkpoints (empty before the first round)."""
        if self.m is None or self.v is None:
            return {}
        return {"m": [a.copy() for a in self.m], "v": [a.copy() for a in self.v]}

    def load_state(self, state: Mapping[str, Sequence[Array]]) -> None:
        """Restore moments saved by :meth:`state`."""
        if not state:
            self.m = self.v = None
            return
        self.m = [np.asarray(a, dtype=np.float64).copy() for a in state["m"]]
        self.v = [np.asarray(a, dtype=np.float64).copy() for a in state["v"]]


class WeightAverage:
    """An exponential moving average of the global model over rounds, served in its place.

    The sites keep training from the latest global model; what is evaluated and exported
    is ``m_t = b_t m_(t-1) + (1 - b_t) w_t`` with ``b_t = min(decay, (1 + t) / (10 + t))``
    (the warm-up of TensorFlow's ``ExponentialMovingAverage``, so early rounds do not
    drag the average towards the initial model). Averaging the iterates smooths the
    noise DP-SGD puts into every round (De et al. 2022 use it for DP image models); it is
    post-processing of released models, so it costs no privacy. Integer arrays (counters)
    are taken from the latest model, not averaged.
    """

    def __init__(self, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ConfigError("server_ema", f"must be in [0, 1) (got {decay})", "use e.g. 0.9")
        self.decay = decay
        self.updates = 0
        self.weights: Weights | None = None

    def update(self, weights: Weights) -> Weights:
        """Fold in the round's global model; returns the average (a new list)."""
        b = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        if self.weights is None:
            self.weights = [w.copy() for w in weights]
            return self.weights
        _check_compatible(self.weights, weights, "the new global model")
        self.weights = [
            (b * m + (1 - b) * w).astype(w.dtype)
            if np.issubdtype(w.dtype, np.floating)
            else w.copy()
            for m, w in zip(self.weights, weights, strict=True)
        ]
        return self.weights


STRATEGIES = ("fedavg", "fedadam")


def make_strategy(name: str, server_lr: float | None = None) -> FedAvg | FedAdam:
    """Build a strategy by name with its default (or the given) server learning rate."""
    if name == "fedavg":
        return FedAvg(server_lr=1.0 if server_lr is None else server_lr)
    if name == "fedadam":
        return FedAdam(server_lr=1e-2 if server_lr is None else server_lr)
    raise ConfigError(
        "strategy", f"unknown strategy {name!r}", f"use one of: {', '.join(STRATEGIES)}"
    )


def select_sites(
    num_sites: int, fraction: float, min_sites: int, rng: np.random.Generator
) -> list[int]:
    """Sample the sites for a round: ``max(min_sites, round(fraction * N))`` of them, sorted."""
    if num_sites <= 0:
        raise ConfigError("sites", "no sites available", "start at least one site")
    k = max(min_sites, round(fraction * num_sites), 1)
    k = min(k, num_sites)
    chosen = rng.choice(num_sites, size=k, replace=False)
    return sorted(int(i) for i in chosen)
