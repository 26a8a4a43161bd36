"""The site's privacy guard: its ledger, its budget, and DP applied around any ClientApp.

The site agent asks :class:`SitePrivacy` three things in every DP round:

1. **before training** (:meth:`SitePrivacy.admit`): does the round's plan fit the budget?
   The projected ε (the site's past events of *every* federation composed with the
   round's planned events, PRV accountant) must stay within ε_max; otherwise the round
   is refused with :class:`~confide.privacy.dp.BudgetExceeded` (or ``NoBudget``), the
   refusal is written to the site's audit log and reported to the coordinator, and the
   ClientApp never runs. Any doubt (the ledger cannot be read, ε cannot be computed)
   refuses too: fail closed.
2. **after training** (:meth:`SitePrivacy.release`): what was actually spent. Example-level
   DP-SGD is done by the ClientApp, which reports σ, q, steps, C and N; a reply that did
   not apply DP, or spent beyond the plan, is withheld. Client-level DP is done here, for
   any ClientApp: the update (trained minus global) is clipped to C and, in distributed
   mode, this site's noise share is added, before anything is masked or sent.
3. **recording**: each event is appended to the site's ledger and to its signed audit log
   *before* the result leaves the site, and travels with the result (``dp.events``) so
   the coordinator can mirror it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from confide import wire
from confide.config import fix
from confide.privacy.dp import (
    BudgetExceeded,
    DpError,
    DpEvent,
    PrivacyLedger,
)
from confide.privacy.dp import federated as dpfed

log = logging.getLogger("confide.site")

Audit = Callable[[str, dict[str, Any]], None]


class PrivacySettings(BaseModel):
    """``[privacy]`` of site.toml: the site's privacy budget, set by the data owner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon_max: float = Field(
        gt=0,
        json_schema_extra=fix(
            "set the total ε this site may ever spend, over every federation (e.g. 8.0)"
        ),
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        json_schema_extra=fix("use δ in (0, 1), well below 1 / (examples at this site)"),
    )
    require_dp: bool = Field(
        True,
        json_schema_extra=fix(
            "true: refuse any round that does not apply DP; false: also take non-DP rounds"
        ),
    )


class RoundRefused(Exception):
    """The site does not take (or release) this round; ``code`` goes to the coordinator."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.code = code
        self.details = details or {}
        super().__init__(message)


class SitePrivacy:
    """The site's ledger (``state_dir/ledger.db``) and budget, and the DP steps of a round."""

    def __init__(
        self, state_dir: Path, site: str, settings: PrivacySettings | None, audit: Audit
    ) -> None:
        self.path = state_dir / "ledger.db"
        self.site = site
        self.settings = settings
        self._audit = audit

    def _ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.path, site=self.site)

    # --- start-up and join --------------------------------------------------------------

    def apply_budget(self) -> dict[str, Any] | None:
        """Write ``[privacy]``'s budget into the ledger (audited when it changes)."""
        if self.settings is None:
            return None
        s = self.settings
        with self._ledger() as ledger:
            old = ledger.budget()
            if old is None or (old.epsilon_max, old.delta) != (s.epsilon_max, s.delta):
                ledger.set_budget(None, s.epsilon_max, s.delta)
                self._audit(
                    "budget_set",
                    {
                        "epsilon_max": s.epsilon_max,
                        "delta": s.delta,
                        "previous": None
                        if old is None
                        else {"epsilon_max": old.epsilon_max, "delta": old.delta},
                    },
                )
            try:
                spent = ledger.spent()
            except DpError as e:
                log.error("the privacy ledger cannot be accounted (%s): no DP round will run", e)
                return {"epsilon_max": s.epsilon_max, "delta": s.delta, "spent": None}
        log.info(
            "privacy budget ε_max=%g at δ=%g; spent ε=%.4f, remaining %.4f (all federations)",
            s.epsilon_max,
            s.delta,
            spent,
            max(0.0, s.epsilon_max - spent),
            extra={"event": "budget", "fields": {"epsilon_max": s.epsilon_max, "spent": spent}},
        )
        return {"epsilon_max": s.epsilon_max, "delta": s.delta, "spent": spent}

    def capabilities(self) -> dict[str, str]:
        """Join capabilities: the budget and the site's events, for the coordinator's mirror.

        The coordinator selects a site for a DP round only when this ledger says the round
        fits; it learns the site's privacy costs, never its data.
        """
        if self.settings is None:
            return {}
        try:
            with self._ledger() as ledger:
                events = ledger.export()
        except DpError as e:  # a broken ledger: announce no budget, so no DP round comes
            log.error("privacy ledger unreadable (%s); announcing no budget", e)
            return {}
        s = self.settings
        return {
            "dp.budget": json.dumps({"epsilon_max": s.epsilon_max, "delta": s.delta}),
            "dp.ledger": json.dumps(events, sort_keys=True),
        }

    # --- one round ------------------------------------------------------------------------

    def plan(self, config: dict[str, Any], rnd: int) -> dpfed.DpPlan | None:
        """The round's DP plan; refuses a malformed plan, and a non-DP round if required."""
        try:
            plan = dpfed.plan_from_config(config, rnd)
        except DpError as e:
            raise RoundRefused("DP_PLAN_REFUSED", str(e)) from None
        if plan is None and self.settings is not None and self.settings.require_dp:
            self._audit("round_refused", {"round": rnd, "reason": "the round applies no DP"})
            raise RoundRefused(
                "DP_REQUIRED",
                "this site takes only differentially private rounds ([privacy] require_dp); "
                "the round's config has no [dp] plan",
            )
        return plan

    def admit(self, plan: dpfed.DpPlan) -> None:
        """Fail closed: refuse the round unless its planned events fit the site's budget."""
        planned = plan.planned_events(self._dataset_size_hint())
        try:
            with self._ledger() as ledger:
                projection = ledger.check(None, planned)
        except DpError as e:  # BudgetExceeded, NoBudget, LedgerCorrupted, AccountingError
            details = (
                e.as_dict()
                if isinstance(e, BudgetExceeded)
                else {"error": type(e).__name__, "site": self.site}
            )
            self._audit(
                "budget_refused",
                {
                    **details,
                    "federation": plan.federation,
                    "round": plan.round,
                    "planned": [ev.to_dict() for ev in planned],
                },
            )
            raise RoundRefused("BUDGET_EXHAUSTED", str(e), details) from None
        log.info(
            "round %d: DP plan fits the budget: ε %.4f -> %.4f of %g",
            plan.round,
            projection.spent,
            projection.projected,
            projection.epsilon_max,
            extra={
                "event": "budget_ok",
                "fields": {"spent": projection.spent, "projected": projection.projected},
            },
        )

    def _dataset_size_hint(self) -> int:
        # Informational only (ε does not depend on it): the last recorded size, else 1.
        try:
            with self._ledger() as ledger:
                events = ledger.events(site=self.site)
        except DpError:
            return 1
        return events[-1].dataset_size if events else 1

    def release(
        self, plan: dpfed.DpPlan, model: wire.Payload, payload: wire.Payload
    ) -> tuple[wire.Payload, list[DpEvent]]:
        """Apply client-level DP, record the round's events, return what may be sent."""
        events: list[DpEvent] = []
        metrics = dict(payload.metrics)
        n = int(metrics.get(wire.NUM_EXAMPLES, 1) or 1)
        if plan.sgd is not None:
            try:
                events.append(dpfed.sgd_event_from_metrics(plan, metrics))
            except DpError as e:
                self._audit("result_withheld", {"round": plan.round, "reason": str(e)})
                raise RoundRefused("DP_NOT_APPLIED", str(e)) from None
            n = events[-1].dataset_size
        arrays = payload.arrays
        if plan.client is not None:
            arrays, unclipped = clip_and_noise(plan.client, model.arrays, payload.arrays)
            if plan.client.adaptive:
                metrics[dpfed.CLIENT_UNCLIPPED] = float(unclipped)
            events.append(plan.client_event(n))
        try:
            with self._ledger() as ledger:
                ledger.check(None, events)  # never more than admitted; re-checked to be sure
                for ev in events:
                    ledger.record(ev)
        except DpError as e:  # BudgetExceeded, NoBudget, LedgerCorrupted, AccountingError
            self._audit("result_withheld", {"round": plan.round, "reason": str(e)})
            raise RoundRefused("BUDGET_EXHAUSTED", str(e)) from None
        for ev in events:
            self._audit(
                "dp_event",
                {**ev.with_site(self.site).to_dict(), "uid": ev.with_site(self.site).uid},
            )
        sent = {k: v for k, v in metrics.items() if not k.startswith(dpfed.PREFIX)}
        if dpfed.CLIENT_UNCLIPPED in metrics:
            sent[dpfed.CLIENT_UNCLIPPED] = metrics[dpfed.CLIENT_UNCLIPPED]
        if plan.client is not None:
            sent[wire.NUM_EXAMPLES] = n  # counted, but DP-FedAvg weighs sites equally
        config = {
            **payload.config,
            dpfed.EVENTS: dpfed.events_to_json(ev.with_site(self.site) for ev in events),
        }
        out = wire.Payload(payload.task_id, payload.names, list(arrays), sent, config)
        return out, events


def clip_and_noise(
    plan: dpfed.ClientPlan,
    global_arrays: list[npt.NDArray[Any]],
    trained: list[npt.NDArray[Any]],
) -> tuple[list[npt.NDArray[Any]], bool]:
    """Client-level DP at the site: global + clip(trained − global, C) (+ this site's noise
    share in distributed mode). Returns the arrays to send and whether the update was
    within C (the adaptive-clipping bit)."""
    from confide.privacy.dp import client as dpc

    floats = [i for i, g in enumerate(global_arrays) if np.issubdtype(g.dtype, np.floating)]
    deltas = [
        np.asarray(trained[i], dtype=np.float32) - np.asarray(global_arrays[i], dtype=np.float32)
        for i in floats
    ]
    clipped = dpc.clip_update(deltas, plan.clip_norm)
    update = list(clipped.arrays)
    if plan.noise == "distributed":
        shares = dpc.distributed_noise_share(
            [d.shape for d in update],
            plan.noise_multiplier,
            plan.clip_norm,
            plan.min_survivors,
            dpc.secure_rng(),
        )
        update = [u + s.astype(np.float32) for u, s in zip(update, shares, strict=True)]
    out = [np.array(a, copy=True) for a in global_arrays]
    for i, u in zip(floats, update, strict=True):
        out[i] = (np.asarray(global_arrays[i], dtype=np.float32) + u).astype(global_arrays[i].dtype)
    return out, not clipped.clipped
