"""The coordinator's side of differential privacy: plan, select, mirror, add central noise.

* The ``[dp]`` plan is resolved once (a ``target_epsilon`` becomes a noise multiplier for
  the whole federation) and added to every train task (``dp.*`` keys).
* Each site announces its budget and its ledger at join; the coordinator keeps a *mirror*
  of every site's events (``state_dir/ledger.db``, the same schema as a site's ledger) and
  selects a site for a DP round only when the round's planned events fit its budget
  (fail closed: no budget, an unreadable ledger, or an ε that cannot be computed leave
  the site out). The site checks again on its own side; the site's check is the one that
  protects it, the coordinator's avoids wasting a round on a site that would refuse.
* Every train result of a DP round carries the site's events of the round; they are
  verified (their site, federation and round, and their content hash) and mirrored.
* Client-level DP with central noise: the coordinator re-clips each update to C, sums,
  adds N(0, (z·C)²) and divides by the number of sites; under secure aggregation it adds
  the noise to the unmasked mean. Adaptive clipping moves C after every round.
* Every decision goes to the coordinator's signed, hash-chained audit log
  (``state_dir/audit.db``, key ``state_dir/audit.key``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt

from confide.privacy.audit import AuditKey, AuditLog
from confide.privacy.dp import (
    DpError,
    PrivacyLedger,
    epsilon,
)
from confide.privacy.dp import federated as dpfed
from confide.server.rounds import Rejected

log = logging.getLogger("confide.coordinator")

Arrays = list[npt.NDArray[Any]]


class CoordinatorPrivacy:
    """The coordinator's ledger mirror, audit log and DP plan of one federation."""

    def __init__(
        self, settings: dpfed.DpSettings, federation: str, rounds: int, state_dir: Path, seed: int
    ) -> None:
        self.settings = settings
        self.federation = federation
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = PrivacyLedger(state_dir / "ledger.db")
        self.audit_log = AuditLog(state_dir / "audit.db")
        self.key = AuditKey.load_or_generate(state_dir / "audit.key")
        self.plan: dpfed.ResolvedDp | None = None
        self._state_path = state_dir / "dp_state.json"
        self.aggregator: dpfed.ClientAggregator | None = None
        del seed  # noise comes from the OS's entropy, never from the federation seed
        if settings.enabled:
            self.plan = settings.resolve(rounds)
            if settings.client is not None:
                self.aggregator = dpfed.ClientAggregator(self.plan, self._load_clip())
            worst = self.plan.worst_case_epsilon()
            summary = {**self.plan.summary(), "worst_case_epsilon": worst}
            log.info(
                "differential privacy: %s; a site selected in all %d rounds spends ε=%.3f at δ=%g",
                _describe(self.plan),
                rounds,
                worst,
                settings.delta,
            )
            self.audit("dp_plan", {"federation": federation, **summary})

    @property
    def enabled(self) -> bool:
        return self.plan is not None

    def close(self) -> None:
        self.ledger.close()
        self.audit_log.close()

    def audit(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.audit_log.append("coordinator", kind, dict(payload), self.key)

    # --- join -------------------------------------------------------------------------------

    def site_joined(self, site: str, capabilities: Mapping[str, str]) -> None:
        """Mirror the budget and ledger a site announces (a site without one gets no DP
        round). Events that name another site, or do not match their hash, are refused."""
        budget_text = capabilities.get("dp.budget")
        ledger_text = capabilities.get("dp.ledger")
        if budget_text is None:
            return
        try:
            try:
                budget = json.loads(budget_text)
            except RecursionError:
                raise Rejected("its budget is JSON nested too deeply") from None  # "[[[[..."
            epsilon_max, delta = float(budget["epsilon_max"]), float(budget["delta"])
            events = dpfed.events_from_json(ledger_text or "[]")
            for e in events:
                if e.get("site") != site:
                    raise Rejected(f"its ledger names site {e.get('site')!r}")
            added = self.ledger.mirror(events)
            # The budget last: a site whose ledger was refused must not look eligible.
            self.ledger.set_budget(site, epsilon_max, delta)
        except (Rejected, DpError, KeyError, TypeError, ValueError, ArithmeticError) as e:
            log.warning("site %s announced an unusable privacy ledger (%s); no DP rounds", site, e)
            self.audit("ledger_refused", {"site": site, "reason": str(e)})
            return
        self.audit(
            "site_budget",
            {
                "site": site,
                "epsilon_max": budget["epsilon_max"],
                "delta": budget["delta"],
                "events_mirrored": added,
            },
        )

    # --- selection --------------------------------------------------------------------------

    def eligible(self, sites: Sequence[str], rnd: int) -> tuple[list[str], dict[str, str]]:
        """The sites whose budget admits round ``rnd`` and why the others are left out."""
        if self.plan is None:
            return list(sites), {}
        planned = self.plan.planned_events(self.federation, rnd, clip_norm=self.clip_norm)
        ok: list[str] = []
        left_out: dict[str, str] = {}
        for site in sites:
            try:
                self.ledger.check(site, [ev.with_site(site) for ev in planned])
            except DpError as e:  # no budget, over budget, or ε not computable
                left_out[site] = type(e).__name__
                continue
            ok.append(site)
        if left_out:
            log.info(
                "round %d: %d site(s) left out for lack of privacy budget: %s",
                rnd,
                len(left_out),
                ", ".join(f"{s} ({r})" for s, r in sorted(left_out.items())),
            )
        return ok, left_out

    def round_config(self, min_survivors: int) -> dict[str, Any]:
        if self.plan is None:
            return {}
        return dpfed.round_config(
            self.plan, self.federation, min_survivors=min_survivors, client_clip_norm=self.clip_norm
        )

    # --- results ----------------------------------------------------------------------------

    def accept_events(self, site: str, rnd: int, config: Mapping[str, Any]) -> int:
        """Verify and mirror the events a train result carries; :class:`Rejected` if bad."""
        if self.plan is None:
            return 0
        text = config.get(dpfed.EVENTS)
        if not isinstance(text, str):
            raise Rejected("a DP round's result must carry the site's ledger events (dp.events)")
        try:
            events = dpfed.events_from_json(text)
            for e in events:
                if e.get("site") != site:
                    raise Rejected(f"its DP events name site {e.get('site')!r}")
                if e.get("federation") != self.federation or e.get("round") != rnd:
                    raise Rejected(
                        f"its DP events are for {e.get('federation')!r} round {e.get('round')}"
                    )
            mechanisms = {str(e.get("mechanism")) for e in events}  # any JSON: maybe a list
            expected = set()
            if self.settings.example is not None:
                expected.add("dp-sgd")
            if self.settings.client is not None:
                expected.add("dp-fedavg")
            if not expected <= mechanisms:
                raise Rejected(f"its DP events lack {sorted(expected - mechanisms)}")
            # More steps than planned is a result the site itself must withhold; it would also
            # make every later ε of the site slow to compute (the accountant's cost grows
            # with the steps).
            planned = {
                ev.mechanism: ev.steps
                for ev in self.plan.planned_events(self.federation, rnd, clip_norm=self.clip_norm)
            }
            for e in events:
                steps = e.get("steps")
                limit = planned.get(str(e.get("mechanism")))
                if limit is not None and isinstance(steps, int) and steps > limit:
                    raise Rejected(
                        f"its {e.get('mechanism')} event claims {steps} steps, the round's plan "
                        f"allows at most {limit}"
                    )
            added = self.ledger.mirror(events)
        except DpError as e:
            raise Rejected(f"its DP events are invalid: {e}") from None
        self.audit(
            "dp_events_mirrored",
            {"site": site, "round": rnd, "uids": [str(e.get("uid")) for e in events]},
        )
        return added

    # --- client-level aggregation -----------------------------------------------------------

    def client_mean(
        self, global_weights: Arrays, updates: Sequence[Arrays], min_survivors: int
    ) -> Arrays:
        assert self.aggregator is not None
        return self.aggregator.client_mean(global_weights, updates, min_survivors)

    def secure_mean(
        self, global_weights: Arrays, mean: Arrays, m: int, min_survivors: int
    ) -> Arrays:
        assert self.aggregator is not None
        return self.aggregator.secure_mean(global_weights, mean, m, min_survivors)

    def update_clip(self, bits: Sequence[float]) -> float | None:
        """Adaptive clipping: the next round's C (audited and kept across restarts)."""
        if self.aggregator is None:
            return None
        info = self.aggregator.update_clip(bits)
        if info is not None:
            self.audit("clip_updated", info)
            self._save_clip()
        return self.aggregator.clip_norm

    @property
    def clip_norm(self) -> float | None:
        return None if self.aggregator is None else self.aggregator.clip_norm

    def _load_clip(self) -> dict[str, Any] | None:
        """The adaptive clip state saved after the last round (None before round 1)."""
        if not self._state_path.exists():
            return None
        state = json.loads(self._state_path.read_text())  # corrupt: refuse to start
        return state if isinstance(state, dict) else None

    def _save_clip(self) -> None:
        assert self.aggregator is not None
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.aggregator.clip.to_dict()))
        os.replace(tmp, self._state_path)  # atomic: the old state or the new, never half

    # --- auditor access ---------------------------------------------------------------------

    def records(self, *, reader: str) -> dict[str, Any]:
        """Everything an auditor may read, as one JSON-able document; the read is audited.

        The ledger mirror (every site's events, with their content hashes), the budgets the
        sites announced, and this coordinator's signed audit log with its public key, so
        the auditor verifies the chain offline and recomputes every ε from the events.
        """
        self.audit("audit_read", {"reader": reader})
        budgets = {}
        for site in self.ledger.sites():
            b = self.ledger.budget(site)
            if b is not None:
                budgets[site] = {"epsilon_max": b.epsilon_max, "delta": b.delta}
        try:
            events: list[dict[str, Any]] | None = self.ledger.export()
            ledger_error = None
        except DpError as e:  # a tampered mirror is reported, not hidden
            events, ledger_error = None, str(e)
        return {
            "format": "confide-audit-records-1",
            "federation": self.federation,
            "events": events,
            "ledger_error": ledger_error,
            "budgets": budgets,
            "audit_log": self.audit_log.export(),
            "audit_public_key_pem": self.key.public_key_pem,
            "plan": None if self.plan is None else self.plan.summary(),
        }

    # --- reporting --------------------------------------------------------------------------

    def spent(self, sites: Sequence[str]) -> dict[str, float]:
        """ε spent so far by each of ``sites`` (PRV, all federations, at each budget's δ)."""
        out: dict[str, float] = {}
        for s in sites:
            b = self.ledger.budget(s)
            delta = b.delta if b is not None else self.settings.delta
            try:
                out[s] = epsilon(self.ledger.events(site=s), delta)
            except DpError:
                out[s] = math.nan
        return out


def _describe(plan: dpfed.ResolvedDp) -> str:
    parts = []
    s = plan.settings
    if s.example is not None:
        parts.append(
            f"example-level DP-SGD σ={plan.sgd_noise_multiplier:.4g}, q={s.example.sample_rate:g}, "
            f"{s.example.steps} steps/round, C={s.example.clip_norm:g}"
        )
    if s.client is not None:
        parts.append(
            f"client-level DP-FedAvg ({s.client.noise} noise) "
            f"z={plan.client_noise_multiplier:.4g}, "
            f"C={s.client.clip_norm:g}{' adaptive' if s.client.adaptive else ''}"
        )
    return "; ".join(parts)
