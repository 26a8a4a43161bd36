"""The coordinator's durable state: one SQLite file plus model files; a crash loses nothing.

Checkpoints are written file first (to a temporary name, fsynced, renamed, the folder
fsynced), then recorded in SQLite with the file's SHA-256 in one transaction; a
checkpoint row therefore always points at a complete file, and loading verifies the
digest. A write that fails (a full disk) leaves no file behind and no row, so the
previous checkpoint stays the one a restart resumes from. With a seal key the files are
AES-256-GCM sealed (:mod:`confide.privacy.crypto.seal`) and authenticated on load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from confide.db import DurableDB, connect
from confide.durable import write_atomic
from confide.errors import ConfideError
from confide.privacy.crypto import SealError, SealKey, is_sealed, seal, unseal

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
CREATE TABLE IF NOT EXISTS update_nonces (
    site_id TEXT NOT NULL, nonce BLOB NOT NULL, round INTEGER NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (site_id, nonce)
);
"""


class StateError(ConfideError, RuntimeError):
    """The state folder is unusable or belongs to another federation."""


class CheckpointWriteError(StateError):
    """A checkpoint could not be written (a full disk, a failing device); nothing of it was
    recorded, and the previous checkpoint is intact."""


class UnsealedCheckpointError(StateError):
    """Sealing is configured, but a checkpoint was written before it was: refused until the
    operator seals the old checkpoints (``confide coordinator seal-checkpoints``)."""


SEALED_SUFFIX = ".sealed"
EXPORT_PURPOSE = "confide model export"


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
    """Write ``data`` as ``path`` (mode 0600), durably and all or nothing; return its SHA-256."""
    write_atomic(path, data, mode=0o600)
    return hashlib.sha256(data).hexdigest()


def _purpose(file_name: str) -> str:
    # The file's name binds the round and the kind (model, strategy): a sealed checkpoint
    # renamed to another round's name fails authentication.
    return f"confide checkpoint {file_name}"


def _load_npz(data: bytes) -> tuple[list[str], list[npt.NDArray[Any]]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        names = [str(n) for n in z["__names__"]]
        keys = sorted(k for k in z.files if k != "__names__")
        return names, [z[k] for k in keys]


def load_model_file(
    path: Path, seal_key: SealKey | None = None
) -> tuple[list[str], list[npt.NDArray[Any]]]:
    """Names and arrays of a model file written by ``confide coordinator export``.

    A sealed export needs the federation's seal key and is authenticated first; a
    plaintext one is read as it is.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise StateError(f"cannot read the model file {path} ({e}). Fix: check the path") from e
    if is_sealed(data):
        if seal_key is None:
            raise SealError(
                f"model file {path} is sealed. Fix: pass the federation's seal key "
                "(server.seal_key_file or server.seal_passphrase_env)"
            )
        data = unseal(data, seal_key, purpose=EXPORT_PURPOSE, where=Path(path))
    try:
        return _load_npz(data)
    except (OSError, ValueError, KeyError) as e:
        raise StateError(
            f"model file {path} is not a Confide model export ({e}). Fix: pass a file written "
            "by `confide coordinator export`"
        ) from None


class Store(DurableDB):
    """SQLite state of one federation (``state.db``) and its checkpoint files (``models/``)."""

    def __init__(self, state_dir: Path, seal_key: SealKey | None = None) -> None:
        self.dir = state_dir
        self.seal_key = seal_key
        self.models_dir = state_dir / "models"
        try:
            self.models_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # model weights
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
        """Write round ``rnd``'s model (and optimizer state) and record it, atomically.

        The files are durable before their SQLite row is committed. When a file cannot be
        written (:class:`CheckpointWriteError`: a full disk, ...), whatever this call wrote
        is removed and nothing is recorded: the previous checkpoint stays the latest.
        """
        arrays = {f"{i:05d}": np.asarray(w) for i, w in enumerate(weights)}
        arrays["__names__"] = np.array(list(names))
        files = [(f"round-{rnd:05d}", arrays)]
        if strategy_state:
            flat = {
                f"{key}__{i:05d}": np.asarray(a)
                for key, seq in strategy_state.items()
                for i, a in enumerate(seq)
            }
            files.append((f"round-{rnd:05d}.strategy", flat))
        written: list[tuple[Path, str]] = []
        for stem, content in files:
            path = self.models_dir / (stem + (SEALED_SUFFIX if self.seal_key else ".npz"))
            data = _npz_bytes(content)
            if self.seal_key is not None:
                data = seal(data, self.seal_key, purpose=_purpose(path.name))
            try:
                written.append((path, _write_atomic(path, data)))
            except OSError as e:
                for done, _ in written:  # complete, but no row will ever point at it
                    with contextlib.suppress(OSError):
                        done.unlink()
                raise CheckpointWriteError(self._write_problem(rnd, path, e)) from e
        (model_path, model_sha), *rest = written
        strategy_path, strategy_sha = rest[0] if rest else (None, None)
        try:
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
        except sqlite3.Error as e:  # SQLITE_FULL: the files are there, unrecorded
            raise CheckpointWriteError(self._write_problem(rnd, self.path, e)) from e
        return model_path

    def _write_problem(self, rnd: int, path: Path, e: BaseException) -> str:
        with self._lock:
            (previous,) = self._db.execute("SELECT MAX(round) FROM checkpoints").fetchone()
        kept = (
            f"the checkpoint of round {previous} is intact and a restarted coordinator "
            "resumes from it"
            if previous is not None
            else "no earlier checkpoint exists"
        )
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(e, sqlite3.Error) and "full" in str(e)
        )
        cause = "no space left on the device" if full else str(e)
        fix = (
            f"free space on the disk holding {self.dir} (or move server.state_dir to a bigger disk)"
            if full
            else f"check that {self.dir} is on a writable, healthy disk"
        )
        return (
            f"cannot write the checkpoint of round {rnd} to {path} ({cause}); nothing of it "
            f"was recorded, {kept}. Fix: {fix}, then restart the coordinator"
        )

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint, verified against its recorded digest (and, when
        sealed, authenticated with the seal key)."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, model_file, model_sha256, strategy_file, strategy_sha256 "
                "FROM checkpoints ORDER BY round DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        rnd, model_file, model_sha, strategy_file, strategy_sha = row
        names, weights = _load_npz(self._read_verified(model_file, model_sha))
        state: dict[str, list[npt.NDArray[Any]]] = {}
        if strategy_file:
            sdata = self._read_verified(strategy_file, strategy_sha)
            with np.load(io.BytesIO(sdata), allow_pickle=False) as z:
                for k in sorted(z.files):
                    key = k.rsplit("__", 1)[0]
                    state.setdefault(key, []).append(z[k])
        return Checkpoint(int(rnd), names, weights, state)

    def _read_verified(self, name: str, sha: str, *, plaintext_ok: bool = False) -> bytes:
        """The plaintext of checkpoint file ``name``: authentic, and the one recorded.

        ``plaintext_ok`` (the migration only) accepts an unsealed file while sealing is on.
        """
        path = self.models_dir / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StateError(
                f"checkpoint file {path} is missing ({e}). Fix: restore it from backup, or "
                "start a new federation in an empty state_dir"
            ) from e
        recorded = hashlib.sha256(data).hexdigest() == sha
        if is_sealed(data):
            if self.seal_key is None:
                raise StateError(
                    f"checkpoint file {path} is sealed, but no seal key is configured. Fix: set "
                    "server.seal_key_file or server.seal_passphrase_env to the key it was "
                    "sealed with"
                )
            plain = unseal(data, self.seal_key, purpose=_purpose(name), where=path)
            if not recorded:
                raise SealError(
                    f"file {path} is authentic but not the checkpoint recorded in {self.path} "
                    "(an older copy put back?). Fix: restore the recorded file from backup"
                )
            return plain
        if self.seal_key is not None and not plaintext_ok:
            if not recorded:
                raise SealError(
                    f"file {path} is neither a sealed checkpoint nor the file recorded in "
                    f"{self.path}: corrupted or tampered. Fix: restore it from backup"
                )
            raise UnsealedCheckpointError(
                f"checkpoint file {path} is not sealed (it was written before sealing was "
                "configured), and Confide loads no unsealed weights while sealing is on. Fix: "
                "seal the existing checkpoints once with `confide coordinator seal-checkpoints "
                "--config federation.toml`, or remove the seal setting"
            )
        if not recorded:
            raise StateError(
                f"checkpoint file {path} does not match its recorded SHA-256 (corrupted or "
                "edited). Fix: restore it from backup"
            )
        return data

    def seal_checkpoints(self) -> list[Path]:
        """Seal every plaintext checkpoint with the seal key (the one-time migration).

        Each plaintext file is verified against its digest, written sealed under a new
        name, its row switched over in one transaction, and only then deleted. Running
        it again after an interruption finishes the job; sealed files are authenticated
        and left as they are. Returns the sealed files written.
        """
        if self.seal_key is None:
            raise StateError(
                "no seal key to seal the checkpoints with. Fix: set server.seal_key_file or "
                "server.seal_passphrase_env first"
            )
        with self._lock:
            rows = self._db.execute(
                "SELECT round, model_file, model_sha256, strategy_file, strategy_sha256 "
                "FROM checkpoints ORDER BY round"
            ).fetchall()
        sealed: list[Path] = []
        for rnd, *pairs in rows:
            for column, (name, sha) in zip(
                ("model", "strategy"), (pairs[:2], pairs[2:]), strict=True
            ):
                if name is None:
                    continue
                plain_name = name.removesuffix(SEALED_SUFFIX).removesuffix(".npz") + ".npz"
                if name.endswith(SEALED_SUFFIX):
                    self._read_verified(name, sha)  # authentic, and the one recorded
                else:
                    path = self.models_dir / (name.removesuffix(".npz") + SEALED_SUFFIX)
                    data = seal(
                        self._read_verified(name, sha, plaintext_ok=True),
                        self.seal_key,
                        purpose=_purpose(path.name),
                    )
                    try:
                        digest = _write_atomic(path, data)
                    except OSError as e:
                        raise CheckpointWriteError(self._write_problem(rnd, path, e)) from e
                    with self._tx() as db:
                        db.execute(
                            f"UPDATE checkpoints SET {column}_file = ?, {column}_sha256 = ? "
                            "WHERE round = ?",
                            (path.name, digest, rnd),
                        )
                    sealed.append(path)
                with contextlib.suppress(FileNotFoundError):
                    (self.models_dir / plain_name).unlink()
        return sealed

    def export_model(self, out: Path, *, plaintext: bool = False) -> tuple[Path, int, bool]:
        """Write the latest checkpoint's model as ``out`` (npz of named arrays, mode 0600).

        Sealed (purpose "confide model export") when a seal key is set, unless
        ``plaintext``; :func:`load_model_file` reads either. Returns the path, the round
        and whether the file is sealed.
        """
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            raise StateError(
                f"no checkpoint in {self.dir} yet. Fix: start the coordinator and let a round "
                "finish first"
            )
        arrays = {f"{i:05d}": w for i, w in enumerate(checkpoint.weights)}
        arrays["__names__"] = np.array(checkpoint.names)
        data = _npz_bytes(arrays)
        sealed = self.seal_key is not None and not plaintext
        if self.seal_key is not None and sealed:
            data = seal(data, self.seal_key, purpose=EXPORT_PURPOSE)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_atomic(out, data)
        except OSError as e:
            raise StateError(
                f"cannot write {out} ({e}). Fix: choose a writable --out with enough space"
            ) from e
        return out, checkpoint.round, sealed

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

    # --- signed updates: nonces seen (confide.server.integrity) ---------------------------

    def claim_nonce(self, site_id: str, nonce: bytes, rnd: int) -> bool:
        """Record an upload's nonce; False when the site used it before (a replay).

        Committed before the upload is accepted, so a restarted coordinator still refuses
        a copy of an upload it saw before the crash. The commit skips its own fsync (WAL,
        ``synchronous=NORMAL``: it survives a process crash at once); the outcome record
        that follows every upload (``site_result``, an event) is a full commit and makes it
        durable against power loss too, without a second fsync on the upload's path.
        """
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._tx() as db:
                    db.execute(
                        "INSERT INTO update_nonces (site_id, nonce, round, ts) VALUES (?, ?, ?, ?)",
                        (site_id, nonce, rnd, time.time()),
                    )
            except sqlite3.IntegrityError:
                return False
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
        return True

    def prune_nonces(self, before_round: int) -> int:
        """Forget the nonces of rounds before ``before_round`` (their statements are refused
        for naming another round anyway); returns how many went."""
        with self._tx() as db:
            return db.execute("DELETE FROM update_nonces WHERE round < ?", (before_round,)).rowcount
