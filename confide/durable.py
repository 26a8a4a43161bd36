"""Durable file writes: a file is whole and on disk, or untouched, never half written.

The coordinator's checkpoints and model files, the PKI's keys and certificates and the
revocation list are all written the same way: a sibling temp file created with the
final mode, the data written in full and fsynced, a rename over the target, then the
folder fsynced so the rename itself survives a crash. A reader sees the old file or the
new one; a failure (a full disk: ENOSPC) removes the temp file and leaves the old file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` as ``path`` (created with ``mode``), durably and all or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)  # before any byte lands: a key is never readable by others
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (its entry on disk too)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems cannot, by design
            raise
    finally:
        os.close(fd)


__all__ = ["fsync_dir", "write_atomic"]
