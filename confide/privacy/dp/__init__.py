"""Differential-privacy accounting of Confide: the privacy ledger and fail-closed budgets.

:class:`PrivacyLedger` records every application of a DP mechanism as a :class:`DpEvent` in
SQLite (the site's own file; the coordinator keeps a mirror of the same schema). ε is always
derived from the recorded events by the PRV accountant (Opacus), with RDP beside it as a
cross-check and Google's dp-accounting PLD as an independent recomputation; see
``confide.privacy.dp.accounting`` for why.

Submodules: ``federated`` (the ``[dp]`` settings and the per-round plan every side reads),
``client`` (DP-FedAvg: clipping, noise shares, the noisy mean, adaptive clipping, the
noise solvers) and ``sgd`` (Opacus DP-SGD for one site's local training; imported on
demand, it pulls in torch and Opacus).
"""

from __future__ import annotations

from confide.privacy.dp.accounting import (
    MECHANISMS,
    METHODS,
    AccountingError,
    DpError,
    DpEvent,
    InvalidDpEvent,
    Method,
    accountant_versions,
    epsilon,
    epsilon_report,
    group_events,
    projected_epsilon,
)
from confide.privacy.dp.ledger import (
    Budget,
    BudgetExceeded,
    LedgerCorrupted,
    LedgerError,
    NoBudget,
    PrivacyLedger,
    Projection,
)

__all__ = [
    "MECHANISMS",
    "METHODS",
    "AccountingError",
    "Budget",
    "BudgetExceeded",
    "DpError",
    "DpEvent",
    "InvalidDpEvent",
    "LedgerCorrupted",
    "LedgerError",
    "Method",
    "NoBudget",
    "PrivacyLedger",
    "Projection",
    "accountant_versions",
    "epsilon",
    "epsilon_report",
    "group_events",
    "projected_epsilon",
]
