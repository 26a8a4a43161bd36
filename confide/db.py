"""Durable SQLite for every state file of Confide (coordinator state, ledger, audit log).

One connection per file in autocommit mode, WAL journal, ``synchronous=FULL`` (a commit is
on disk when it returns), and explicit ``BEGIN IMMEDIATE`` transactions under one lock, so
a read-then-write (the audit chain's previous hash, a budget check) cannot interleave.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T", bound="DurableDB")


def connect(path: Path, *, timeout: float = 30.0) -> sqlite3.Connection:
    """Open ``path`` for durable, explicitly-transacted use from several threads."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class DurableDB:
    """Lifecycle and transactions over ``self._db``; subclasses open it in ``__init__``."""

    _db: sqlite3.Connection
    _lock: threading.RLock

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
