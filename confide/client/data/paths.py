"""Locate the data sets on disk: the shared offline copies, or a folder the user names."""

from __future__ import annotations

import os
from pathlib import Path

from confide.errors import DataNotFoundError

ENV_VAR = "CONFIDE_DATA_DIR"

_FIX = f"pass --data-dir PATH (the folder that holds the data sets) or set {ENV_VAR}=PATH"


def _candidate_dirs() -> list[Path]:
    # The checkout sits beside shared/ (<project>/../shared/data); look from the
    # working directory first, then from wherever this package is installed, so
    # tests, notebooks and the CLI all find it without configuration.
    package_dir = Path(__file__).resolve().parents[2]  # .../confide
    starts = [Path.cwd(), *package_dir.parents]
    seen: set[Path] = set()
    out: list[Path] = []
    for start in starts:
        cand = (start / ".." / "shared" / "data").resolve()
        if cand not in seen:
            seen.add(cand)
            out.append(cand)
    return out


def default_data_dir() -> Path:
    """The data folder to use when the caller names none.

    ``$CONFIDE_DATA_DIR`` wins when set; otherwise the first existing
    ``<dir>/../shared/data`` for ``dir`` in the working directory and each parent
    of the ``confide`` package folder.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(
                f"{ENV_VAR}={env} is not an existing folder. Fix: point {ENV_VAR} at the "
                "folder that holds the data sets, or pass --data-dir PATH"
            )
        return path
    candidates = _candidate_dirs()
    for cand in candidates:
        if cand.is_dir():
            return cand
    looked = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(f"no data folder found (looked in {looked}). Fix: {_FIX}")


def resolve(data_dir: str | Path | None, *parts: str) -> Path:
    """``data_dir`` (or :func:`default_data_dir`) joined with ``parts``; it must exist."""
    base = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    path = base.joinpath(*parts)
    if not path.exists():
        what = "/".join(parts) if parts else "the data folder"
        raise DataNotFoundError(
            f"{path} does not exist. Fix: {_FIX}, naming a folder that contains {what}"
        )
    return path


def locate(data_dir: str | Path | None, folder: str, *names: str) -> Path:
    """Find the first of ``names`` in ``<data_dir>/<folder>/`` or directly in ``data_dir``.

    ``data_dir`` may also be the file itself. Accepting all three shapes lets a
    site point the client at its own copy without recreating our folder layout.
    """
    if not names:
        raise ValueError("locate() needs at least one file name")
    if data_dir is not None and Path(data_dir).expanduser().is_file():
        return Path(data_dir).expanduser()
    base = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    tried: list[Path] = []
    for name in names:
        for cand in (base / folder / name, base / name):
            if cand.is_file():
                return cand
            tried.append(cand)
    raise DataNotFoundError(
        f"{names[0]} not found (looked for {', '.join(str(t) for t in tried)}). "
        f"Fix: {_FIX}, naming a folder that contains {folder}/{names[0]} or {names[0]} itself"
    )
