"""The coordinator's durable state: one SQLite file plus model files; a crash loses nothing.

Checkpoints are written file first (to a temporary name, fsynced, renamed), then
recorded in SQLite with the file's SHA-256 in one transaction; a checkpoint row
therefore always points at a complete file, and loading verifies the digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from confide.db import DurableDB, connect
from confide.errors import ConfideError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
    site_id TEXT PRIMARY KEY, role TEXT NOT NULL, serial TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, session_id TEXT,
    tasks_done INTEGER NOT NULL DEFAULT 0, tasks_failed INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL,
    started REAL NOT NULL, finished REAL, selected TEXT NOT NULL DEFAULT '[]',
    succeeded TEXT NOT NULL DEFAULT '[]', failures TEXT NOT NULL DEFAULT '{}',
    train_metrics TEXT NOT NULL DEFAULT '{}', eval_metrics TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (round, attempt)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY, model_file TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    strategy_file TEXT, strategy_sha256 TEXT, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
    site_id TEXT, round INTEGER, detail TEXT NOT NULL DEFAULT '{}'
);
"""


class StateError(ConfideError, RuntimeError):
    """The state folder is unusable or belongs to another federation."""


@dataclass(frozen=True)
class Checkpoint:
    """A completed round's model (and server-optimizer state), as saved."""

    round: int
    names: list[str]
    weights: list[npt.NDArray[Any]]
    strategy_state: dict[str, list[npt.NDArray[Any]]]


@dataclass(frozen=True)
class RoundRow:
    round: int
    attempt: int
    status: str
    started: float
    finished: float | None
    selected: list[str]
    succeeded: list[str]
    failures: dict[str, str]
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]


@dataclass(frozen=True)
class SiteRow:
    site_id: str
    role: str
    serial: str
    first_seen: float
    last_seen: float
    tasks_done: int
    tasks_failed: int
    last_error: str | None


def _npz_bytes(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> str:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


class Store(DurableDB):
    """SQLite state of one federation (``state.db``) and its checkpoint files (``models/``)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.models_dir = state_dir / "models"
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(
                f"cannot create the state folder {state_dir} ({e}). Fix: set server.state_dir "
                "to a writable folder"
            ) from e
        self.path = state_dir / "state.db"
        self._lock = threading.RLock()
        self._db = connect(self.path)
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

    # --- identity of the federation ------------------------------------------------------

    def bind(self, federation: str, model: str) -> None:
        """Tie the state folder to one federation and model; refuse to mix federations."""
        with self._tx() as db:
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
            for key, value in (("federation", federation), ("model", model)):
                if key in rows and rows[key] != value:
                    raise StateError(
                        f"the state in {self.dir} belongs to {key} {rows[key]!r}, not {value!r}. "
                        "Fix: use another server.state_dir, or the original configuration"
                    )
                db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))

    def meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    # --- sites ---------------------------------------------------------------------------

    def site_seen(
        self, site_id: str, role: str, serial: str, session_id: str | None = None
    ) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO sites (site_id, role, serial, first_seen, last_seen, session_id) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(site_id) DO UPDATE SET "
                "last_seen = excluded.last_seen, serial = excluded.serial, "
                "session_id = COALESCE(excluded.session_id, sites.session_id)",
                (site_id, role, serial, now, now, session_id),
            )

    def touch(self, site_id: str) -> None:
        """Record that a site was heard from (for `coordinator status` in another process)."""
        with self._tx() as db:
            db.execute("UPDATE sites SET last_seen = ? WHERE site_id = ?", (time.time(), site_id))

    def site_result(self, site_id: str, ok: bool, error: str | None = None) -> None:
        column = "tasks_done" if ok else "tasks_failed"
        with self._tx() as db:
            db.execute(
                f"UPDATE sites SET {column} = {column} + 1, last_error = COALESCE(?, last_error) "
                "WHERE site_id = ?",
                (error, site_id),
            )

    def sites(self) -> list[SiteRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT site_id, role, serial, first_seen, last_seen, tasks_done, tasks_failed, "
                "last_error FROM sites ORDER BY site_id"
            ).fetchall()
        return [SiteRow(*r) for r in rows]

    # --- rounds --------------------------------------------------------------------------

    def round_started(self, rnd: int, attempt: int, selected: Sequence[str]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds (round, attempt, status, started, selected) "
                "VALUES (?, ?, 'running', ?, ?)",
                (rnd, attempt, time.time(), json.dumps(list(selected))),
            )

    def round_finished(
        self,
        rnd: int,
        attempt: int,
        status: str,
        *,
        succeeded: Sequence[str] = (),
        failures: Mapping[str, str] | None = None,
        train_metrics: Mapping[str, float] | None = None,
        eval_metrics: Mapping[str, float] | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET status = ?, finished = ?, succeeded = ?, failures = ?, "
                "train_metrics = ?, eval_metrics = ? WHERE round = ? AND attempt = ?",
                (
                    status,
                    time.time(),
                    json.dumps(list(succeeded)),
                    json.dumps(dict(failures or {})),
                    json.dumps(dict(train_metrics or {})),
                    json.dumps(dict(eval_metrics or {})),
                    rnd,
                    attempt,
                ),
            )

    def rounds(self) -> list[RoundRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT round, attempt, status, started, finished, selected, succeeded, failures, "
                "train_metrics, eval_metrics FROM rounds ORDER BY round, attempt"
            ).fetchall()
        return [
            RoundRow(r[0], r[1], r[2], r[3], r[4], *(json.loads(x) for x in r[5:])) for r in rows
        ]

    # --- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(
        self,
        rnd: int,
        names: Sequence[str],
        weights: Sequence[npt.NDArray[Any]],
        strategy_state: Mapping[str, Sequence[npt.NDArray[Any]]] | None = None,
    ) -> Path:
        """Write round ``rnd``'s model (and optimizer state) and record it, atomically."""
        model_path = self.models_dir / f"round-{rnd:05d}.npz"
        arrays = {f"{i:05d}": np.asarray(w) for i, w in enumerate(weights)}
        arrays["__names__"] = np.array(list(names))
        model_sha = _write_atomic(model_path, _npz_bytes(arrays))
        strategy_path: Path | None = None
        strategy_sha: str | None = None
        if strategy_state:
            strategy_path = self.models_dir / f"round-{rnd:05d}.strategy.npz"
            flat = {
                f"{key}__{i:05d}": np.asarray(a)
                for key, seq in strategy_state.items()
                for i, a in enumerate(seq)
            }
            strategy_sha = _write_atomic(strategy_path, _npz_bytes(flat))
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                (
                    rnd,
                    model_path.name,
                    model_sha,
                    strategy_path.name if strategy_path else None,
                    strategy_sha,
                    time.time(),
                ),
            )
        return model_path

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint, verified against its recorded digest."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, model_file, model_sha256, strategy_file, strategy_sha256 "
                "FROM checkpoints ORDER BY round DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        rnd, model_file, model_sha, strategy_file, strategy_sha = row
        data = self._read_verified(model_file, model_sha)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            names = [str(n) for n in z["__names__"]]
            keys = sorted(k for k in z.files if k != "__names__")
            weights = [z[k] for k in keys]
        state: dict[str, list[npt.NDArray[Any]]] = {}
        if strategy_file:
            sdata = self._read_verified(strategy_file, strategy_sha)
            with np.load(io.BytesIO(sdata), allow_pickle=False) as z:
                for k in sorted(z.files):
                    key = k.rsplit("__", 1)[0]
                    state.setdefault(key, []).append(z[k])
        return Checkpoint(int(rnd), names, weights, state)

    def _read_verified(self, name: str, sha: str) -> bytes:
        path = self.models_dir / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StateError(
                f"checkpoint file {path} is missing ({e}). Fix: restore it from backup, or "
                "start a new federation in an empty state_dir"
            ) from e
        if hashlib.sha256(data).hexdigest() != sha:
            raise StateError(
                f"checkpoint file {path} does not match its recorded SHA-256 (corrupted or "
                "edited). Fix: restore it from backup"
            )
        return data

    # --- events --------------------------------------------------------------------------

    def event(
        self, kind: str, *, site_id: str | None = None, rnd: int | None = None, **detail: Any
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (ts, kind, site_id, round, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), kind, site_id, rnd, json.dumps(detail, default=str)),
            )

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT ts, kind, site_id, round, detail FROM events "
                + ("WHERE kind = ? " if kind else "")
                + "ORDER BY id",
                (kind,) if kind else (),
            ).fetchall()
        return [
            {"ts": r[0], "kind": r[1], "site_id": r[2], "round": r[3], **json.loads(r[4])}
            for r in rows
        ]
