"""The privacy ledger: an append-only SQLite record of every DP event, and fail-closed budgets.

The ledger *is* the privacy state. A site never keeps an accountant between rounds: its ε is
recomputed from **all** of its recorded events, across every federation it took part in and
across restarts, so costs compose and nothing resets. The same schema serves the site (its own
file) and the coordinator (a mirror of every site's events, filled by :meth:`mirror`).

* Events are append-only: there is no update or delete API, SQLite triggers refuse UPDATE and
  DELETE, and each row stores the SHA-256 of its content (``uid``). Reading verifies every row
  and that ids are contiguous, so an edit or a deletion done behind the ledger's back raises
  :class:`LedgerCorrupted` instead of silently lowering ε.
* Budgets (ε_max, δ) are per site and span all federations. :meth:`PrivacyLedger.check`
  projects ε of the spent events composed with the planned ones and raises
  :class:`BudgetExceeded` (nothing recorded) if it would exceed ε_max; a site without a budget
  raises :class:`NoBudget`: there is no unlimited default.
* Durability as in ``confide.server.store``: WAL, ``synchronous=FULL``, explicit
  ``BEGIN IMMEDIATE`` transactions, one lock.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confide.db import DurableDB, connect
from confide.privacy.dp.accounting import (
    EVENT_FIELDS,
    AccountingError,
    DpError,
    DpEvent,
    InvalidDpEvent,
    Method,
    accountant_versions,
    epsilon,
    group_events,
)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dp_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dp_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL,
    site TEXT NOT NULL,
    federation TEXT NOT NULL,
    round INTEGER NOT NULL,
    mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    clip_norm REAL NOT NULL,
    delta REAL NOT NULL,
    dataset_size INTEGER NOT NULL,
    time REAL NOT NULL,
    note TEXT,
    recorded REAL NOT NULL,
    origin TEXT NOT NULL,
    UNIQUE (site, federation, round, uid)
);
CREATE INDEX IF NOT EXISTS dp_events_site ON dp_events (site);
CREATE TRIGGER IF NOT EXISTS dp_events_no_update BEFORE UPDATE ON dp_events
BEGIN SELECT RAISE(ABORT, 'dp_events is append-only'); END;
CREATE TRIGGER IF NOT EXISTS dp_events_no_delete BEFORE DELETE ON dp_events
BEGIN SELECT RAISE(ABORT, 'dp_events is append-only'); END;
CREATE TABLE IF NOT EXISTS data_reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    payload TEXT NOT NULL,
    recorded REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS data_reports_no_update BEFORE UPDATE ON data_reports
BEGIN SELECT RAISE(ABORT, 'data_reports is append-only'); END;
CREATE TRIGGER IF NOT EXISTS data_reports_no_delete BEFORE DELETE ON data_reports
BEGIN SELECT RAISE(ABORT, 'data_reports is append-only'); END;
CREATE TABLE IF NOT EXISTS dp_budgets (
    site TEXT PRIMARY KEY, epsilon_max REAL NOT NULL, delta REAL NOT NULL, updated REAL NOT NULL
);
"""

_EVENT_COLUMNS = EVENT_FIELDS


class LedgerError(DpError, RuntimeError):
    """The ledger file cannot be used (unwritable, or another schema)."""


class LedgerCorrupted(DpError, RuntimeError):
    """A ledger row no longer matches its recorded content hash, or rows were deleted."""


class NoBudget(DpError):
    """The site has no privacy budget: fail closed, it takes no DP round."""

    def __init__(self, site: str) -> None:
        self.site = site
        super().__init__(
            f"site {site!r} has no privacy budget, so it takes part in no DP round (fail "
            "closed). Fix: set one with PrivacyLedger.set_budget(site, epsilon_max, delta), "
            "e.g. [privacy] epsilon_max = 8.0, delta = 1e-5 in the site's config"
        )


class BudgetExceeded(DpError):
    """The planned round would take the site's ε over ε_max: it is refused, nothing recorded."""

    def __init__(
        self, site: str, spent: float, projected: float, epsilon_max: float, delta: float = 0.0
    ) -> None:
        self.site = site
        self.spent = spent
        self.projected = projected
        self.epsilon_max = epsilon_max
        self.delta = delta
        at = f" at δ={delta:g}" if delta else ""
        super().__init__(
            f"site {site!r} refuses the round: projected ε={projected:.4f}{at} would exceed "
            f"its budget ε_max={epsilon_max:g} (spent so far ε={spent:.4f}, remaining "
            f"{max(0.0, epsilon_max - spent):.4f}). Nothing was recorded. Fix: plan fewer "
            "steps, a lower sampling rate or a larger noise multiplier for this site, or leave "
            "it out of the round; raising ε_max is a policy decision for the data owner"
        )

    def as_dict(self) -> dict[str, Any]:
        """The refusal as plain data, to record in the round."""
        return {
            "error": "BudgetExceeded",
            "site": self.site,
            "spent": self.spent,
            "projected": self.projected,
            "epsilon_max": self.epsilon_max,
            "delta": self.delta,
        }


@dataclass(frozen=True)
class Budget:
    site: str
    epsilon_max: float
    delta: float
    updated: float


@dataclass(frozen=True)
class Projection:
    """The accepted outcome of :meth:`PrivacyLedger.check`."""

    site: str
    spent: float
    projected: float
    epsilon_max: float
    delta: float
    method: str

    @property
    def remaining_after(self) -> float:
        return max(0.0, self.epsilon_max - self.projected)

    @property
    def cost(self) -> float:
        """ε the planned events add on top of what is spent (composition is sub-additive)."""
        return self.projected - self.spent


class PrivacyLedger(DurableDB):
    """Append-only DP event log and per-site budgets in one SQLite file.

    ``site`` is the ledger owner's site id (a site's own ledger); it fills events recorded
    without one and is the default for the per-site queries. A coordinator mirror leaves it
    ``None`` and passes ``site`` explicitly.
    """

    def __init__(self, path: Path | str, *, site: str | None = None) -> None:
        self.path = Path(path)
        self.site = site
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = connect(self.path)
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO dp_meta VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            row = self._db.execute(
                "SELECT value FROM dp_meta WHERE key = 'schema_version'"
            ).fetchone()
        except (OSError, sqlite3.Error) as e:
            raise LedgerError(
                f"cannot open the privacy ledger {self.path} ({e}). Fix: point it at a "
                "writable file on local disk"
            ) from e
        if row is None or row[0] != str(SCHEMA_VERSION):
            self._db.close()
            raise LedgerError(
                f"privacy ledger {self.path} has schema version {row and row[0]!r}, this "
                f"Confide reads {SCHEMA_VERSION}. Fix: use the Confide version that wrote it"
            )

    # --- lifecycle -----------------------------------------------------------------------

    def _site(self, site: str | None) -> str:
        s = site if site is not None else self.site
        if not s:
            raise LedgerError(
                "no site given and this ledger has no owner site. Fix: pass site=... (or open "
                "the site's ledger with PrivacyLedger(path, site=...))"
            )
        return s

    # --- events (append-only) -----------------------------------------------------------

    def record(self, event: DpEvent) -> int:
        """Append one event (the site's own); returns its id. Recording the same content
        again (a retried call) returns the existing id and adds nothing."""
        return self._insert([event], origin="local")[0]

    def record_many(self, events: Sequence[DpEvent]) -> list[int]:
        """Append many events in one transaction (idempotent per event, like :meth:`record`)."""
        return self._insert(list(events), origin="local")

    def record_report(self, kind: str, payload: Mapping[str, Any], site: str | None = None) -> int:
        """Append a data-protection report that is not a DP event (e.g. ``deid_report``:
        what de-identification did, never the data); returns its id. Append-only."""
        if not kind:
            raise LedgerError("a report needs a kind, e.g. 'deid_report'. Fix: name it")
        owner = self._site(site)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO data_reports (site, kind, sha256, payload, recorded) "
                "VALUES (?, ?, ?, ?, ?)",
                (owner, kind, digest, text, time.time()),
            )
            return int(cur.lastrowid or 0)

    def reports(self, site: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """The recorded reports, oldest first; a row whose content no longer matches its
        hash raises :class:`LedgerCorrupted`."""
        query = "SELECT id, site, kind, sha256, payload, recorded FROM data_reports"
        clauses, args = [], []
        if site is not None:
            clauses.append("site = ?")
            args.append(site)
        if kind is not None:
            clauses.append("kind = ?")
            args.append(kind)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        out = []
        for rid, owner, rkind, digest, text, recorded in rows:
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != digest:
                raise LedgerCorrupted(
                    f"report {rid} ({rkind}) of site {owner!r} no longer matches its hash. "
                    "Fix: restore the ledger from a backup and compare with the audit log"
                )
            out.append(
                {
                    "id": rid,
                    "site": owner,
                    "kind": rkind,
                    "sha256": digest,
                    "payload": json.loads(text),
                    "recorded": recorded,
                }
            )
        return out

    def mirror(self, events: Iterable[DpEvent | Mapping[str, Any]]) -> int:
        """Coordinator side: insert events received from sites; returns how many were new.

        Idempotent by (site, federation, round, uid): a retried upload never double-counts.
        Each event must name its site; a mapping carrying a ``uid`` must match its content.
        """
        evs: list[DpEvent] = []
        for item in events:
            if isinstance(item, DpEvent):
                ev = item
            else:
                ev = DpEvent.from_dict(item)
                claimed = item.get("uid")
                if claimed is not None and claimed != ev.uid:
                    raise LedgerCorrupted(
                        f"received event of site {ev.site!r} (federation {ev.federation!r}, "
                        f"round {ev.round}) claims uid {claimed} but its content hashes to "
                        f"{ev.uid}: it was altered in transit or at the site. Nothing was "
                        "mirrored. Fix: have the site re-send its ledger export"
                    )
            if ev.site is None:
                raise InvalidDpEvent("site", None, "a mirrored event must name its site")
            evs.append(ev)
        before = self._count()
        self._insert(evs, origin="mirror")
        return self._count() - before

    def _count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM dp_events").fetchone()[0])

    def _insert(self, events: Sequence[DpEvent], origin: str) -> list[int]:
        prepared: list[DpEvent] = []
        for ev in events:
            if not isinstance(ev, DpEvent):
                raise InvalidDpEvent("event", ev, "must be a confide.privacy.dp.DpEvent")
            prepared.append(ev if ev.site is not None else ev.with_site(self._site(None)))
        ids: list[int] = []
        now = time.time()
        with self._tx() as db:
            for ev in prepared:
                uid = ev.uid
                row = db.execute(
                    "SELECT id FROM dp_events WHERE site = ? AND federation = ? AND round = ? "
                    "AND uid = ?",
                    (ev.site, ev.federation, ev.round, uid),
                ).fetchone()
                if row is not None:
                    ids.append(int(row[0]))
                    continue
                cur = db.execute(
                    f"INSERT INTO dp_events (uid, {', '.join(_EVENT_COLUMNS)}, recorded, origin) "
                    f"VALUES ({', '.join('?' * (len(_EVENT_COLUMNS) + 3))})",
                    (uid, *(getattr(ev, c) for c in _EVENT_COLUMNS), now, origin),
                )
                assert cur.lastrowid is not None
                ids.append(int(cur.lastrowid))
        return ids

    def _rows(
        self, site: str | None = None, federation: str | None = None
    ) -> list[tuple[int, str, DpEvent]]:
        """(id, uid, event) of the matching rows, after verifying the whole table."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, uid, {', '.join(_EVENT_COLUMNS)} FROM dp_events ORDER BY id"
            ).fetchall()
            seq = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'dp_events'"
            ).fetchone()
        high = int(seq[0]) if seq is not None else 0
        if len(rows) != high or any(r[0] != i for i, r in enumerate(rows, start=1)):
            raise LedgerCorrupted(
                f"privacy ledger {self.path} holds {len(rows)} event rows but {high} were "
                "appended: rows were deleted outside the ledger, so ε would be understated. "
                "Fix: restore the ledger from a backup (or the coordinator's mirror); until "
                "then the site takes no DP round"
            )
        out: list[tuple[int, str, DpEvent]] = []
        for r in rows:
            rid, uid = int(r[0]), str(r[1])
            try:
                ev = DpEvent(**dict(zip(_EVENT_COLUMNS, r[2:], strict=True)))
            except InvalidDpEvent as e:
                raise self._corrupted(rid, f"its content is invalid ({e})") from e
            if ev.uid != uid:
                raise self._corrupted(rid, "its content no longer matches its uid")
            if (site is None or ev.site == site) and (
                federation is None or ev.federation == federation
            ):
                out.append((rid, uid, ev))
        return out

    def _corrupted(self, rid: int, why: str) -> LedgerCorrupted:
        return LedgerCorrupted(
            f"privacy ledger {self.path}: event row {rid} was altered outside the ledger "
            f"({why}). Fix: restore the ledger from a backup (or the coordinator's mirror); "
            "until then the site takes no DP round"
        )

    def events(self, site: str | None = None, federation: str | None = None) -> list[DpEvent]:
        """Recorded events in order, optionally of one site and/or federation (verified)."""
        return [ev for _, _, ev in self._rows(site, federation)]

    def verify(self) -> int:
        """Check every row against its uid and that none was deleted; returns the row count."""
        return len(self._rows())

    def export(self, site: str | None = None) -> list[dict[str, Any]]:
        """Events as plain dicts (with ``id`` and ``uid``) for reports and uploads to
        :meth:`mirror`."""
        return [{"id": rid, "uid": uid, **ev.to_dict()} for rid, uid, ev in self._rows(site)]

    def sites(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT site FROM dp_events UNION SELECT site FROM dp_budgets ORDER BY 1"
            ).fetchall()
        return [str(r[0]) for r in rows]

    # --- budgets --------------------------------------------------------------------------

    def set_budget(self, site: str | None, epsilon_max: float, delta: float) -> Budget:
        """Set (or change) the site's budget; it spans every federation the site joins."""
        s = self._site(site)
        if not _finite(epsilon_max) or epsilon_max <= 0:
            raise InvalidDpEvent("epsilon_max", epsilon_max, "a budget must be a finite ε > 0")
        if not _finite(delta) or not 0 < delta < 1:
            raise InvalidDpEvent("delta", delta, "a budget's δ must be in (0, 1), e.g. 1e-5")
        b = Budget(s, float(epsilon_max), float(delta), time.time())
        with self._tx() as db:
            db.execute(
                "INSERT INTO dp_budgets VALUES (?, ?, ?, ?) ON CONFLICT (site) DO UPDATE SET "
                "epsilon_max = excluded.epsilon_max, delta = excluded.delta, "
                "updated = excluded.updated",
                (b.site, b.epsilon_max, b.delta, b.updated),
            )
        return b

    def budget(self, site: str | None = None) -> Budget | None:
        s = self._site(site)
        with self._lock:
            row = self._db.execute(
                "SELECT epsilon_max, delta, updated FROM dp_budgets WHERE site = ?", (s,)
            ).fetchone()
        return None if row is None else Budget(s, float(row[0]), float(row[1]), float(row[2]))

    def _require_budget(self, site: str) -> Budget:
        b = self.budget(site)
        if b is None:
            raise NoBudget(site)
        return b

    def spent(
        self, site: str | None = None, method: Method = "prv", *, delta: float | None = None
    ) -> float:
        """ε the site has spent over ALL federations, at its budget's δ (or ``delta``)."""
        s = self._site(site)
        d = delta if delta is not None else self._require_budget(s).delta
        return epsilon(self.events(site=s), d, method)

    def remaining(self, site: str | None = None) -> float:
        s = self._site(site)
        b = self._require_budget(s)
        return max(0.0, b.epsilon_max - self.spent(s, delta=b.delta))

    def check(
        self, site: str | None, planned: Sequence[DpEvent], method: Method = "prv"
    ) -> Projection:
        """Fail closed: the projection if ``planned`` fits the budget, else
        :class:`BudgetExceeded` (or :class:`NoBudget`); records nothing either way."""
        s = self._site(site)
        b = self._require_budget(s)
        for ev in planned:
            if not isinstance(ev, DpEvent):
                raise InvalidDpEvent("planned", ev, "must be confide.privacy.dp.DpEvent")
            if ev.site is not None and ev.site != s:
                raise InvalidDpEvent(
                    "site", ev.site, f"a planned event of site {s!r} names another"
                )
        past = self.events(site=s)
        spent = epsilon(past, b.delta, method)
        projected = epsilon([*past, *planned], b.delta, method) if planned else spent
        if not math.isfinite(projected) or projected > b.epsilon_max:
            raise BudgetExceeded(s, spent, projected, b.epsilon_max, b.delta)
        return Projection(s, spent, projected, b.epsilon_max, b.delta, method)

    def eligible(
        self,
        sites: Iterable[str],
        planned_per_site: Mapping[str, Sequence[DpEvent]] | Sequence[DpEvent],
        method: Method = "prv",
    ) -> list[str]:
        """Coordinator: the sites (in order) whose budget admits the planned round.

        Sites without a budget, over budget, with no planned events given, or whose ε cannot
        be computed are left out (fail closed).
        """
        out: list[str] = []
        for s in sites:
            if isinstance(planned_per_site, Mapping):
                if s not in planned_per_site:
                    continue
                planned = planned_per_site[s]
            else:
                planned = planned_per_site
            try:
                self.check(s, [ev.with_site(s) for ev in planned], method)
            except (NoBudget, BudgetExceeded, AccountingError, LedgerCorrupted):
                continue
            out.append(s)
        return out

    def summary(self, site: str | None = None, *, include_pld: bool = False) -> dict[str, Any]:
        """The site's privacy report: PRV ε with RDP beside it, budget, events per federation."""
        s = self._site(site)
        b = self._require_budget(s)
        evs = self.events(site=s)
        prv = epsilon(evs, b.delta, "prv")
        rdp = epsilon(evs, b.delta, "rdp")
        per_fed: dict[str, int] = {}
        for ev in evs:
            per_fed[ev.federation] = per_fed.get(ev.federation, 0) + 1
        out: dict[str, Any] = {
            "site": s,
            "epsilon": prv,
            "method": "prv",
            "epsilon_rdp": rdp,
            "rdp_over_prv": rdp / prv if prv > 0 else None,
            "epsilon_max": b.epsilon_max,
            "delta": b.delta,
            "remaining": max(0.0, b.epsilon_max - prv),
            "events": len(evs),
            "steps": sum(ev.steps for ev in evs),
            "groups": len(group_events(evs)),
            "federations": per_fed,
            "accountants": accountant_versions(),
        }
        if include_pld:
            out["epsilon_pld"] = epsilon(evs, b.delta, "pld")
        return out

    def export_json(self, site: str | None = None) -> str:
        return json.dumps(self.export(site), sort_keys=True)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
