"""Split a data set's rows across simulated sites: IID, Dirichlet, label shards, natural groups."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, model_validator

from confide.errors import ConfigError

Parts = list[npt.NDArray[np.int64]]

_SPEC_FIX = "use one of iid, dirichlet:ALPHA (ALPHA > 0), shards:N (N >= 1), natural"
_DIRICHLET_TRIES = 100


def _check_parts(n: int, num_parts: int, min_size: int = 1) -> None:
    if num_parts < 1:
        raise ConfigError(
            "num_parts", f"must be at least 1, got {num_parts}", "use 1 or more sites"
        )
    if n < num_parts * min_size:
        raise ConfigError(
            "num_parts",
            f"{n} samples cannot give {num_parts} sites {min_size} sample(s) each",
            "use fewer sites or more data",
        )


def _labels(labels: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Labels as dense codes 0..C-1, so any label values (or dtypes) work."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(
            "labels", f"must be 1-D (one per sample), got {arr.shape}", "pass y, not x"
        )
    return np.unique(arr, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _sorted_parts(chunks: Sequence[npt.NDArray[Any]]) -> Parts:
    return [np.sort(c).astype(np.int64, copy=False) for c in chunks]


def partition_iid(n: int, num_parts: int, seed: int) -> Parts:
    """A random split into ``num_parts`` parts whose sizes differ by at most one."""
    _check_parts(n, num_parts)
    perm = np.random.default_rng(seed).permutation(n)
    return _sorted_parts(np.array_split(perm, num_parts))


def partition_dirichlet(
    labels: npt.ArrayLike, num_parts: int, alpha: float, seed: int, min_size: int = 1
) -> Parts:
    """Label-skewed split (Hsu et al. 2019): each class spread over parts in Dir(alpha) proportions.

    Small ``alpha`` gives each site few classes; large ``alpha`` approaches IID.
    Draws are repeated (at most 100 times) until every part has ``min_size``
    samples, since an empty site cannot train.
    """
    if not alpha > 0 or not math.isfinite(alpha):
        raise ConfigError(
            "partition", f"dirichlet needs a finite ALPHA > 0, got {alpha}", _SPEC_FIX
        )
    codes = _labels(labels)
    _check_parts(codes.size, num_parts, min_size)
    rng = np.random.default_rng(seed)
    by_class = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1])
    for _ in range(_DIRICHLET_TRIES):
        pieces: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(num_parts)]
        for members in by_class:
            shuffled = rng.permutation(members)
            shares = np.cumsum(rng.dirichlet(np.full(num_parts, alpha)))[:-1]
            cuts = (shares * shuffled.size).astype(np.int64)
            for part, chunk in zip(pieces, np.split(shuffled, cuts), strict=True):
                part.append(chunk)
        parts = [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in pieces]
        if min(p.size for p in parts) >= min_size:
            return _sorted_parts(parts)
    raise ConfigError(
        "partition",
        f"dirichlet:{alpha} left a site with fewer than {min_size} samples in "
        f"{_DIRICHLET_TRIES} draws ({codes.size} samples, {num_parts} sites)",
        "use a larger alpha, fewer sites or a smaller min_size",
    )


def _shard_counts(class_sizes: npt.NDArray[np.int64], num_shards: int) -> npt.NDArray[np.int64]:
    """Shards per class: one each, the rest by size (largest remainder), at most one per sample."""
    extra = num_shards - class_sizes.size
    quota = class_sizes / class_sizes.sum() * extra
    counts: npt.NDArray[np.int64] = 1 + np.floor(quota).astype(np.int64)
    short = num_shards - int(counts.sum())
    # A stable sort breaks ties toward the lower class: deterministic without the rng.
    counts[np.argsort(-(quota - np.floor(quota)), kind="stable")[:short]] += 1
    counts = np.minimum(counts, class_sizes).astype(np.int64)
    # Only tiny classes hit the cap; their shards go to the classes with the
    # largest shards, so the total stays num_shards (<= number of samples).
    while int(counts.sum()) < num_shards:
        room = np.where(counts < class_sizes, class_sizes / np.maximum(counts, 1), -1.0)
        counts[int(np.argmax(room))] += 1
    return counts


def partition_shards(
    labels: npt.ArrayLike, num_parts: int, classes_per_part: int, seed: int
) -> Parts:
    """McMahan et al.'s pathological non-IID split: sort by label, cut shards, deal k per part.

    Shards are cut within a class (each class gets shards in proportion to its
    size), so no shard straddles two classes and a part holds at most
    ``classes_per_part`` classes. With fewer shards than classes that is
    impossible; the sorted order is then cut into equal runs as in the paper.
    """
    if classes_per_part < 1:
        raise ConfigError("partition", f"shards needs N >= 1, got {classes_per_part}", _SPEC_FIX)
    codes = _labels(labels)
    _check_parts(codes.size, num_parts)
    num_shards = num_parts * classes_per_part
    if num_shards > codes.size:
        raise ConfigError(
            "partition",
            f"shards:{classes_per_part} needs {num_shards} shards, more than {codes.size} samples",
            "use fewer sites or fewer shards per site",
        )
    rng = np.random.default_rng(seed)
    # Shuffle inside each class so a site's shard is not a run of the file's order.
    order = np.lexsort((rng.random(codes.size), codes))
    sizes = np.bincount(codes)
    shards: list[npt.NDArray[np.int64]]
    if num_shards >= sizes.size:
        counts = _shard_counts(sizes, num_shards)
        by_class = np.split(order, np.cumsum(sizes)[:-1])
        shards = [
            s
            for members, k in zip(by_class, counts, strict=True)
            for s in np.array_split(members, int(k))
        ]
    else:
        shards = list(np.array_split(order, num_shards))
    deal = rng.permutation(len(shards))
    return _sorted_parts(
        [np.concatenate([shards[i] for i in deal[p::num_parts]]) for p in range(num_parts)]
    )


def partition_natural(groups: Sequence[Hashable]) -> Parts:
    """One part per distinct group (site, role, hospital...), in order of first appearance."""
    first: dict[Hashable, int] = {}
    codes = np.fromiter(
        (first.setdefault(g, len(first)) for g in groups), dtype=np.int64, count=len(groups)
    )
    if codes.size == 0:
        raise ConfigError("groups", "no samples to partition", "pass one group per sample")
    order = np.argsort(codes, kind="stable")
    return _sorted_parts(np.split(order, np.cumsum(np.bincount(codes))[:-1]))


def label_skew(labels: npt.ArrayLike, parts: Sequence[npt.ArrayLike], num_classes: int) -> float:
    """Mean total-variation distance between each part's label histogram and the global one.

    0 means every part has the global label mix (IID); it approaches 1 when
    parts hold disjoint rare classes. Empty parts are ignored.
    """
    y = np.asarray(labels).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            "num_classes",
            f"labels span {y.min()}..{y.max()}, outside 0..{num_classes - 1}",
            "pass the number of classes of the data set",
        )
    idx = [np.asarray(p, dtype=np.int64) for p in parts]
    idx = [p for p in idx if p.size]
    if not idx:
        return 0.0
    sizes = np.array([p.size for p in idx])
    part_of = np.repeat(np.arange(len(idx)), sizes)
    counts = np.bincount(
        part_of * num_classes + y[np.concatenate(idx)], minlength=len(idx) * num_classes
    )
    hist = counts.reshape(len(idx), num_classes) / sizes[:, None]
    glob = np.bincount(y, minlength=num_classes) / y.size
    return float(np.mean(0.5 * np.abs(hist - glob).sum(axis=1)))


def _parse(text: str) -> dict[str, Any]:
    kind, sep, arg = text.strip().lower().partition(":")
    kind, arg = kind.strip(), arg.strip()
    if kind in ("iid", "natural") and not sep:
        return {"kind": kind}
    if kind == "dirichlet" and arg:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if alpha > 0 and math.isfinite(alpha):
            return {"kind": kind, "alpha": alpha}
    if kind == "shards" and arg.isdigit() and int(arg) >= 1:
        return {"kind": kind, "classes_per_part": int(arg)}
    raise ConfigError("partition", f"cannot parse {text!r}", _SPEC_FIX)


class PartitionSpec(BaseModel):
    """How to split data over sites: ``iid``, ``dirichlet:0.5``, ``shards:2`` or ``natural``.

    As a field of a pydantic config it accepts that string form as well as
    ``{"kind": "dirichlet", "alpha": 0.5}``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["iid", "dirichlet", "shards", "natural"]
    alpha: float | None = None
    classes_per_part: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return _parse(data) if isinstance(data, str) else data

    @model_validator(mode="after")
    def _consistent(self) -> PartitionSpec:
        a, k = self.alpha, self.classes_per_part
        ok = {
            "iid": a is None and k is None,
            "natural": a is None and k is None,
            "dirichlet": a is not None and a > 0 and math.isfinite(a) and k is None,
            "shards": k is not None and k >= 1 and a is None,
        }[self.kind]
        if not ok:
            raise ValueError(f"partition: inconsistent {self!r}. Fix: {_SPEC_FIX}")
        return self

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """The spec written as ``text``; a ConfigError with the accepted forms otherwise."""
        if not isinstance(text, str):
            raise ConfigError(
                "partition", f"expected a string, got {type(text).__name__}", _SPEC_FIX
            )
        return cls.model_validate(_parse(text))

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.classes_per_part}"
        return self.kind

    def apply(
        self,
        labels: npt.ArrayLike,
        num_parts: int,
        seed: int,
        groups: Sequence[Hashable] | None = None,
    ) -> Parts:
        """Index arrays, one per site; ``natural`` needs ``groups``, one per sample."""
        y = np.asarray(labels)
        if self.kind == "iid":
            return partition_iid(len(y), num_parts, seed)
        if self.kind == "dirichlet":
            assert self.alpha is not None
            return partition_dirichlet(y, num_parts, self.alpha, seed)
        if self.kind == "shards":
            assert self.classes_per_part is not None
            return partition_shards(y, num_parts, self.classes_per_part, seed)
        if groups is None:
            raise ConfigError(
                "partition",
                "natural needs the group (site, role, ...) of every sample",
                "pass groups=..., or use iid, dirichlet:ALPHA or shards:N",
            )
        if len(groups) != len(y):
            raise ConfigError(
                "groups",
                f"{len(groups)} groups for {len(y)} samples",
                "pass exactly one group per sample",
            )
        parts = partition_natural(groups)
        if len(parts) != num_parts:
            raise ConfigError(
                "num_parts",
                f"natural partition has {len(parts)} groups but {num_parts} sites were asked for",
                f"run {len(parts)} sites, or use iid, dirichlet:ALPHA or shards:N",
            )
        return parts
