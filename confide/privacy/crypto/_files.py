"""File helpers of the PKI: atomic writes with the final mode from the first byte, a folder lock."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confide.durable import write_atomic as durable_write

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
LOCK_FILE = ".lock"


def write_atomic(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` via a sibling temp file and a rename.

    A reader (a coordinator reloading ``crl.pem``) sees the old file or the new one, never
    half of one; a private key is created 0600, so it is never readable by others, not even
    between a write and a chmod.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    durable_write(path, data, mode=PRIVATE_FILE_MODE if private else PUBLIC_FILE_MODE)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) as 0700 if it does not exist; an existing folder is kept."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def exposed_key_problem(path: Path, what: str = "private key") -> str | None:
    """The error text for a key file others can read (with its fix), or None when private."""
    if not readable_by_others(path):
        return None
    mode = path.stat().st_mode & 0o777
    return f"{path}: {what} is readable by other users (mode {mode:04o}). Fix: chmod 600 {path}"


def readable_by_others(path: Path) -> bool:
    """Whether group or others have any permission on ``path`` (POSIX only)."""
    if os.name == "nt":  # NTFS ACLs are not mode bits; the folder's ACL is the protection there
        return False
    return bool(path.stat().st_mode & 0o077)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` so two `confide pki` runs never interleave."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one administrator at a time
        yield
        return
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
