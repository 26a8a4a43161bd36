"""The compliance report: ε per site recomputed from the ledgers, audit chains verified, one file.

A compliance officer gets one self-contained HTML page (and the same content as JSON) that
answers: how much privacy budget has each site spent, recomputed from the recorded DP events
(never from a stored ε), is every site within its budget, were the ledger rows and the signed
audit logs left untouched, and which accountant versions produced the numbers.

The report is built in two steps so that it does not care where its data came from:

* :class:`ReportInputs` is plain data: ledger export rows (each naming its site), budgets,
  de-identification reports, audit-log entries with the public keys to check them, and the
  result of reading each ledger file. :func:`inputs_from_files` fills it from SQLite ledgers
  and audit logs (read from a snapshot: the evidence files are never written);
  :meth:`ReportInputs.to_json` / :func:`inputs_from_json` carry it over the wire.
* :func:`build_report` re-verifies every row (its content against its ``uid``), recomputes
  ε per site with PRV (enforced), RDP (cross-check) and PLD (independent, when Google's
  dp-accounting is installed), verifies every audit chain and gives one verdict.
  :func:`render_html` turns that JSON-able dict into the page.

Nothing here trusts an ε found in the inputs: there is none. A site whose events carry no
budget is reported as failing closed, and a corrupted ledger is a failed check in the
report, not an exception.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from confide.errors import DataNotFoundError
from confide.htmlpage import ReportError, bullets, page_head, png_img, write_html_json
from confide.htmlpage import esc as _e
from confide.htmlpage import num as _num
from confide.htmlpage import okmark as _okmark
from confide.htmlpage import table as _table
from confide.privacy.audit import (
    AuditError,
    AuditLog,
    Entry,
    read_export,
    read_public_key,
    trust_store,
    verify_entries,
)
from confide.privacy.dp import accounting
from confide.privacy.dp.accounting import (
    EVENT_FIELDS,
    PLD_DISCRETIZATION,
    PRV_RELATIVE_ERROR,
    DpError,
    DpEvent,
    Method,
    accountant_versions,
    epsilon,
    group_events,
)
from confide.privacy.dp.ledger import LedgerCorrupted, LedgerError, PrivacyLedger

REPORT_FORMAT = "confide-compliance-report-1"
INPUTS_FORMAT = "confide-report-inputs-1"

#: At most this many rounds per site get a PRV ε on the ε-over-rounds curve (evenly spaced,
#: the last included); RDP is computed after every round. One PRV evaluation costs 0.25-2 s
#: on a small machine, so this bounds the report's time.
CURVE_PRV_POINTS = 4
#: PRV discretization error of the intermediate curve points, relative to their RDP ε. They
#: are still upper bounds on ε, at most ~1 % above the value the ledger would enforce; the
#: last point (the ε the site has spent) is computed exactly as the ledger does.
CURVE_PRV_RELATIVE_ERROR = 0.01
#: Relative disagreement between accountants above which the report warns.
CROSS_CHECK_TOLERANCE = 0.01

_EVENT_FIELDS = EVENT_FIELDS


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class AuditSource:
    """One audit log to verify: its exported entries and the writers' public keys (PEM)."""

    name: str
    entries: list[dict[str, Any]]
    trust: list[str]
    expected_head: str | None = None


@dataclass(frozen=True)
class LedgerCheck:
    """How reading one ledger went: ``ok`` when the ledger's own verification passed."""

    name: str
    ok: bool
    rows: int
    message: str = ""


@dataclass
class ReportInputs:
    """Everything :func:`build_report` needs, as plain data (JSON-able via :meth:`to_json`).

    ``events`` are ledger export rows (``PrivacyLedger.export()``: the event fields plus
    ``id`` and ``uid``), each naming its ``site``; an optional ``source`` names the ledger
    it came from. ``budgets`` maps site -> ``{"epsilon_max", "delta"}``. ``data_reports``
    are ``PrivacyLedger.reports()`` rows. ``ledgers`` records how reading each ledger went
    (a row-level edit or a deletion shows there), ``warnings`` anything noticed on the way.
    """

    events: list[dict[str, Any]] = field(default_factory=list)
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)
    data_reports: list[dict[str, Any]] = field(default_factory=list)
    audit: list[AuditSource] = field(default_factory=list)
    ledgers: list[LedgerCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The inputs as a JSON-ready dict; :func:`inputs_from_json` reads it back."""
        return {
            "format": INPUTS_FORMAT,
            "events": [dict(e) for e in self.events],
            "budgets": {s: dict(b) for s, b in self.budgets.items()},
            "data_reports": [dict(r) for r in self.data_reports],
            "audit": [asdict(a) for a in self.audit],
            "ledgers": [asdict(c) for c in self.ledgers],
            "warnings": list(self.warnings),
        }


def inputs_from_json(obj: Mapping[str, Any] | str | bytes) -> ReportInputs:
    """:class:`ReportInputs` from :meth:`ReportInputs.to_json` output (a dict or its text)."""
    if isinstance(obj, (str, bytes)):
        try:
            obj = json.loads(obj)
        except ValueError as e:
            raise ReportError(
                f"report inputs are not JSON ({e}). Fix: pass ReportInputs.to_json() output"
            ) from None
    if not isinstance(obj, Mapping) or obj.get("format") != INPUTS_FORMAT:
        raise ReportError(
            f"report inputs must be a JSON object with format {INPUTS_FORMAT!r}. Fix: pass "
            "ReportInputs.to_json() output"
        )

    def items(name: str, kind: type) -> list[Any]:
        value = obj.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            raise ReportError(
                f"report inputs: {name!r} must be a list of {kind.__name__}. Fix: pass "
                "ReportInputs.to_json() output"
            )
        return value

    budgets = obj.get("budgets", {})
    if not isinstance(budgets, Mapping) or not all(
        isinstance(s, str) and isinstance(b, Mapping) for s, b in budgets.items()
    ):
        raise ReportError(
            "report inputs: 'budgets' must map site -> {epsilon_max, delta}. Fix: pass "
            "ReportInputs.to_json() output"
        )
    try:
        audit = [
            AuditSource(
                name=str(a["name"]),
                entries=list(a["entries"]),
                trust=[str(k) for k in a["trust"]],
                expected_head=a.get("expected_head"),
            )
            for a in items("audit", dict)
        ]
        ledgers = [
            LedgerCheck(str(c["name"]), bool(c["ok"]), int(c["rows"]), str(c.get("message", "")))
            for c in items("ledgers", dict)
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(
            f"report inputs: an audit source or ledger check is malformed ({e!r}). Fix: pass "
            "ReportInputs.to_json() output"
        ) from None
    return ReportInputs(
        events=[dict(e) for e in items("events", dict)],
        budgets={s: dict(b) for s, b in budgets.items()},
        data_reports=[dict(r) for r in items("data_reports", dict)],
        audit=audit,
        ledgers=ledgers,
        warnings=[str(w) for w in items("warnings", str)],
    )


def _snapshot(path: Path, into: Path, what: str) -> Path:
    """A consistent copy of an SQLite file (WAL included), so the evidence is never written."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{what}: {path} not found. Fix: pass an existing file")
    copy = into / f"{len(list(into.iterdir()))}-{path.name}"
    try:
        src = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(copy)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise ReportError(
            f"{what}: {path} is not a readable SQLite file ({e}). Fix: pass the ledger.db / "
            "audit.db a site or the coordinator wrote (or, for --log, its JSON export)"
        ) from None
    return copy


def _has_table(path: Path, table: str) -> bool:
    db = sqlite3.connect(path)
    try:
        row = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
    finally:
        db.close()
    return row is not None


def _raw_ledger_rows(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every event and report row as stored, unverified (to show a corrupted ledger)."""
    db = sqlite3.connect(path)
    try:
        events = [
            dict(zip(("id", "uid", *_EVENT_FIELDS), row, strict=True))
            for row in db.execute(
                f"SELECT id, uid, {', '.join(_EVENT_FIELDS)} FROM dp_events ORDER BY id"
            )
        ]
        reports = []
        for rid, site, kind, digest, text, recorded in db.execute(
            "SELECT id, site, kind, sha256, payload, recorded FROM data_reports ORDER BY id"
        ):
            try:
                payload: Any = json.loads(text)
            except ValueError:
                payload = text  # re-hashing it then shows the edit
            reports.append(
                {
                    "id": rid,
                    "site": site,
                    "kind": kind,
                    "sha256": digest,
                    "payload": payload,
                    "recorded": recorded,
                }
            )
    finally:
        db.close()
    return events, reports


def _read_ledger(path: Path, tmp: Path, inputs: ReportInputs) -> None:
    copy = _snapshot(path, tmp, "--ledger")
    if not _has_table(copy, "dp_events"):
        raise ReportError(
            f"--ledger: {path} is an SQLite file but not a privacy ledger (no dp_events "
            "table). Fix: pass a site's state_dir/ledger.db or the coordinator's mirror"
        )
    name = str(path)
    try:
        with PrivacyLedger(copy) as led:
            budgets: dict[str, dict[str, float]] = {}
            for site in led.sites():
                stored = led.budget(site)
                if stored is not None:
                    budgets[site] = {"epsilon_max": stored.epsilon_max, "delta": stored.delta}
            try:
                events = led.export()
                reports = led.reports()
                check = LedgerCheck(name, True, len(events))
            except LedgerCorrupted as e:
                events, reports = _raw_ledger_rows(copy)
                check = LedgerCheck(name, False, len(events), str(e).replace(str(copy), name))
    except LedgerError as e:
        raise ReportError(f"--ledger: {str(e).replace(str(copy), name)}") from None
    inputs.ledgers.append(check)
    inputs.events.extend({**row, "source": name} for row in events)
    inputs.data_reports.extend({**row, "source": name} for row in reports)
    for site, b in budgets.items():
        have = inputs.budgets.get(site)
        if have is not None and have != b:
            keep = min(have, b, key=lambda x: x["epsilon_max"])
            inputs.warnings.append(
                f"site {site!r} has different budgets in different ledgers ({have} and {b} "
                f"in {name}); the report uses the stricter one, {keep}"
            )
            b = keep
        inputs.budgets[site] = b


def _entry_dict(e: Entry) -> dict[str, Any]:
    try:
        return e.to_dict()
    except ValueError:  # payload edited into invalid JSON: verify_entries reports it
        d = asdict(e)
        d["time"] = e.time
        return d


def _read_audit(path: Path, keys: Sequence[Path], head: str | None, tmp: Path) -> AuditSource:
    pems = []
    for k in keys:
        if not Path(k).is_file():
            raise DataNotFoundError(f"--trust: {k} not found. Fix: pass the writer's .pem file")
        read_public_key(Path(k))  # refuses anything but an Ed25519 public key, with the fix
        pems.append(Path(k).read_text(encoding="ascii"))
    if Path(path).suffix == ".json":
        if not Path(path).is_file():
            raise DataNotFoundError(f"--log: {path} not found. Fix: pass an existing file")
        try:
            entries = read_export(Path(path))
        except AuditError as e:
            raise ReportError(str(e)) from None
    else:
        copy = _snapshot(Path(path), tmp, "--log")
        if not _has_table(copy, "audit_entries"):
            raise ReportError(
                f"--log: {path} is an SQLite file but not an audit log (no audit_entries "
                "table). Fix: pass a state_dir/audit.db or its JSON export"
            )
        try:
            with AuditLog(copy) as log:
                entries = [_entry_dict(e) for e in log.entries()]
        except AuditError as e:
            raise ReportError(f"--log: {str(e).replace(str(copy), str(path))}") from None
    return AuditSource(str(path), entries, pems, head)


def inputs_from_files(
    ledgers: Sequence[Path],
    logs: Sequence[tuple[Path, Sequence[Path]] | tuple[Path, Sequence[Path], str | None]] = (),
) -> ReportInputs:
    """Read privacy ledgers and audit logs (SQLite, or an audit log's JSON export).

    ``logs`` pairs each log with its writers' public-key files, optionally with a head hash
    published earlier: ``(path, [key.pem, ...])`` or ``(path, [key.pem, ...], head)``. Files
    are copied before they are opened, so the evidence is never modified. A ledger that
    fails its own verification is read row by row and reported, not raised.
    """
    inputs = ReportInputs()
    with tempfile.TemporaryDirectory(prefix="confide-report-") as tmp_name:
        tmp = Path(tmp_name)
        for path in ledgers:
            _read_ledger(Path(path), tmp, inputs)
        for item in logs:
            head = item[2] if len(item) > 2 else None
            inputs.audit.append(_read_audit(Path(item[0]), list(item[1]), head, tmp))
    return inputs


def add_records(
    inputs: ReportInputs, records: Mapping[str, Any], name: str, trust: Sequence[Path] = ()
) -> ReportInputs:
    """Add a coordinator's audit records (``confide audit fetch``) to ``inputs``.

    The mirrored events and budgets join the ledgers' (an event present in a site's own
    ledger too is counted once), the coordinator's audit log is verified like any other.
    Its signatures are checked against ``trust`` (the coordinator's public key, obtained
    separately); without it, against the key shipped inside the records, with a warning:
    that proves the log is intact and self-consistent, not who wrote it.
    """
    if records.get("format") != "confide-audit-records-1":
        raise ReportError(
            f"--records: {name} is not a coordinator's audit records. Fix: pass a file "
            "written by `confide audit fetch`"
        )
    events = records.get("events")
    if events is None:
        inputs.ledgers.append(
            LedgerCheck(name, False, 0, str(records.get("ledger_error") or "ledger unreadable"))
        )
    else:
        inputs.events.extend({**e, "source": name} for e in events)
        inputs.ledgers.append(LedgerCheck(name, True, len(events)))
    for site, budget in (records.get("budgets") or {}).items():
        inputs.budgets.setdefault(site, dict(budget))
    if trust:
        pems = []
        for k in trust:
            if not Path(k).is_file():
                raise DataNotFoundError(f"--trust: {k} not found. Fix: pass the .pem file")
            read_public_key(Path(k))
            pems.append(Path(k).read_text(encoding="ascii"))
    else:
        pems = [str(records.get("audit_public_key_pem", ""))]
        inputs.warnings.append(
            f"{name}: the coordinator's audit log was checked against the public key inside "
            "the same records; pin the key you obtained from the federation admin with "
            "--trust to prove who wrote it"
        )
    entries = records.get("audit_log") or []
    inputs.audit.append(AuditSource(f"{name} (coordinator audit log)", list(entries), pems))
    return inputs


# --------------------------------------------------------------------------- accounting


def _account(
    method: Method | str, events: Sequence[DpEvent], delta: float
) -> tuple[float | None, str | None]:
    """(ε, None), or (None, why) when the accountant fails: a failed check, never a crash."""
    try:
        if method == "prv_curve":
            groups = group_events(events)
            rdp = accounting._rdp_epsilon(groups, delta)
            eps_error = max(accounting.PRV_EPS_ERROR_MIN, CURVE_PRV_RELATIVE_ERROR * rdp)
            # The same PRV accountant at a coarser discretization (still an upper bound):
            # at the ledger's 0.2 % a point costs ~1.5 s, at 1 % ~0.25 s, and these
            # intermediate points only draw the curve.
            value = accounting._prv_epsilon(groups, delta, eps_error)
        else:
            value = epsilon(events, delta, method)  # type: ignore[arg-type]
    except DpError as e:
        return None, str(e)
    except Exception as e:
        return None, f"{method} accounting failed: {e}"
    return _finite_or_none(value), None


def pld_available() -> bool:
    """Whether Google's dp-accounting (the PLD accountant) can be imported."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- the report


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _utc(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError, TypeError):
        return str(t)


@dataclass
class _Row:
    index: int
    raw: dict[str, Any]
    event: DpEvent | None
    site: str
    verified: bool
    problem: str | None


def _check_row(index: int, raw: Mapping[str, Any]) -> _Row:
    site = raw.get("site") if isinstance(raw.get("site"), str) and raw.get("site") else None
    where = f"row id {raw.get('id', '?')}" + (f" of {raw['source']}" if raw.get("source") else "")
    try:
        ev = DpEvent.from_dict(raw)
    except (DpError, TypeError) as e:
        return _Row(index, dict(raw), None, site or "?", False, f"{where}: invalid content ({e})")
    if ev.site is None:
        return _Row(index, dict(raw), ev, "?", False, f"{where}: the event names no site")
    uid = raw.get("uid")
    if uid is None:
        problem = f"{where}: no uid, so its content cannot be checked"
    elif uid != ev.uid:
        problem = f"{where}: content no longer matches its uid {str(uid)[:16]}... (edited)"
    else:
        problem = None
    return _Row(index, dict(raw), ev, ev.site, problem is None, problem)


def _event_row(r: _Row) -> dict[str, Any]:
    ev = r.event
    assert ev is not None
    return {
        "id": r.raw.get("id"),
        "uid": r.raw.get("uid"),
        "source": r.raw.get("source"),
        "mechanism": ev.mechanism,
        "noise_multiplier": ev.noise_multiplier,
        "sample_rate": ev.sample_rate,
        "steps": ev.steps,
        "clip_norm": ev.clip_norm,
        "delta": ev.delta,
        "dataset_size": ev.dataset_size,
        "federation": ev.federation,
        "round": ev.round,
        "time": ev.time,
        "time_utc": _utc(ev.time),
        "note": ev.note,
        "verified": r.verified,
    }


_DEID_FIELDS = (
    "profile",
    "k_requested",
    "k_achieved",
    "l_requested",
    "l_achieved",
    "rows_in",
    "rows_out",
    "rows_suppressed",
    "prosecutor_risk",
    "config_sha256",
    "created",
)


def _check_data_report(r: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    payload = r.get("payload")
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        ok = hashlib.sha256(text.encode("utf-8")).hexdigest() == r.get("sha256")
    except (TypeError, ValueError):
        ok = False
    summary: dict[str, Any] = {
        "id": r.get("id"),
        "kind": r.get("kind"),
        "recorded": r.get("recorded"),
        "recorded_utc": _utc(r["recorded"]) if isinstance(r.get("recorded"), float) else None,
        "sha256": r.get("sha256"),
        "verified": ok,
    }
    if isinstance(payload, Mapping):
        summary.update({k: payload[k] for k in _DEID_FIELDS if k in payload})
    problem = None
    if not ok:
        problem = (
            f"data report id {r.get('id', '?')} ({r.get('kind')}) of site {r.get('site')!r} "
            "no longer matches its sha256 (edited)"
        )
    return summary, problem


def _budget_of(raw: Any) -> tuple[dict[str, float] | None, str | None]:
    if not isinstance(raw, Mapping):
        return None, "the budget is not {epsilon_max, delta}"
    e, d = raw.get("epsilon_max"), raw.get("delta")
    real = (int, float)
    if not isinstance(e, real) or isinstance(e, bool) or not math.isfinite(e) or e <= 0:
        return None, f"its budget's epsilon_max {e!r} is not a finite number > 0"
    if not isinstance(d, real) or isinstance(d, bool) or not 0 < d < 1:
        return None, f"its budget's delta {d!r} is not in (0, 1)"
    return {"epsilon_max": float(e), "delta": float(d)}, None


def _curve_indices(rounds: int, points: int) -> list[int]:
    """The 1-based round counts that get a PRV ε: the first round (cheap, and where ε rises
    fastest) and ``points`` evenly spaced ones ending at the last."""
    n = min(rounds, max(points, 1))
    return sorted({1} | {math.ceil(rounds * i / n) for i in range(1, n + 1)}) if rounds else []


def build_report(
    inputs: ReportInputs,
    *,
    include_pld: bool | None = None,
    sites: Sequence[str] | None = None,
    curve_points: int = CURVE_PRV_POINTS,
) -> dict[str, Any]:
    """The compliance report as a JSON-able dict (see docs/audit.md for every field).

    ``include_pld``: compute Google dp-accounting's PLD ε beside PRV (``None``: when it is
    installed). ``sites``: report only these sites. ``curve_points``: at most this many
    rounds per site get a PRV ε on the ε-over-rounds curve (RDP gets every round).
    """
    started = time.time()
    if include_pld is None:
        include_pld = pld_available()
    elif include_pld and not pld_available():
        raise ReportError(
            "the PLD cross-check needs Google's dp-accounting, which is not installed. Fix: "
            "pip install 'dp-accounting>=0.6', or build the report without PLD"
        )
    failures: list[str] = []
    warnings: list[str] = list(inputs.warnings)

    # Ledger rows: each one re-verified against its uid; duplicates (site + mirror) merged.
    rows: list[_Row] = []
    seen: set[tuple[str, str, int, str]] = set()
    duplicates = 0
    row_problems: list[dict[str, Any]] = []
    for i, raw in enumerate(inputs.events):
        r = _check_row(i, raw)
        if r.problem:
            row_problems.append({"site": r.site, "id": raw.get("id"), "message": r.problem})
        if r.event is None or r.event.site is None:
            continue
        key = (r.event.site, r.event.federation, r.event.round, r.event.uid)
        if r.verified and key in seen:
            duplicates += 1
            continue
        if r.verified:
            seen.add(key)
        rows.append(r)
    reports_by_site: dict[str, list[dict[str, Any]]] = {}
    for rep in inputs.data_reports:
        summary, problem = _check_data_report(rep)
        site = str(rep.get("site"))
        reports_by_site.setdefault(site, []).append(summary)
        if problem:
            row_problems.append({"site": site, "id": rep.get("id"), "message": problem})

    known = sorted({r.site for r in rows} | set(inputs.budgets) | set(reports_by_site))
    if sites:
        unknown = [s for s in sites if s not in known]
        if unknown:
            raise ReportError(
                f"--site {', '.join(map(repr, unknown))}: not in the inputs (sites with "
                f"events, budgets or reports: {', '.join(known) or 'none'}). Fix: pass one "
                "of those, or the ledger that holds the site"
            )
        chosen = [s for s in known if s in set(sites)]
        # Problems of rows that name no usable site stay in; other sites' rows are left out.
        row_problems = [p for p in row_problems if p["site"] in chosen or p["site"] not in known]
    else:
        chosen = known

    site_reports = []
    for site in chosen:
        srows = sorted(
            (r for r in rows if r.site == site),
            key=lambda r: (r.event.time if r.event else 0.0, r.index),
        )
        rep = _site_report(
            site,
            srows,
            inputs.budgets.get(site),
            include_pld=include_pld,
            curve_points=curve_points,
            reports=reports_by_site.get(site, []),
        )
        rep["row_problems"] = [p for p in row_problems if p["site"] == site]
        for flag in rep["flags"]:
            (failures if flag["fails"] else warnings).append(f"site {site}: {flag['message']}")
        site_reports.append(rep)

    ledger_checks = [asdict(c) for c in inputs.ledgers]
    for c in inputs.ledgers:
        if not c.ok:
            failures.append(f"ledger {c.name}: {c.message}")
    for p in row_problems:
        failures.append(f"site {p['site']}: {p['message']}")
    rows_ok = not row_problems and all(c.ok for c in inputs.ledgers)

    audit = [_verify_audit(src) for src in inputs.audit]
    for a in audit:
        if not a["ok"]:
            first = a["problems"][0] if a["problems"] else None
            where = f", first at seq {first['seq']} ({first['check']})" if first else ""
            failures.append(f"audit log {a['name']}: {len(a['problems'])} problem(s){where}")
    if not inputs.audit:
        warnings.append("no audit log was given, so none was verified")
    if not chosen:
        warnings.append("the ledgers given hold no site: no DP event, budget or report")

    ok = not failures
    budgets_ok = all(s["ok"] for s in site_reports)
    chains_ok = all(a["ok"] for a in audit)
    return {
        "format": REPORT_FORMAT,
        "generated": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "generated_unix": started,
        "seconds": round(time.time() - started, 3),
        "verdict": {
            "ok": ok,
            "summary": _verdict_text(ok, site_reports, audit, rows_ok),
            "sites_within_budget": budgets_ok,
            "ledger_rows_verify": rows_ok,
            "audit_chains_verify": chains_ok,
            "failures": failures,
            "warnings": warnings,
        },
        "accountants": {
            "primary": "prv",
            "cross_check": "rdp",
            "independent": "pld" if include_pld else None,
            "versions": accountant_versions(),
            "prv_relative_error": PRV_RELATIVE_ERROR,
            "curve_prv_relative_error": CURVE_PRV_RELATIVE_ERROR,
            "curve_prv_points": curve_points,
            "pld_discretization": PLD_DISCRETIZATION,
            "cross_check_tolerance": CROSS_CHECK_TOLERANCE,
        },
        "sites": site_reports,
        "ledger": {
            "ok": rows_ok,
            "sources": ledger_checks,
            "rows": len(inputs.events),
            "duplicates_merged": duplicates,
            "row_problems": row_problems,
        },
        "audit": audit,
    }


def _flag(code: str, message: str, fails: bool = True) -> dict[str, Any]:
    return {"flag": code, "message": message, "fails": fails}


def _site_report(
    site: str,
    rows: Sequence[_Row],
    budget_raw: Any,
    *,
    include_pld: bool,
    curve_points: int,
    reports: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    evs = [r.event for r in rows if r.event is not None]
    budget, budget_problem = _budget_of(budget_raw) if budget_raw is not None else (None, None)
    # Without a (valid) budget, ε is still shown, at the smallest δ the events recorded.
    delta = budget["delta"] if budget else min((e.delta for e in evs), default=None)
    flags: list[dict[str, Any]] = []
    prv = rdp = pld = None
    prv_err = None
    if not evs:
        prv, rdp, pld = 0.0, 0.0, (0.0 if include_pld else None)
    elif delta is not None:
        prv, prv_err = _account("prv", evs, delta)
        rdp, _ = _account("rdp", evs, delta)
        if include_pld:
            pld, pld_err = _account("pld", evs, delta)
            if pld_err:
                flags.append(_flag("pld_failed", f"the PLD cross-check failed: {pld_err}", False))
    if budget_problem:
        flags.append(_flag("invalid_budget", f"{budget_problem} (fail closed)"))
    elif budget is None:
        flags.append(
            _flag(
                "no_budget",
                f"no privacy budget although it has {len(evs)} DP event(s): fail closed, the "
                "site must take no DP round until the data owner sets one"
                if evs
                else "no privacy budget: fail closed",
            )
        )
    if prv_err or (evs and prv is None):
        flags.append(_flag("accounting_error", f"ε could not be computed ({prv_err}); fail closed"))
    remaining = over_by = None
    if budget is not None and prv is not None:
        remaining = max(0.0, budget["epsilon_max"] - prv)
        if prv > budget["epsilon_max"]:
            over_by = prv - budget["epsilon_max"]
            flags.append(
                _flag(
                    "over_budget",
                    f"over budget: ε={prv:.4f} > ε_max={budget['epsilon_max']:g} at "
                    f"δ={budget['delta']:g} (by {over_by:.4f})",
                )
            )
    if prv and rdp is not None and rdp < prv * (1 - CROSS_CHECK_TOLERANCE):
        flags.append(
            _flag(
                "rdp_below_prv",
                f"RDP ε={rdp:.4f} is below PRV ε={prv:.4f}: RDP must be the larger; check the "
                "accountant versions",
                False,
            )
        )
    if prv and pld and abs(prv / pld - 1) > CROSS_CHECK_TOLERANCE:
        flags.append(
            _flag(
                "pld_disagrees",
                f"PRV ε={prv:.4f} and PLD ε={pld:.4f} differ by {abs(prv / pld - 1):.2%}",
                False,
            )
        )
    per_fed: dict[str, int] = {}
    for e in evs:
        per_fed[e.federation] = per_fed.get(e.federation, 0) + 1

    by_round: dict[tuple[str, int], list[DpEvent]] = {}
    for e in evs:  # rounds in the order the site took part in them
        by_round.setdefault((e.federation, e.round), []).append(e)
    with_prv = set(_curve_indices(len(by_round), curve_points))
    curve = []
    done: list[DpEvent] = []
    for k, (key, round_events) in enumerate(by_round.items(), start=1):
        done.extend(round_events)
        eps: float | None = None
        if k == len(by_round):
            eps = prv
        elif k in with_prv and delta is not None:
            eps = _account("prv_curve", done, delta)[0]
        curve.append(
            {
                "index": k,
                "federation": key[0],
                "round": key[1],
                "time": round_events[-1].time,
                "events": len(done),
                "epsilon": eps,
                "epsilon_rdp": _account("rdp", done, delta)[0] if delta is not None else None,
            }
        )
    ok = not any(f["fails"] for f in flags)
    kinds: dict[str, int] = {}
    for rep in reports:
        kinds[str(rep["kind"])] = kinds.get(str(rep["kind"]), 0) + 1
    return {
        "site": site,
        "ok": ok,
        "status": _status(flags, budget),
        "flags": flags,
        "budget": budget,
        "delta": delta,
        "delta_source": "budget" if budget else ("events" if delta is not None else None),
        "epsilon": prv,
        "method": "prv",
        "epsilon_rdp": _finite_or_none(rdp),
        "rdp_over_prv": _ratio(rdp, prv),
        "epsilon_pld": pld,
        "prv_over_pld": _ratio(prv, pld),
        "remaining": remaining,
        "over_by": over_by,
        "fraction_used": _ratio(prv, budget["epsilon_max"]) if budget else None,
        "events": len(evs),
        "steps": sum(e.steps for e in evs),
        "rounds": len(by_round),
        "federations": per_fed,
        "event_rows": [_event_row(r) for r in rows if r.event is not None],
        "curve": curve,
        "data_reports": {"count": len(reports), "by_kind": kinds, "reports": reports},
    }


def _status(flags: Sequence[Mapping[str, Any]], budget: Mapping[str, float] | None) -> str:
    codes = {f["flag"] for f in flags if f["fails"]}
    if "accounting_error" in codes:
        return "FAIL: ε could not be computed (fail closed)"
    if "invalid_budget" in codes:
        return "FAIL: invalid budget (fail closed)"
    if "no_budget" in codes:
        return "FAIL: no budget (fail closed)"
    if "over_budget" in codes:
        return "FAIL: over budget"
    return "OK: within budget" if budget else "OK"


def _verify_audit(src: AuditSource) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": src.name,
        "expected_head": src.expected_head,
        "trusted_keys": [],
    }
    try:
        keys = trust_store(*src.trust)
    except AuditError as e:
        return {
            **out,
            "ok": False,
            "entries": len(src.entries),
            "head": None,
            "signers": {},
            "problems": [{"seq": 0, "check": "signer", "message": f"trust store: {e}"}],
        }
    rep = verify_entries(src.entries, keys, expected_head=src.expected_head)
    return {
        **out,
        "trusted_keys": sorted(keys),
        "ok": rep.ok and bool(keys),
        "entries": rep.entries_checked,
        "head": rep.head,
        "signers": rep.signers,
        "problems": [{"seq": p.seq, "check": p.check, "message": p.message} for p in rep.problems]
        or ([] if keys else [{"seq": 0, "check": "signer", "message": "no public key was given"}]),
    }


def _verdict_text(
    ok: bool,
    sites: Sequence[Mapping[str, Any]],
    audit: Sequence[Mapping[str, Any]],
    rows_ok: bool,
) -> str:
    bad_sites = sum(not s["ok"] for s in sites)
    bad_logs = sum(not a["ok"] for a in audit)
    if ok:
        return (
            f"PASS: {len(sites)} site(s) within budget, ledger rows verified, "
            f"{len(audit)} audit log(s) verified"
        )
    parts = []
    if bad_sites:
        parts.append(f"{bad_sites} of {len(sites)} site(s) failed their budget check")
    if not rows_ok:
        parts.append("ledger rows failed verification")
    if bad_logs:
        parts.append(f"{bad_logs} of {len(audit)} audit log(s) failed verification")
    return "FAIL: " + "; ".join(parts or ["see the failures"])


def site_line(site: Mapping[str, Any]) -> str:
    """One line per site for a terminal: status, ε of ε_max, remaining."""
    eps = site["epsilon"]
    b = site["budget"]
    spent = f"ε={eps:.4f}" if eps is not None else "ε=?"
    if b:
        spent += f" of ε_max={b['epsilon_max']:g} at δ={b['delta']:g}"
        if site["remaining"] is not None:
            spent += f", remaining {site['remaining']:.4f}"
    elif site["delta"] is not None:
        spent += f" at δ={site['delta']:g} (the events' δ)"
    fails = "; ".join(f["message"] for f in site["flags"] if f["fails"])
    head = "OK  " if site["ok"] else "FAIL"
    tail = f" [{fails}]" if fails else ""
    return f"{head} site {site['site']}: {spent}; {site['events']} event(s){tail}"


# --------------------------------------------------------------------------- HTML


def plot_png(report: Mapping[str, Any]) -> bytes:
    """ε after each round per site (PRV solid, RDP dotted) and each budget (dashed), PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.5, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(report["sites"]))]
    plotted = False
    for color, site in zip(colors, report["sites"], strict=True):
        # Every curve starts at ε = 0 before the site's first round.
        pts = [(0, 0.0)] + [(p["index"], p["epsilon"]) for p in site["curve"] if p["epsilon"]]
        rdp = [(0, 0.0)] + [
            (p["index"], p["epsilon_rdp"]) for p in site["curve"] if p["epsilon_rdp"]
        ]
        if len(pts) > 1:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color=color, marker="o", markersize=3, label=f"{site['site']} (PRV)")
            plotted = True
        if len(rdp) > 1:
            xs, ys = zip(*rdp, strict=True)
            ax.plot(xs, ys, color=color, linestyle=":", linewidth=1, alpha=0.7)
    budgets: dict[float, list[tuple[str, str]]] = {}
    for color, site in zip(colors, report["sites"], strict=True):
        if site["budget"]:
            budgets.setdefault(site["budget"]["epsilon_max"], []).append((color, site["site"]))
    for eps_max, owners in budgets.items():
        # Sites sharing a budget share one line; a site's own budget has the site's colour.
        ax.axhline(
            eps_max,
            color=owners[0][0] if len(owners) == 1 else "0.35",
            linestyle="--",
            linewidth=1.2,
            label=f"budget ε_max={eps_max:g} ({', '.join(name for _, name in owners)})",
        )
        plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "no DP events or budgets", ha="center", va="center")
    ax.set(
        xlabel="rounds taken by the site (all federations, in time order)",
        ylabel="ε spent (cumulative)",
        title="ε spent after each round: PRV (solid), RDP cross-check (dotted), budgets (dashed)",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained HTML page (inline CSS, the plot as a data URI, no script, no URL)."""
    v = report["verdict"]
    acc = report["accountants"]
    parts: list[str] = []
    add: Callable[[str], None] = parts.append
    add(page_head("Confide compliance report"))
    add("<h1>Confide compliance report</h1>")
    add(
        f"<p class='muted'>Generated {_e(report['generated'])} by Confide "
        f"({_e(report['format'])}); ε recomputed from the recorded DP events, never read "
        "from a stored value.</p>"
    )
    cls = "pass" if v["ok"] else "fail"
    add(f"<div class='verdict {cls}'><strong>{_e(v['summary'])}</strong>")
    add("<ul>")
    add(f"<li>every site within its budget: {_okmark(v['sites_within_budget'], 'yes', 'no')}</li>")
    add(f"<li>ledger rows verify: {_okmark(v['ledger_rows_verify'], 'yes', 'no')}</li>")
    add(f"<li>audit chains verify: {_okmark(v['audit_chains_verify'], 'yes', 'no')}</li>")
    add("</ul>")
    if v["failures"]:
        add("<p><strong>Failures</strong></p>" + bullets(v["failures"], "bad"))
    if v["warnings"]:
        add("<p><strong>Warnings</strong></p>" + bullets(v["warnings"], "warn"))
    add("</div>")

    add("<h2>Privacy budget per site</h2>")
    pld_on = acc["independent"] == "pld"
    headers = ["site", "status", "ε_max", "δ", "ε spent (PRV)", "remaining", "used"]
    headers += ["ε RDP (cross-check)", "RDP / PRV"]
    if pld_on:
        headers += ["ε PLD (dp-accounting)", "PRV / PLD"]
    headers += ["events", "steps", "rounds", "events per federation"]
    numeric = set(range(2, len(headers) - 1))
    rows = []
    for s in report["sites"]:
        b = s["budget"] or {}
        row = [
            _e(s["site"]),
            _okmark(s["ok"], s["status"], s["status"]),
            _num(b.get("epsilon_max"), "g"),
            _num(s["delta"], "g") + ("" if s["delta_source"] != "events" else " (events)"),
            _num(s["epsilon"]),
            _num(s["remaining"]),
            _num(s["fraction_used"], ".1%"),
            _num(s["epsilon_rdp"]),
            _num(s["rdp_over_prv"], ".3f"),
        ]
        if pld_on:
            row += [_num(s["epsilon_pld"]), _num(s["prv_over_pld"], ".4f")]
        row += [
            _num(s["events"]),
            _num(s["steps"]),
            _num(s["rounds"]),
            "<br>".join(f"{_e(f)}: {_e(n)}" for f, n in s["federations"].items()),
        ]
        rows.append(row)
    add(_table(headers, rows, numeric))
    add("<h2>ε over rounds</h2>")
    add(png_img(plot_png(report), "epsilon after each round per site, with budgets"))
    add(
        f"<p class='muted'>x: rounds the site took part in, across all its federations, in "
        f"time order. PRV ε at up to {_e(acc['curve_prv_points'])} evenly spaced rounds "
        f"(intermediate points with a discretization error of "
        f"{_e(format(acc['curve_prv_relative_error'], '.1%'))} of the RDP ε, still upper "
        "bounds; the last point is the enforced value); RDP after every round.</p>"
    )

    for s in report["sites"]:
        add(f"<h2>Site {_e(s['site'])}</h2>")
        add(f"<p>{_okmark(s['ok'], s['status'], s['status'])}</p>")
        if s["flags"]:
            add("<ul>")
            for f in s["flags"]:
                add(f"<li class='{'bad' if f['fails'] else 'warn'}'>{_e(f['message'])}</li>")
            add("</ul>")
        if s["row_problems"]:
            add("<p class='bad'>Rows that failed verification:</p><ul>")
            add("".join(f"<li>{_e(p['message'])}</li>" for p in s["row_problems"]))
            add("</ul>")
        add(f"<h3>DP events ({_e(s['events'])})</h3>")
        ev_rows = [
            [
                _num(r["id"]),
                _e(r["mechanism"]),
                _num(r["noise_multiplier"], "g"),
                _num(r["sample_rate"], "g"),
                _num(r["steps"]),
                _num(r["clip_norm"], "g"),
                _num(r["delta"], "g"),
                _num(r["dataset_size"]),
                _e(r["federation"]),
                _num(r["round"]),
                _e(r["time_utc"]),
                f"<span class='uid'>{_e(r['uid'])}</span>",
                _okmark(r["verified"], "yes", "NO"),
            ]
            for r in s["event_rows"]
        ]
        add(
            _table(
                [
                    "id",
                    "mechanism",
                    "σ (noise multiplier)",
                    "q (sampling rate)",
                    "steps",
                    "clip",
                    "δ",
                    "dataset size",
                    "federation",
                    "round",
                    "time",
                    "uid (SHA-256 of the content)",
                    "row verified",
                ],
                ev_rows,
                {0, 2, 3, 4, 5, 6, 7, 9},
            )
        )
        if s["curve"]:
            add(f"<details><summary>ε after each round ({_e(len(s['curve']))})</summary>")
            add(
                _table(
                    ["#", "federation", "round", "events so far", "ε PRV", "ε RDP"],
                    (
                        [
                            _num(p["index"]),
                            _e(p["federation"]),
                            _num(p["round"]),
                            _num(p["events"]),
                            _num(p["epsilon"]),
                            _num(p["epsilon_rdp"]),
                        ]
                        for p in s["curve"]
                    ),
                    {0, 2, 3, 4, 5},
                )
            )
            add("</details>")
        dr = s["data_reports"]
        add(f"<h3>De-identification reports ({_e(dr['count'])})</h3>")
        if dr["reports"]:
            add(
                _table(
                    [
                        "id",
                        "kind",
                        "recorded",
                        "k (achieved / requested)",
                        "l",
                        "rows in",
                        "rows out",
                        "suppressed",
                        "prosecutor risk",
                        "profile",
                        "verified",
                    ],
                    (
                        [
                            _num(r.get("id")),
                            _e(r.get("kind")),
                            _e(r.get("recorded_utc")),
                            f"{_num(r.get('k_achieved'))} / {_num(r.get('k_requested'))}",
                            _num(r.get("l_achieved")),
                            _num(r.get("rows_in")),
                            _num(r.get("rows_out")),
                            _num(r.get("rows_suppressed")),
                            _num(r.get("prosecutor_risk"), ".4g"),
                            _e(r.get("profile")),
                            _okmark(bool(r.get("verified")), "yes", "NO"),
                        ]
                        for r in dr["reports"]
                    ),
                    {0, 4, 5, 6, 7, 8},
                )
            )
        else:
            add("<p class='muted'>none recorded in the ledgers given</p>")

    led = report["ledger"]
    add("<h2>Ledger verification</h2>")
    add(
        f"<p>{_okmark(led['ok'], 'all rows verify', 'FAILED')}: {_e(led['rows'])} event "
        f"row(s) read; each re-hashed against its uid; {_e(led['duplicates_merged'])} "
        "duplicate(s) (the same event in a site's ledger and the coordinator's mirror) "
        "counted once.</p>"
    )
    add(
        _table(
            ["ledger", "result", "rows", "message"],
            (
                [_e(c["name"]), _okmark(c["ok"]), _num(c["rows"]), _e(c["message"])]
                for c in led["sources"]
            ),
            {2},
        )
    )
    add("<h2>Audit-log chain verification</h2>")
    if not report["audit"]:
        add("<p class='warn'>No audit log was given.</p>")
    for a in report["audit"]:
        add(f"<h3>{_e(a['name'])}: {_okmark(a['ok'], 'verified', 'BROKEN')}</h3>")
        add(
            f"<p>{_e(a['entries'])} entries checked (order, chain, hashes, Ed25519 "
            f"signatures). Head hash: <code>{_e(a['head'])}</code>"
            + (
                f"; published head checked: <code>{_e(a['expected_head'])}</code>"
                if a["expected_head"]
                else "; no published head was given, so a cut-off tail cannot be detected"
            )
            + "</p>"
        )
        add(
            "<p>Signers (key id: entries): "
            + (
                ", ".join(f"<code>{_e(k[:16])}…</code>: {_e(n)}" for k, n in a["signers"].items())
                or "none"
            )
            + "</p>"
        )
        if a["problems"]:
            add(
                _table(
                    ["seq", "check", "problem"],
                    ([_num(p["seq"]), _e(p["check"]), _e(p["message"])] for p in a["problems"]),
                    {0},
                )
            )
    add("<h2>Accountants</h2>")
    add(
        "<ul><li><strong>PRV</strong> (primary, enforced): numerical composition of privacy "
        "loss random variables (Gopi, Lee, Wutschitz 2021), Opacus's implementation; an upper "
        f"bound within {_e(format(acc['prv_relative_error'], '.1%'))} of the RDP ε.</li>"
        "<li><strong>RDP</strong> (cross-check): Rényi DP with Opacus's orders and conversion; "
        "looser, so it should be the larger.</li>"
        "<li><strong>PLD</strong> (independent): Google's dp-accounting privacy loss "
        f"distributions, discretization {_e(acc['pld_discretization'])}; "
        + ("included." if pld_on else "not included (dp-accounting is not installed).")
        + "</li></ul>"
    )
    add(
        _table(
            ["library", "version"],
            ([_e(k), _e(val)] for k, val in acc["versions"].items()),
            set(),
        )
    )
    add("<h2>How to recompute ε independently</h2>")
    add(
        "<p>Every number above derives from the events tables and δ. With Google's "
        "dp-accounting (<code>pip install dp-accounting</code>), for one site: group the "
        "events by (σ, q), sum their steps, and compose (add/remove neighbouring relation, "
        "the default):</p>"
    )
    add(
        "<pre>"
        + _e(
            "import dp_accounting\n"
            "from dp_accounting.pld import PLDAccountant\n\n"
            "acc = PLDAccountant(value_discretization_interval=1e-4)\n"
            "for sigma, q, steps in events:  # one line per row of the site's table\n"
            "    gauss = dp_accounting.GaussianDpEvent(sigma)\n"
            "    event = dp_accounting.PoissonSampledDpEvent(q, gauss)\n"
            "    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))\n"
            "print(acc.get_epsilon(delta))  # delta: the site's budget δ\n"
        )
        + "</pre>"
    )
    add(
        "<p>For <code>gaussian</code> events (q = 1) compose "
        "<code>GaussianDpEvent(σ)</code> itself. The result should agree with the PRV ε "
        "within about 1 %. The report's JSON (<code>--json</code>) holds the same events "
        "and values.</p>"
    )
    add("</body></html>\n")
    return "\n".join(parts)


def write_report(
    report: Mapping[str, Any], html_path: Path, json_path: Path | None = None
) -> list[Path]:
    """Write the HTML (and JSON) report; returns the paths written."""
    return write_html_json(render_html(report), Path(html_path), report, json_path)


__all__ = [
    "CURVE_PRV_POINTS",
    "REPORT_FORMAT",
    "AuditSource",
    "LedgerCheck",
    "ReportError",
    "ReportInputs",
    "build_report",
    "inputs_from_files",
    "inputs_from_json",
    "pld_available",
    "plot_png",
    "render_html",
    "site_line",
    "write_report",
]
