"""k-anonymity and ℓ-diversity: a full-domain generalization search with a suppression budget.

Each quasi-identifier has a hierarchy of levels 0..L (level 0 = the least generalized
value the role allows, level L = ``*``). The search visits the lattice of level
combinations in order of information loss, the sum over quasi-identifiers of the fraction
of the column's entropy that the level removes (``1 - H(level) / H(level 0)``), and takes the
first combination (lowest loss; ties broken by fewer suppressed rows) for which, after
suppressing every row of an equivalence class smaller than k (or with fewer than ℓ
distinct values of a sensitive column), at most ``max_suppression`` of the rows are
suppressed. Values are integer codes and classes are counted with numpy, so one lattice
node costs one ``np.unique`` over the rows. If no node passes, the search fails closed
with :class:`~confide.privacy.deid.errors.KAnonymityNotReached`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from confide.errors import ConfigError
from confide.privacy.deid.errors import KAnonymityNotReached

IntArray = NDArray[np.int64]
_MAX_KEY = 2**62


@dataclass(frozen=True)
class Hierarchy:
    """One quasi-identifier: per level, the label of every row and its integer code."""

    name: str
    level_names: list[str]
    labels: list[NDArray[np.str_]]
    max_level: int
    codes: list[IntArray] = field(default_factory=list)
    cards: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @classmethod
    def build(
        cls, name: str, level_names: list[str], labels: list[NDArray[np.str_]], max_level: int
    ) -> Hierarchy:
        codes: list[IntArray] = []
        cards: list[int] = []
        entropy: list[float] = []
        for lab in labels:
            uniq, inv = np.unique(lab, return_inverse=True)
            codes.append(inv.astype(np.int64).reshape(-1))
            cards.append(max(len(uniq), 1))
            p = np.bincount(codes[-1]) / max(len(lab), 1)
            p = p[p > 0]
            entropy.append(float(-(p * np.log2(p)).sum()))
        h0 = entropy[0]
        losses = [1.0 - h / h0 if h0 > 0 else 0.0 for h in entropy]
        top = min(max_level, len(labels) - 1)
        return cls(name, level_names, labels, top, codes, cards, losses)

    @property
    def height(self) -> int:
        return len(self.labels) - 1


@dataclass(frozen=True)
class Evaluation:
    """One lattice node: its classes and what suppression it needs."""

    levels: tuple[int, ...]
    class_of_row: IntArray
    sizes: IntArray
    bad_class: NDArray[np.bool_]
    suppressed: int
    loss: float

    def k_within(self, budget: int) -> int:
        """Smallest class left after suppressing the smallest classes within ``budget`` rows."""
        sizes = np.sort(self.sizes)
        cum = np.cumsum(sizes)
        dropped = int(np.searchsorted(cum, budget, side="right"))
        return int(sizes[dropped]) if dropped < len(sizes) else 0


@dataclass(frozen=True)
class SearchResult:
    """The chosen generalization and the rows it keeps."""

    levels: dict[str, int]
    level_names: dict[str, str]
    keep: NDArray[np.bool_]
    k_achieved: int
    l_achieved: int | None
    classes: int
    class_sizes: dict[int, int]
    suppressed: int
    nodes_evaluated: int
    lattice_size: int


def _combine(parts: list[tuple[IntArray, int]], n: int) -> IntArray:
    key = np.zeros(n, dtype=np.int64)
    card = 1
    for codes, c in parts:
        if card * c >= _MAX_KEY:
            _, inv = np.unique(key, return_inverse=True)
            key = inv.astype(np.int64).reshape(-1)
            card = int(key.max()) + 1 if n else 1
        key = key * c + codes
        card *= c
    _, inv = np.unique(key, return_inverse=True)
    return inv.astype(np.int64).reshape(-1)


class _Search:
    def __init__(
        self,
        quasi: list[Hierarchy],
        sensitive: list[tuple[IntArray, int]],
        n: int,
        k: int,
        l_div: int,
    ) -> None:
        self.quasi, self.sensitive, self.n, self.k, self.l = quasi, sensitive, n, k, l_div

    def evaluate(self, levels: tuple[int, ...]) -> Evaluation:
        parts = [
            (h.codes[lv], h.cards[lv])
            for h, lv in zip(self.quasi, levels, strict=True)
            if h.cards[lv] > 1
        ]
        inv = _combine(parts, self.n)
        sizes = np.bincount(inv).astype(np.int64)
        bad = sizes < self.k
        if self.l > 1:
            for codes, card in self.sensitive:
                pairs = np.unique(inv * card + codes)
                distinct = np.bincount(pairs // card, minlength=len(sizes))
                bad |= distinct < self.l
        suppressed = int(sizes[bad].sum())
        loss = sum(h.losses[lv] for h, lv in zip(self.quasi, levels, strict=True))
        return Evaluation(levels, inv, sizes, bad, suppressed, loss)

    def l_of(self, ev: Evaluation, keep: NDArray[np.bool_]) -> int | None:
        if not self.sensitive:
            return None
        best: int | None = None
        inv = ev.class_of_row[keep]
        for codes, card in self.sensitive:
            pairs = np.unique(inv * card + codes[keep])
            distinct = np.bincount(pairs // card)
            present = distinct[np.bincount(inv, minlength=len(distinct)) > 0]
            m = int(present.min()) if len(present) else 0
            best = m if best is None else min(best, m)
        return best


def search(
    quasi: list[Hierarchy],
    sensitive: list[tuple[IntArray, int]],
    n: int,
    *,
    k: int,
    l_diversity: int = 1,
    max_suppression: float = 0.0,
    max_nodes: int = 200_000,
) -> SearchResult:
    """Find the least-loss generalization meeting k (and ℓ) within the suppression budget."""
    budget = math.floor(max_suppression * n + 1e-9)
    lattice = math.prod(h.max_level + 1 for h in quasi)
    if lattice > max_nodes:
        raise ConfigError(
            "k_anonymity.max_nodes",
            f"the generalization lattice has {lattice} nodes (limit {max_nodes})",
            "mark fewer columns quasi, cap their max_level, or raise max_nodes",
        )
    s = _Search(quasi, sensitive, n, k, l_diversity)
    nodes = list(itertools.product(*(range(h.max_level + 1) for h in quasi)))
    losses = [sum(h.losses[lv] for h, lv in zip(quasi, node, strict=True)) for node in nodes]
    order = sorted(range(len(nodes)), key=lambda i: (round(losses[i], 9), sum(nodes[i]), nodes[i]))
    best_fail: Evaluation | None = None
    chosen: Evaluation | None = None
    evaluated = 0
    for i in order:
        if chosen is not None and round(losses[i], 9) > round(chosen.loss, 9):
            break
        ev = s.evaluate(nodes[i])
        evaluated += 1
        if ev.suppressed <= budget and ev.suppressed < n:
            if chosen is None or ev.suppressed < chosen.suppressed:
                chosen = ev
        elif best_fail is None or ev.suppressed <= best_fail.suppressed:
            best_fail = ev
    if chosen is None:
        assert best_fail is not None
        _fail(s, best_fail, budget, max_suppression)
    assert chosen is not None
    keep = ~chosen.bad_class[chosen.class_of_row]
    kept_sizes = chosen.sizes[~chosen.bad_class]
    hist_v, hist_c = np.unique(kept_sizes, return_counts=True)
    return SearchResult(
        levels={h.name: lv for h, lv in zip(quasi, chosen.levels, strict=True)},
        level_names={h.name: h.level_names[lv] for h, lv in zip(quasi, chosen.levels, strict=True)},
        keep=keep,
        k_achieved=int(kept_sizes.min()) if len(kept_sizes) else 0,
        l_achieved=s.l_of(chosen, keep),
        classes=len(kept_sizes),
        class_sizes={int(v): int(c) for v, c in zip(hist_v, hist_c, strict=True)},
        suppressed=chosen.suppressed,
        nodes_evaluated=evaluated,
        lattice_size=lattice,
    )


def _fail(s: _Search, best: Evaluation, budget: int, max_suppression: float) -> None:
    blocking: list[tuple[str, int]] = []
    for j, h in enumerate(s.quasi):
        if best.levels[j] == h.height:
            continue
        lv = list(best.levels)
        lv[j] = h.height
        ev = s.evaluate(tuple(lv))
        if ev.suppressed < best.suppressed:
            blocking.append((h.name, ev.suppressed))
    blocking.sort(key=lambda t: t[1])
    raise KAnonymityNotReached(
        k_wanted=s.k,
        k_reached=best.k_within(budget),
        l_wanted=s.l,
        suppression_needed=best.suppressed,
        budget=budget,
        rows=s.n,
        max_suppression=max_suppression,
        levels={h.name: h.level_names[lv] for h, lv in zip(s.quasi, best.levels, strict=True)},
        blocking=blocking,
    )


__all__ = ["Evaluation", "Hierarchy", "SearchResult", "search"]
