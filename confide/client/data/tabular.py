"""Read labelled CSV tables (plain or gzip) into arrays, and build the credit-default sequences."""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from confide.errors import ConfigError, DataFormatError, DataNotFoundError

from .arrays import ArrayDataset
from .paths import locate

CREDIT_STEPS = 6
CREDIT_FEATURES = 8
CREDIT_STATIC = ("LIMIT_BAL", "SEX", "EDUCATION", "MARRIAGE", "AGE")
# Other published copies of the same table name the label differently.
_CREDIT_LABELS = ("default", "default.payment.next.month", "default payment next month")


@dataclass(frozen=True, eq=False)
class TabularData:
    """A table as arrays: float64 features (N, F), labels 0..C-1 (int64), and what they mean.

    ``classes[k]`` is the original label value that became ``k``.
    """

    features: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    feature_names: list[str]
    classes: list[Any]

    def column(self, name: str) -> npt.NDArray[np.float64]:
        """The feature column ``name``."""
        try:
            return self.features[:, self.feature_names.index(name)]
        except ValueError:
            raise ConfigError(
                "column",
                f"{name!r} is not a feature (features: {', '.join(self.feature_names)})",
                "use one of the listed feature names",
            ) from None


@contextmanager
def _open_text(path: Path) -> Iterator[io.TextIOWrapper]:
    with path.open("rb") as fh:
        # Sniff the gzip magic rather than trust the name: sites rename files.
        gz = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
        raw: gzip.GzipFile | BinaryIO = gzip.GzipFile(fileobj=fh) if gz else fh
        # utf-8-sig drops the byte-order mark spreadsheet exports put before the header.
        with io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
            yield text


def _read_rows(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataFormatError(f"{path} is empty. Fix: pass a CSV file with a header row")
            rows: list[list[str]] = []
            line_of: list[int] = []
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataFormatError(
                        f"{path} line {reader.line_num} has {len(row)} fields, the header has "
                        f"{len(header)}. Fix: repair that line (quote values that contain commas)"
                    )
                rows.append(row)
                line_of.append(reader.line_num)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataFormatError(
            f"cannot read {path} as CSV ({exc}). Fix: pass a UTF-8 CSV file, plain or gzip"
        ) from exc
    if not rows:
        raise DataFormatError(f"{path} has a header but no rows. Fix: pass a CSV file with data")
    return [h.strip() for h in header], rows, line_of


# What `confide deid` writes into a generalized numeric column: a band "20-29", a top
# code "90+", an aggregated lower range "<=1935", a suppressed "*" (or an empty cell).
_BAND = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*$")
_OPEN = re.compile(r"^\s*(?:(-?\d+(?:\.\d+)?)\s*\+|<=\s*(-?\d+(?:\.\d+)?))\s*$")
MISSING = ("", "*")


def generalized_value(cell: str) -> float | None:
    """A de-identified cell as a number: a band's midpoint, an open range's bound, NaN for
    a suppressed value; None when the cell is not a generalization."""
    if cell.strip() in MISSING:
        return float("nan")
    m = _BAND.match(cell)
    if m:
        return (float(m.group(1)) + float(m.group(2))) / 2
    m = _OPEN.match(cell)
    if m:
        return float(m.group(1) or m.group(2))
    return None


def _numeric(
    path: Path, name: str, cells: Sequence[str], line_of: Sequence[int]
) -> npt.NDArray[np.float64]:
    try:
        return np.array(cells, dtype=np.float64)
    except ValueError:
        pass
    # Slow path: de-identified (generalized) cells, else name the offending cell.
    out = np.empty(len(cells), dtype=np.float64)
    for i, (cell, line) in enumerate(zip(cells, line_of, strict=True)):
        try:
            out[i] = float(cell)
            continue
        except ValueError:
            value = generalized_value(cell)
        if value is not None:
            out[i] = value
            continue
        raise DataFormatError(
            f"{path} line {line}, column {name!r}: {cell!r} is not a number. Fix: clean "
            "the cell, or list the column in categorical=(...) if it holds categories"
        )
    return out


def _label_value(value: str) -> Any:
    f = float(value)
    return int(f) if f.is_integer() else f


def load_csv(path: str | Path, label: str, *, categorical: Sequence[str] = ()) -> TabularData:
    """Features and integer labels of a CSV file (plain or gzip) with a header row.

    Numeric columns become float64 features; ``categorical`` columns are one-hot
    encoded as ``name=value`` features (values sorted). Labels are mapped to
    0..C-1 in sorted order of their distinct values (numerically when they are
    all numbers, else as strings).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} does not exist. Fix: pass the path of an existing CSV file"
        )
    header, rows, line_of = _read_rows(path)
    if label not in header:
        raise ConfigError(
            "label",
            f"column {label!r} not in {path} (columns: {', '.join(header)})",
            "pass the name of an existing column",
        )
    unknown = [c for c in categorical if c not in header]
    if unknown:
        raise ConfigError(
            "categorical",
            f"columns {unknown} not in {path} (columns: {', '.join(header)})",
            "list only existing columns",
        )
    columns = list(zip(*rows, strict=True))
    cats = set(categorical)

    raw_labels = columns[header.index(label)]
    distinct = sorted(set(raw_labels))
    for bad in ("", "nan", "NaN", "NA"):
        if bad in distinct:
            line = line_of[raw_labels.index(bad)]
            raise DataFormatError(
                f"{path} line {line}: label column {label!r} is empty or {bad!r}. Fix: drop "
                "unlabelled rows before training"
            )
    parsed: dict[str, Any]
    try:
        parsed = {d: _label_value(d) for d in distinct}
    except ValueError:
        parsed = {d: d.strip() for d in distinct}  # not all numbers: compare as strings
    # A set first, so "1" and "1.0" are one class.
    classes = sorted(set(parsed.values()))
    code = {d: classes.index(parsed[d]) for d in distinct}
    labels = np.array([code[v] for v in raw_labels], dtype=np.int64)

    blocks: list[npt.NDArray[np.float64]] = []
    names: list[str] = []
    for name, cells in zip(header, columns, strict=True):
        if name == label:
            continue
        if name in cats:
            levels, inverse = np.unique(np.asarray(cells, dtype=str), return_inverse=True)
            blocks.append(
                (inverse.reshape(-1)[:, None] == np.arange(levels.size)).astype(np.float64)
            )
            names.extend(f"{name}={lv}" for lv in levels.tolist())
        else:
            blocks.append(_numeric(path, name, cells, line_of)[:, None])
            names.append(name)
    features = np.hstack(blocks) if blocks else np.zeros((len(rows), 0), dtype=np.float64)
    return TabularData(features, labels, names, classes)


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Per-feature mean and std (std 0 -> 1); features are the last axis.

    Fit it on training rows only and apply it to every split, so no statistic
    of the test rows leaks into what the model sees.
    """

    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]

    @classmethod
    def fit(cls, x: npt.ArrayLike) -> Standardizer:
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim == 0 or arr.size == 0:
            raise DataFormatError(
                "cannot fit a Standardizer on no data. Fix: pass at least one training row"
            )
        flat = arr.reshape(-1, arr.shape[-1])
        # Suppressed cells of a de-identified table are NaN: statistics skip them, and
        # a column with no value at all gets mean 0 and std 1.
        present = ~np.isnan(flat)
        count = present.sum(axis=0)
        safe = np.where(present, flat, 0.0)
        mean = np.divide(safe.sum(axis=0), count, out=np.zeros(flat.shape[1]), where=count > 0)
        var = np.divide(
            (np.where(present, flat - mean, 0.0) ** 2).sum(axis=0),
            count,
            out=np.zeros(flat.shape[1]),
            where=count > 0,
        )
        std = np.sqrt(var)
        return cls(mean, np.where(std > 0, std, 1.0))

    def transform(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim == 0 or arr.shape[-1] != self.mean.shape[0]:
            raise DataFormatError(
                f"Standardizer was fitted on {self.mean.shape[0]} features, got shape {arr.shape}. "
                "Fix: transform data with the same columns as the training data"
            )
        out = (arr - self.mean) / self.std
        # A missing (suppressed) value becomes the training mean: 0 after scaling.
        return np.nan_to_num(out, nan=0.0).astype(np.float32)


def train_test_split(
    n: int, test_fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Random disjoint, sorted (train, test) row indices; round(test_fraction * n) are test."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(
            "test_fraction", f"must be in [0, 1), got {test_fraction}", "use e.g. 0.2"
        )
    if n < 0:
        raise ConfigError("n", f"must be non-negative, got {n}", "pass the number of rows")
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    n_test = round(test_fraction * n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def credit_sequences(data: TabularData) -> npt.NDArray[np.float64]:
    """Raw (N, 6, 8) monthly sequences of the credit-default table, oldest month first.

    Step features: [PAY_k, BILL_AMTk, PAY_AMTk, LIMIT_BAL, SEX, EDUCATION,
    MARRIAGE, AGE]; month 1 is the most recent (its status column is PAY_0 in
    the UCI file, PAY_1 in some copies).
    """
    cols = {name: i for i, name in enumerate(data.feature_names)}
    status = ["PAY_0" if "PAY_0" in cols else "PAY_1", *(f"PAY_{k}" for k in range(2, 7))]
    per_step = [
        [status[k - 1], f"BILL_AMT{k}", f"PAY_AMT{k}", *CREDIT_STATIC]
        for k in range(CREDIT_STEPS, 0, -1)
    ]
    missing = sorted({c for step in per_step for c in step if c not in cols})
    if missing:
        raise DataFormatError(
            f"credit table lacks columns {missing}. Fix: pass the UCI 'default of credit card "
            "clients' CSV (LIMIT_BAL, SEX, ..., PAY_0, PAY_2..PAY_6, BILL_AMT1..6, PAY_AMT1..6)"
        )
    idx = np.array([[cols[c] for c in step] for step in per_step], dtype=np.int64)
    return data.features[:, idx]


def _credit_label(path: Path) -> str:
    with _open_text(path) as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    for name in _CREDIT_LABELS:
        if name in header:
            return name
    return _CREDIT_LABELS[0]  # load_csv then reports the missing column with the header


def load_credit(
    data_dir: str | Path | None = None, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """Credit-default (train, test): x float32 (N, 6, 8) standardised on the train rows, y int64.

    Reads ``<data_dir>/credit-default/UCI_Credit_Card.csv.gz``, a folder holding
    that file (or ``.csv``), or a CSV path. Each feature is standardised with
    one mean/std pooled over the six steps: a recurrent model shares weights
    across steps, so a quantity must be on the same scale at every step.
    """
    path = locate(data_dir, "credit-default", "UCI_Credit_Card.csv.gz", "UCI_Credit_Card.csv")
    data = load_csv(path, _credit_label(path))
    seqs = credit_sequences(data)
    train_idx, test_idx = train_test_split(len(data.labels), test_fraction, seed)
    if train_idx.size == 0:
        raise ConfigError("test_fraction", "leaves no training rows", "use a smaller test_fraction")
    scaler = Standardizer.fit(seqs[train_idx])
    return (
        ArrayDataset(scaler.transform(seqs[train_idx]), data.labels[train_idx]),
        ArrayDataset(scaler.transform(seqs[test_idx]), data.labels[test_idx]),
    )
