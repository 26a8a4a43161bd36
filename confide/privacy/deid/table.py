"""De-identify a table: drop or pseudonymise direct identifiers, generalize quasi-identifiers
until the k-anonymity / ℓ-diversity gate passes, scrub free text, keep the rest.

The site agent runs this on its raw data before training; only the output table reaches the
ClientApp, and only the :class:`Report` (never the data) goes to the ledger and audit log.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import hmac
import io
import json
import os
import platform
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import confide
from confide.errors import DataFormatError, DataNotFoundError
from confide.privacy.crypto._files import write_atomic
from confide.privacy.deid.config import MIN_SECRET_BYTES, ColumnSpec, DeidConfig, profile_rule
from confide.privacy.deid.errors import DeidError
from confide.privacy.deid.kanon import Hierarchy, search

StrArray = NDArray[np.str_]

# HHS OCR, "Guidance Regarding Methods for De-identification of Protected Health Information
# in Accordance with the HIPAA Privacy Rule" (26 Nov 2012), section 3.3: the 17 three-digit
# ZIP codes whose geographic units held 20,000 or fewer people (2000 Census). 45 CFR
# 164.514(b)(2)(i)(B) requires them to be replaced by 000.
RESTRICTED_ZIP3: frozenset[str] = frozenset(
    [
        "036",
        "059",
        "063",
        "102",
        "203",
        "556",
        "692",
        "790",
        "821",
        "823",
        "830",
        "831",
        "878",
        "879",
        "884",
        "890",
        "893",
    ]
)
_US_ZIP = re.compile(r"^(\d{5})(?:-?\d{4})?$")
_UK_POSTCODE = re.compile(r"^([A-Z]{1,2})\d[A-Z\d]?(?:\s*\d[A-Z]{2})?$", re.IGNORECASE)
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})")


# -- tables and files --------------------------------------------------------------------


@dataclass
class Table:
    """A CSV table as strings: a header and rows of equal length."""

    columns: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> list[str]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def to_dicts(self) -> list[dict[str, str]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]

    @classmethod
    def from_dicts(cls, rows: Sequence[Mapping[str, Any]]) -> Table:
        if not rows:
            raise DataFormatError("no rows. Fix: give a table with a header and at least one row")
        cols = list(rows[0])
        return cls(cols, [["" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows])


def read_table(path: str | Path) -> Table:
    """Read a ``.csv`` or ``.csv.gz`` file with a header row."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"{p} does not exist. Fix: pass --in with the path of a CSV file")
    opener = gzip.open if p.name.endswith(".gz") else open
    try:
        with opener(p, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise DataFormatError(f"{p} is empty. Fix: give a CSV file with a header row")
            rows = [r for r in reader if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataFormatError(f"{p} is not a readable UTF-8 CSV ({e}). Fix: check the file") from e
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise DataFormatError(
                f"{p} line {i + 2} has {len(r)} fields, the header has {len(header)}. "
                "Fix: repair or quote that line"
            )
    return Table(header, rows)


def table_bytes(table: Table, *, gz: bool = False) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.columns)
    w.writerows(table.rows)
    data = buf.getvalue().encode()
    return gzip.compress(data, mtime=0) if gz else data


def write_table(path: str | Path, table: Table) -> None:
    """Write ``.csv`` (or ``.csv.gz``) atomically (temp file + rename), mode 0600."""
    p = Path(path).expanduser()
    write_atomic(p, table_bytes(table, gz=p.name.endswith(".gz")), private=True)


def load_secret(path: Path) -> bytes:
    """The site secret: a file of at least 32 bytes that never leaves the site."""
    if not path.is_file():
        raise DeidError(
            f"secret_file: no such file {path}. Fix: create it at the site with "
            f"`head -c 32 /dev/urandom > {path}` and keep it there (never share it)"
        )
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise DeidError(
            f"secret_file: {path} holds {len(secret)} bytes, fewer than {MIN_SECRET_BYTES}. "
            f"Fix: `head -c 32 /dev/urandom > {path}`"
        )
    return secret


# -- keyed transforms --------------------------------------------------------------------


def pseudonym(secret: bytes, domain: str, value: str, length: int = 20) -> str:
    """HMAC-SHA256(secret, domain || value) in hex, truncated; never a plain hash."""
    msg = b"confide-deid/pseudonym\x00" + domain.encode() + b"\x00" + value.encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:length]


def date_shift(secret: bytes, person: str, max_days: int) -> int:
    """A per-person shift in [-max_days, max_days] \\ {0} derived from HMAC(secret, person)."""
    msg = b"confide-deid/date-shift\x00" + person.encode()
    x = int.from_bytes(hmac.new(secret, msg, hashlib.sha256).digest()[:8], "big")
    r = x % (2 * max_days)  # never 0: a zero shift would publish the true dates
    return r - max_days if r < max_days else r - max_days + 1


def key_id(secret: bytes) -> str:
    """A key-check value: tells two reports used the same secret, reveals nothing of it."""
    return hmac.new(secret, b"confide-deid/key-id", hashlib.sha256).hexdigest()[:16]


# -- hierarchies -------------------------------------------------------------------------


def _parse_date(col: str, value: str) -> date:
    m = _DATE.match(value.strip())
    try:
        if m is None:
            raise ValueError
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        raise DeidError(
            f"column {col}: {value!r} is not a date (YYYY-MM-DD...). Fix: convert the column to "
            "ISO dates, or give it another role"
        ) from None


def _by_unique(values: StrArray, levels: int, label: Callable[[str], list[str]]) -> list[StrArray]:
    uniq, inv = np.unique(values, return_inverse=True)
    table = [label(str(u)) for u in uniq]
    out = []
    for lv in range(levels):
        col = np.array([t[lv] for t in table] or [""], dtype=str)
        out.append(col[inv.reshape(-1)] if len(values) else np.array([], dtype=str))
    return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def band_hierarchy(
    col: str, values: StrArray, width: int, top: int
) -> tuple[list[str], list[StrArray]]:
    """exact (top-coded) → width → 2·width → 4·width → *."""
    names = [
        "exact" + (f" ({top}+)" if top else ""),
        f"band {width}",
        f"band {2 * width}",
        f"band {4 * width}",
        "*",
    ]

    def label(v: str) -> list[str]:
        if v.strip() == "":
            return ["", "", "", "", "*"]
        try:
            x = float(v)
        except ValueError:
            raise DeidError(
                f"column {col}: {v!r} is not a number. Fix: clean the column or use "
                'generalize = "value"'
            ) from None
        if top and x >= top:
            return [f"{top}+"] * 4 + ["*"]
        out = [_num(x)]
        for w in (width, 2 * width, 4 * width):
            lo = (x // w) * w
            hi = lo + w - 1 if float(x).is_integer() else lo + w
            if top:
                hi = min(hi, top - 1)
            out.append(f"{_num(lo)}-{_num(hi)}")
        return [*out, "*"]

    return names, _by_unique(values, 5, label)


def date_hierarchy(
    col: str,
    values: StrArray,
    mode: str,
    *,
    cutoff_year: int | None,
) -> tuple[list[str], list[StrArray]]:
    """month: YYYY-MM → year → 5 years → decade → *; year: year → 5 years → decade → *;
    shifted dates (already shifted): date → month → year → decade → *."""
    first = {"month": ["month"], "year": [], "shift": ["shifted date", "month"]}[mode]
    names = [*first, "year", "5 years", "decade", "*"]

    def label(v: str) -> list[str]:
        if v.strip() == "":
            return [""] * (len(names) - 1) + ["*"]
        d = _parse_date(col, v)
        y = d.year
        if cutoff_year is not None and y <= cutoff_year:
            return [f"<={cutoff_year}"] * (len(names) - 1) + ["*"]
        month = f"{y:04d}-{d.month:02d}"
        full = {"month": [month], "year": [], "shift": [d.isoformat(), month]}[mode]
        y5, y10 = y // 5 * 5, y // 10 * 10
        return [*full, str(y), f"{y5}-{y5 + 4}", f"{y10}-{y10 + 9}", "*"]

    return names, _by_unique(values, len(names), label)


def zip_hierarchy(values: StrArray) -> tuple[list[str], list[StrArray], int]:
    """US ZIP5/ZIP+4 → ZIP3 (restricted → 000) → first digit → *; UK postcode → area → *.

    Returns also how many rows held a value that is neither (those become ``*``).
    """
    names = ["zip3 / postcode area", "zip region", "*"]

    def label(v: str) -> list[str]:
        s = v.strip().upper()
        if s == "":
            return ["", "", "*"]
        m = _US_ZIP.match(s)
        if m:
            z3 = m[1][:3]
            return ["000" if z3 in RESTRICTED_ZIP3 else z3, z3[0] + "**", "*"]
        m = _UK_POSTCODE.match(s)
        if m:
            return [m[1], "*", "*"]
        return ["*", "*", "*"]

    levels = _by_unique(values, 3, label)
    bad = int(np.sum((levels[0] == "*") & (np.char.strip(values) != "")))
    return names, levels, bad


# -- the report --------------------------------------------------------------------------


@dataclass
class Report:
    """What was done, for the ledger and the audit log: never any of the data."""

    profile: str | None
    k_requested: int
    k_achieved: int
    l_requested: int
    l_achieved: int | None
    equivalence_classes: int
    class_size_histogram: dict[str, int]
    rows_in: int
    rows_out: int
    rows_suppressed: int
    suppression_fraction: float
    max_suppression: float
    prosecutor_risk: float
    average_risk: float
    quasi_identifiers: list[str]
    generalization: dict[str, dict[str, Any]]
    columns: dict[str, dict[str, Any]]
    lattice_nodes: int
    lattice_nodes_evaluated: int
    config_sha256: str
    secret_key_id: str | None
    versions: dict[str, str]
    created: str
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"


# -- the pipeline ------------------------------------------------------------------------


def _as_table(data: Table | str | Path | Sequence[Mapping[str, Any]]) -> Table:
    if isinstance(data, Table):
        return data
    if isinstance(data, str | Path):
        return read_table(data)
    return Table.from_dicts(data)


def _describe(col: str, spec: ColumnSpec, explicit: bool, profile: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {"role": spec.role}
    if spec.role == "direct":
        d["action"] = "dropped" if spec.action == "drop" else "keyed pseudonym (HMAC-SHA256)"
    elif spec.role == "quasi":
        d["action"] = f"generalized ({spec.generalize})"
    elif spec.role == "free_text":
        d["action"] = f"scrubbed ({spec.scrub})"
    else:
        d["action"] = "kept" + (" (ℓ-diversity)" if spec.role == "sensitive" else "")
    if explicit:
        d["source"] = "config"
    else:
        rule = profile_rule(col)
        d["source"] = f"profile {profile}: {rule.identifier if rule else '?'}"
    return d


def deidentify(
    data: Table | str | Path | Sequence[Mapping[str, Any]],
    config: DeidConfig,
    *,
    secret: bytes | None = None,
) -> tuple[Table, Report]:
    """De-identify ``data`` (a :class:`Table`, a CSV path or a list of dicts) under ``config``.

    Returns the output table and its :class:`Report`; raises
    :class:`~confide.privacy.deid.errors.KAnonymityNotReached` (fail closed) when the gate
    cannot be met, :class:`~confide.privacy.deid.errors.UnknownColumnError` for columns
    without a role, and :class:`~confide.errors.ConfigError` for a bad config.
    """
    t0 = time.perf_counter()
    table = _as_table(data)
    specs = config.resolve(table.columns, has_secret=secret is not None)
    n = len(table.rows)
    warnings: list[str] = []
    if secret is None and config.secret_file is not None:
        sp = config.secret_path()
        assert sp is not None
        secret = load_secret(sp)
        if os.name != "nt" and sp.stat().st_mode & 0o077:
            warnings.append(f"secret_file {sp} is readable by others; chmod 600 it")
    if secret is not None and len(secret) < MIN_SECRET_BYTES:
        raise DeidError(
            f"secret: {len(secret)} bytes, fewer than {MIN_SECRET_BYTES}. Fix: use "
            "a longer random secret"
        )
    cols: dict[str, StrArray] = {
        c: np.array([r[i] for r in table.rows] or [], dtype=str)
        for i, c in enumerate(table.columns)
    }
    ref = config.reference_date or date.today()
    cutoff = ref.year - 90

    # per-person date shifts
    shifts: NDArray[np.int64] | None = None
    if config.person_id is not None and any(
        s.role == "quasi" and s.generalize == "shift" for s in specs.values()
    ):
        assert secret is not None
        pids = cols[config.person_id]
        empty = np.flatnonzero(np.char.strip(pids) == "")
        if len(empty):
            raise DeidError(
                f"person_id {config.person_id}: row {int(empty[0]) + 2} is empty, so its dates "
                "cannot be shifted consistently. Fix: fill the person id or drop the row"
            )
        uniq, inv = np.unique(pids, return_inverse=True)
        per = np.array([date_shift(secret, str(u), config.date_shift_days) for u in uniq])
        shifts = per[inv.reshape(-1)].astype(np.int64)

    out: dict[str, StrArray] = {}
    quasi: list[Hierarchy] = []
    gen_info: dict[str, dict[str, Any]] = {}
    sensitive: list[tuple[NDArray[np.int64], int]] = []
    for c in table.columns:
        spec, v = specs[c], cols[c]
        if spec.role == "direct":
            if spec.action == "pseudonym":
                assert secret is not None
                dom = spec.domain or c
                uniq, inv = np.unique(v, return_inverse=True)
                ps = np.array(
                    [
                        pseudonym(secret, dom, str(u), spec.length) if str(u).strip() else ""
                        for u in uniq
                    ]
                    or [""],
                    dtype=str,
                )
                out[c] = ps[inv.reshape(-1)] if n else v
        elif spec.role == "quasi":
            bad = 0
            if spec.generalize == "value":
                names = ["value", "*"]
                levels = [v, np.full(n, "*", dtype=str)]
            elif spec.generalize == "band":
                names, levels = band_hierarchy(c, v, spec.width, spec.top_code)
            elif spec.generalize == "zip3":
                names, levels, bad = zip_hierarchy(v)
            else:
                src = v
                if spec.generalize == "shift":
                    assert shifts is not None
                    src = np.array(
                        [
                            (_parse_date(c, x) + timedelta(days=int(s))).isoformat()
                            if x.strip()
                            else ""
                            for x, s in zip(v.tolist(), shifts.tolist(), strict=True)
                        ]
                        or [],
                        dtype=str,
                    )
                names, levels = date_hierarchy(
                    c,
                    src,
                    spec.generalize,
                    cutoff_year=cutoff if spec.aggregate_over_89 else None,
                )
            top = len(levels) - 1
            max_level = top if spec.max_level is None else min(spec.max_level, top)
            quasi.append(Hierarchy.build(c, names, levels, max_level))
            gen_info[c] = {"levels": names, "max_level": max_level}
            if bad:
                warnings.append(
                    f"{c}: {bad} values are neither a US ZIP nor a UK postcode; "
                    "they were generalized to *"
                )
                gen_info[c]["unrecognised_values"] = bad
        else:
            out[c] = v
            if spec.role == "sensitive":
                uniq, inv = np.unique(v, return_inverse=True)
                sensitive.append((inv.astype(np.int64).reshape(-1), max(len(uniq), 1)))

    ka = config.k_anonymity
    res = search(
        quasi,
        sensitive,
        n,
        k=ka.k,
        l_diversity=ka.l_diversity,
        max_suppression=ka.max_suppression,
        max_nodes=ka.max_nodes,
    )
    for h in quasi:
        lv = res.levels[h.name]
        out[h.name] = h.labels[lv]
        gen_info[h.name].update(level=lv, level_name=h.level_names[lv])

    keep = res.keep
    out_cols = [c for c in table.columns if c in out]
    kept = {c: out[c][keep] for c in out_cols}
    rows_out = int(keep.sum())

    # free text, on the kept rows only
    columns_info = {
        c: _describe(c, specs[c], c in config.columns, config.profile) for c in table.columns
    }
    free = [c for c in out_cols if specs[c].role == "free_text"]
    if free:
        from confide.privacy.deid.text import Scrubber  # the free-text scrubber, loaded lazily

        for c in free:
            mode = specs[c].scrub
            scrubber = Scrubber(mode=mode, secret=secret if mode == "pseudonym" else None)
            found: Counter[str] = Counter()
            texts = []
            for x in kept[c].tolist():
                r = scrubber.scrub(x)
                texts.append(r.text)
                found.update(str(s.type) for s in r.spans)
            kept[c] = np.array(texts or [], dtype=str)
            columns_info[c]["spans_found"] = dict(found)

    rows = [list(r) for r in zip(*(kept[c].tolist() for c in out_cols), strict=True)]
    if not out_cols:
        rows = [[] for _ in range(rows_out)]
    report = Report(
        profile=config.profile,
        k_requested=ka.k,
        k_achieved=res.k_achieved,
        l_requested=ka.l_diversity,
        l_achieved=res.l_achieved,
        equivalence_classes=res.classes,
        class_size_histogram={str(s): c for s, c in sorted(res.class_sizes.items())},
        rows_in=n,
        rows_out=rows_out,
        rows_suppressed=res.suppressed,
        suppression_fraction=res.suppressed / n if n else 0.0,
        max_suppression=ka.max_suppression,
        prosecutor_risk=1.0 / res.k_achieved if res.k_achieved else 1.0,
        average_risk=res.classes / rows_out if rows_out else 0.0,
        quasi_identifiers=[h.name for h in quasi],
        generalization=gen_info,
        columns=columns_info,
        lattice_nodes=res.lattice_size,
        lattice_nodes_evaluated=res.nodes_evaluated,
        config_sha256=config.sha256(),
        secret_key_id=key_id(secret) if secret is not None else None,
        versions={
            "confide": confide.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - t0, 4),
        warnings=warnings,
    )
    return Table(out_cols, rows), report


def deidentify_file(
    config: DeidConfig | str | Path,
    in_path: str | Path,
    out_path: str | Path,
    report_path: str | Path | None = None,
) -> Report:
    """Read, de-identify and write atomically; on any error nothing is written."""
    cfg = config if isinstance(config, DeidConfig) else DeidConfig.load(config)
    table, report = deidentify(read_table(in_path), cfg)
    write_table(out_path, table)
    if report_path is not None:
        write_atomic(Path(report_path).expanduser(), report.to_json().encode())
    return report


__all__ = [
    "RESTRICTED_ZIP3",
    "Report",
    "Table",
    "date_shift",
    "deidentify",
    "deidentify_file",
    "key_id",
    "load_secret",
    "pseudonym",
    "read_table",
    "write_table",
]
