"""The built-in federated tasks: which data, which model, which split and training defaults.

A task ties a data set to a model family and to the way its data is spread over
sites. Everything is keyed by plain, hashable settings so that a thousand simulated
sites in one process share one parsed copy of the data set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

import numpy as np

from confide.client.data import (
    ArrayDataset,
    PartitionSpec,
    load_credit,
    load_mnist,
    load_shakespeare_roles,
    partition_iid,
    role_datasets,
)
from confide.errors import ConfigError

Kind = Literal["image", "chars", "sequence"]


@dataclass(frozen=True)
class DataSettings:
    """How a federation's data is laid out; identical on every site of one run."""

    data_dir: str | None = None
    partition: str = ""  # empty: the task's default
    num_sites: int = 10
    seed: int = 0
    max_samples_per_site: int | None = None
    eval_fraction: float = 0.1
    max_test_samples: int | None = None


@dataclass(frozen=True)
class SiteData:
    """One site's local data: what it trains on and what it evaluates the global model on."""

    train: ArrayDataset
    eval: ArrayDataset


@dataclass(frozen=True)
class Task:
    """A built-in task: data, default model and local-training defaults."""

    name: str
    description: str
    kind: Kind
    model: str
    models: tuple[str, ...]
    default_partition: str
    partitions: tuple[str, ...]
    lr: float
    batch_size: int
    local_epochs: int
    momentum: float
    max_test_samples: int | None
    _site_data: Callable[[DataSettings, int], SiteData]
    _test_data: Callable[[DataSettings], ArrayDataset]

    def settings(self, settings: DataSettings) -> DataSettings:
        """Fill in the task defaults and check the partition applies to this task."""
        s = settings
        if not s.partition:
            s = replace(s, partition=self.default_partition)
        if s.max_test_samples is None and self.max_test_samples is not None:
            s = replace(s, max_test_samples=self.max_test_samples)
        spec = PartitionSpec.parse(s.partition)
        if spec.kind not in self.partitions:
            raise ConfigError(
                "partition",
                f"{s.partition!r} does not apply to task {self.name}",
                f"use one of: {', '.join(self.partitions)}",
            )
        return s

    def site_data(self, settings: DataSettings, partition_id: int) -> SiteData:
        s = self.settings(settings)
        if not 0 <= partition_id < s.num_sites:
            raise ConfigError(
                "partition-id",
                f"{partition_id} is outside 0..{s.num_sites - 1}",
                "give each site a partition id below the number of sites",
            )
        return self._site_data(s, partition_id)

    def test_data(self, settings: DataSettings) -> ArrayDataset:
        """Central held-out test set (simulations only; a real coordinator has no data)."""
        return self._test_data(self.settings(settings))


def _split_site(data: ArrayDataset, idx: np.ndarray, s: DataSettings, pid: int) -> SiteData:
    # Each site shuffles its own part with its own seed, then keeps an eval hold-out.
    rng = np.random.default_rng([s.seed, pid, 7])
    idx = rng.permutation(idx)
    n_eval = round(len(idx) * s.eval_fraction)
    eval_idx, train_idx = idx[:n_eval], idx[n_eval:]
    if s.max_samples_per_site is not None:
        train_idx = train_idx[: s.max_samples_per_site]
        eval_idx = eval_idx[: max(1, round(s.max_samples_per_site * s.eval_fraction))]
    return SiteData(data.subset(np.sort(train_idx)), data.subset(np.sort(eval_idx)))


def _cap(data: ArrayDataset, limit: int | None, seed: int) -> ArrayDataset:
    if limit is None or len(data) <= limit:
        return data
    idx = np.random.default_rng([seed, 11]).choice(len(data), size=limit, replace=False)
    return data.subset(np.sort(idx))


def _check_parts(parts: list[np.ndarray], s: DataSettings, what: str) -> None:
    empty = [i for i, p in enumerate(parts) if len(p) < 2]
    if empty:
        raise ConfigError(
            "sites",
            f"{len(empty)} of {s.num_sites} sites get fewer than 2 {what} with "
            f"partition {s.partition!r}",
            "use fewer sites or a less skewed partition",
        )


# --- MNIST -------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _mnist_parts(s: DataSettings) -> list[np.ndarray]:
    train = load_mnist("train", s.data_dir)
    parts = PartitionSpec.parse(s.partition).apply(train.y, s.num_sites, s.seed)
    _check_parts(parts, s, "images")
    return parts


def _mnist_site(s: DataSettings, pid: int) -> SiteData:
    return _split_site(load_mnist("train", s.data_dir), _mnist_parts(s)[pid], s, pid)


def _mnist_test(s: DataSettings) -> ArrayDataset:
    return _cap(load_mnist("test", s.data_dir), s.max_test_samples, s.seed)


# --- Shakespeare -------------------------------------------------------------------


@lru_cache(maxsize=2)
def _roles(data_dir: str | None) -> list[tuple[str, ArrayDataset, ArrayDataset]]:
    return [(r.role, r.train, r.test) for r in role_datasets(load_shakespeare_roles(data_dir))]


def _concat(sets: list[ArrayDataset]) -> ArrayDataset:
    return ArrayDataset(np.concatenate([d.x for d in sets]), np.concatenate([d.y for d in sets]))


@lru_cache(maxsize=2)
def _shakespeare_pool(data_dir: str | None) -> ArrayDataset:
    return _concat([train for _, train, _ in _roles(data_dir)])


@lru_cache(maxsize=4)
def _shakespeare_iid_parts(s: DataSettings) -> list[np.ndarray]:
    parts = partition_iid(len(_shakespeare_pool(s.data_dir)), s.num_sites, s.seed)
    _check_parts(parts, s, "sequences")
    return parts


def _natural_roles(s: DataSettings) -> list[tuple[str, ArrayDataset, ArrayDataset]]:
    roles = _roles(s.data_dir)
    if s.num_sites > len(roles):
        raise ConfigError(
            "sites",
            f"the natural split has {len(roles)} speaking roles with enough text, "
            f"not {s.num_sites}",
            f"use --sites {len(roles)} or fewer, or --partition iid",
        )
    # Sites are the largest roles first, so a small federation still has real data.
    return roles[: s.num_sites]


def _shakespeare_site(s: DataSettings, pid: int) -> SiteData:
    if PartitionSpec.parse(s.partition).kind == "natural":
        _, train, test = _natural_roles(s)[pid]
        if s.max_samples_per_site is not None:
            train = train.subset(np.arange(min(len(train), s.max_samples_per_site)))
        return SiteData(train, test)
    return _split_site(_shakespeare_pool(s.data_dir), _shakespeare_iid_parts(s)[pid], s, pid)


def _shakespeare_test(s: DataSettings) -> ArrayDataset:
    if PartitionSpec.parse(s.partition).kind == "natural":
        tests = [test for _, _, test in _natural_roles(s)]
    else:
        tests = [test for _, _, test in _roles(s.data_dir)]
    return _cap(_concat(tests), s.max_test_samples, s.seed)


# --- Credit-card default -----------------------------------------------------------


@lru_cache(maxsize=4)
def _credit(data_dir: str | None, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    return load_credit(data_dir, seed=seed)


@lru_cache(maxsize=4)
def _credit_parts(s: DataSettings) -> list[np.ndarray]:
    train, _ = _credit(s.data_dir, s.seed)
    parts = PartitionSpec.parse(s.partition).apply(train.y, s.num_sites, s.seed)
    _check_parts(parts, s, "customers")
    return parts


def _credit_site(s: DataSettings, pid: int) -> SiteData:
    return _split_site(_credit(s.data_dir, s.seed)[0], _credit_parts(s)[pid], s, pid)


def _credit_test(s: DataSettings) -> ArrayDataset:
    return _cap(_credit(s.data_dir, s.seed)[1], s.max_test_samples, s.seed)


_LABELLED = ("iid", "dirichlet", "shards")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="mnist-cnn",
            description="MNIST digits, the CNN of McMahan et al. 2017 (1.66M parameters)",
            kind="image",
            model="cnn",
            models=("cnn", "cnn-small"),
            default_partition="iid",
            partitions=_LABELLED,
            lr=0.05,
            batch_size=10,
            local_epochs=1,
            momentum=0.0,
            max_test_samples=None,
            _site_data=_mnist_site,
            _test_data=_mnist_test,
        ),
        Task(
            name="shakespeare-lstm",
            description="next character of Tiny Shakespeare, one site per speaking role; "
            "two-layer LSTM of 256",
            kind="chars",
            model="char-lstm",
            models=("char-lstm",),
            default_partition="natural",
            partitions=("natural", "iid"),
            # Momentum leaves the "predict a space" plateau several times faster than
            # McMahan's plain SGD at lr 1.47 (400 steps: 39 % vs 25 % next-char accuracy).
            lr=0.5,
            batch_size=10,
            local_epochs=1,
            momentum=0.9,
            max_test_samples=2000,
            _site_data=_shakespeare_site,
            _test_data=_shakespeare_test,
        ),
        Task(
            name="shakespeare-transformer",
            description="next character of Tiny Shakespeare, one site per speaking role; "
            "small causal Transformer",
            kind="chars",
            model="char-transformer",
            models=("char-transformer",),
            default_partition="natural",
            partitions=("natural", "iid"),
            lr=0.1,
            batch_size=10,
            local_epochs=1,
            momentum=0.9,
            max_test_samples=2000,
            _site_data=_shakespeare_site,
            _test_data=_shakespeare_test,
        ),
        Task(
            name="credit-lstm",
            description="credit-card default from six monthly repayment steps; LSTM classifier",
            kind="sequence",
            model="seq-lstm",
            models=("seq-lstm",),
            default_partition="iid",
            partitions=_LABELLED,
            lr=0.05,
            batch_size=32,
            local_epochs=1,
            momentum=0.9,
            max_test_samples=None,
            _site_data=_credit_site,
            _test_data=_credit_test,
        ),
        Task(
            name="credit-transformer",
            description="credit-card default from six monthly repayment steps; "
            "Transformer classifier",
            kind="sequence",
            model="seq-transformer",
            models=("seq-transformer",),
            default_partition="iid",
            partitions=_LABELLED,
            lr=0.05,
            batch_size=32,
            local_epochs=1,
            momentum=0.9,
            max_test_samples=None,
            _site_data=_credit_site,
            _test_data=_credit_test,
        ),
    )
}


def get_task(name: str) -> Task:
    """Look up a built-in task; an unknown name lists the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(
            "task", f"unknown task {name!r}", f"use one of: {', '.join(TASKS)}"
        ) from None
