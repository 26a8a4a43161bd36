"""Typed errors of de-identification: each says what failed and what to do about it."""

from __future__ import annotations

from collections.abc import Sequence

from confide.errors import ConfideError


class DeidError(ConfideError, ValueError):
    """De-identification cannot proceed; nothing was written, the message says why."""


class UnknownColumnError(DeidError):
    """The input has columns the config gives no role; they are never silently kept."""

    def __init__(self, columns: Sequence[str], known: Sequence[str] = ()) -> None:
        self.columns = list(columns)
        shown = ", ".join(self.columns)
        example = self.columns[0]
        super().__init__(
            f"{len(self.columns)} input column(s) have no role: {shown}. Fix: add each to "
            f'[columns] of the config with a role, e.g. {example} = "keep" (or "direct", '
            '"quasi", "sensitive", "free_text"); a column is never passed through unless '
            "its role says so"
        )


class KAnonymityNotReached(DeidError):
    """The k-anonymity / ℓ-diversity gate failed closed: no table, no training."""

    def __init__(
        self,
        *,
        k_wanted: int,
        k_reached: int,
        l_wanted: int,
        suppression_needed: int,
        budget: int,
        rows: int,
        max_suppression: float,
        levels: dict[str, str],
        blocking: Sequence[tuple[str, int]],
    ) -> None:
        self.k_wanted = k_wanted
        self.k_reached = k_reached
        self.l_wanted = l_wanted
        self.suppression_needed = suppression_needed
        self.budget = budget
        self.rows = rows
        self.blocking = [name for name, _ in blocking]
        need = suppression_needed / rows if rows else 1.0
        lvl = ", ".join(f"{c}={v}" for c, v in levels.items()) or "no quasi-identifiers"
        target = f"k={k_wanted}" + (f", ℓ={l_wanted}" if l_wanted > 1 else "")
        if blocking:
            blk = "; ".join(
                f"{c} (fully generalized, {n} rows would need suppressing)" for c, n in blocking
            )
            who = f"Quasi-identifiers that block it: {blk}."
        else:
            who = (
                "No single quasi-identifier blocks it"
                + (" (the sensitive columns lack diversity for ℓ)" if l_wanted > 1 else "")
                + "."
            )
        more = (
            f"raise [k_anonymity].max_suppression to at least {need:.3f}, "
            if suppression_needed < rows
            else ""
        )
        super().__init__(
            f"k-anonymity gate failed closed: {target} needs suppressing {suppression_needed} "
            f"of {rows} rows ({100 * need:.1f}%) but the budget is {budget} rows "
            f"(max_suppression = {max_suppression:g}); within the budget the best "
            f"generalization ({lvl}) reaches only k={k_reached}. {who} Nothing was written; "
            f"do not train on this table. Fix: {more}lower k or l_diversity, raise max_level "
            "of the blocking columns so they can generalize further, or reclassify them"
        )
