"""DP in the in-process engine: what the site agents and the coordinator do, in memory.

Every simulated site gets the same treatment as a real one: the round's ``dp.*`` plan in
its train config, the ClientApp's DP-SGD report checked against the plan, client-level
clipping (and noise shares) applied around the app, each event kept in the site's ledger,
and (with ``site_epsilon_max``) sites over budget left out of selection. Events are kept
in memory during the run (a thousand sites do not each need an SQLite file) and written
to ``<out>/ledger.db`` at the end, where ``confide audit report`` reads them like a real
site's ledger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt

from confide.client.privacy import clip_and_noise
from confide.privacy.dp import BudgetExceeded, DpEvent, PrivacyLedger, epsilon, group_events
from confide.privacy.dp import federated as dpfed
from confide.sims.config import SimRunConfig

FEDERATION = "simulation"

Arrays = list[npt.NDArray[Any]]


def site_name(site: int) -> str:
    return f"site-{site:04d}"


class SimPrivacy:
    """The privacy state of a simulated federation: plan, per-site events, budgets."""

    def __init__(self, cfg: SimRunConfig) -> None:
        self.cfg = cfg
        self.plan = cfg.dp.resolve(cfg.rounds)
        self.delta = cfg.dp.delta
        self.budget = cfg.site_epsilon_max
        self.events: dict[int, list[DpEvent]] = {}
        self.aggregator = dpfed.ClientAggregator(self.plan) if cfg.dp.client is not None else None
        self._bits: list[float] = []  # this round's adaptive-clipping bits
        self._eps: dict[tuple[tuple[float, float, int], ...], float] = {}

    def epsilon_of(self, events: Sequence[DpEvent]) -> float:
        key = group_events(events)
        if key not in self._eps:  # sites with the same history share one computation
            self._eps[key] = epsilon(events, self.delta)
        return self._eps[key]

    def eligible(self, sites: Sequence[int], rnd: int) -> list[int]:
        if self.budget is None:
            return list(sites)
        planned = self.plan.planned_events(FEDERATION, rnd, clip_norm=self._clip())
        return [
            s for s in sites if self.epsilon_of([*self.events.get(s, []), *planned]) <= self.budget
        ]

    def _clip(self) -> float | None:
        return None if self.aggregator is None else self.aggregator.clip_norm

    def min_survivors(self, selected: int) -> int:
        """Fewest updates a round can aggregate (noise shares are sized for it)."""
        low = min(self.cfg.min_sites, selected)
        if self.cfg.secure_aggregation != "none":
            from confide.privacy.secagg.federated import round_config

            cfg = round_config(self.cfg.secagg, selected, 1, federation="-", rnd=0)
            low = min(low, cfg.threshold)
        return max(1, low)

    def round_config(self, selected: int) -> dict[str, Any]:
        return dpfed.round_config(
            self.plan,
            FEDERATION,
            min_survivors=self.min_survivors(selected),
            client_clip_norm=self._clip(),
        )

    def release(
        self,
        site: int,
        rnd: int,
        config: Mapping[str, Any],
        global_weights: Arrays,
        weights: Arrays,
        metrics: Mapping[str, Any],
    ) -> tuple[Arrays, int]:
        """What a site agent does after training: the weights it may send, and its weight."""
        plan = dpfed.plan_from_config(config, rnd)
        assert plan is not None
        events: list[DpEvent] = []
        n = int(metrics.get("num-examples", 1) or 1)
        if plan.sgd is not None:
            events.append(dpfed.sgd_event_from_metrics(plan, metrics))
            n = events[-1].dataset_size
        if plan.client is not None:
            weights, within = clip_and_noise(plan.client, global_weights, weights)
            if plan.client.adaptive:
                self._bits.append(float(within))
            events.append(plan.client_event(n))
        events = [e.with_site(site_name(site)) for e in events]
        past = self.events.setdefault(site, [])
        if self.budget is not None:
            projected = self.epsilon_of([*past, *events])
            if projected > self.budget:
                spent = self.epsilon_of(past)
                raise BudgetExceeded(site_name(site), spent, projected, self.budget, self.delta)
        past.extend(events)
        if plan.client is not None:  # DP-FedAvg weighs every site equally
            n = self.cfg.secagg.max_weight if self.cfg.secure_aggregation != "none" else 1
        return weights, n

    def round_summary(
        self, rnd: int, succeeded: Sequence[int], failures: Sequence[str]
    ) -> dict[str, Any]:
        if self.aggregator is not None:  # after aggregating with C: the next round's C
            self.aggregator.update_clip(self._bits)
            self._bits = []
        spent = [self.epsilon_of(ev) for ev in self.events.values() if ev]
        return {
            "epsilon_max_site": max(spent) if spent else 0.0,
            "epsilon_min_site": min(spent) if spent else 0.0,
            "sites_trained": len(succeeded),
            "refused": sum("BudgetExceeded" in f for f in failures),
            **({"client_clip_norm": self._clip()} if self.aggregator is not None else {}),
        }

    def write_ledger(self, path: Path) -> dict[str, Any]:
        """Every simulated site's events (and budgets) into one ledger file, at the end."""
        if path.exists():
            path.unlink()
        with PrivacyLedger(path) as ledger:
            if self.budget is not None:
                for site in range(self.cfg.sites):
                    ledger.set_budget(site_name(site), self.budget, self.delta)
            ledger.record_many([e for evs in self.events.values() for e in evs])
        spent = [self.epsilon_of(ev) for ev in self.events.values() if ev]
        return {
            "ledger": str(path),
            "plan": self.plan.summary(),
            "epsilon_max_site": max(spent) if spent else 0.0,
            "delta": self.delta,
        }
