"""``confide deid text --in notes.jsonl --out out.jsonl``: scrub a JSONL file of notes.

Each input line is ``{"id": ..., "text": ...}``; each output line is
``{"id": ..., "text": <scrubbed>, "spans": [{"start", "end", "type"}, ...]}`` with spans
over the *input* text. The file is streamed in batches of lines (bounded memory), scrubbed
by ``--workers`` processes for large inputs, in input order; the output is
written to a temporary file next to ``--out`` and renamed only when every line succeeded,
so an error never leaves partial output behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from confide.errors import DataFormatError, DataNotFoundError
from confide.privacy.deid.text import DeidError, Scrubber, ScrubResult

PROGRESS_MIN_BYTES = 5_000_000  # show a progress bar on stderr above this input size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="inp", required=True, type=Path, help="input JSONL file")
    p.add_argument("--out", required=True, type=Path, help="output JSONL file")
    p.add_argument("--mode", choices=["placeholder", "pseudonym"], default="placeholder")
    p.add_argument("--secret-file", type=Path, help="key file for --mode pseudonym (>= 16 bytes)")
    p.add_argument("--backend", choices=["builtin", "presidio"], default="builtin")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that scrub in parallel (default: every core for inputs >= 2 MB)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _secret(args: argparse.Namespace) -> bytes | None:
    if args.mode != "pseudonym":
        return None
    if args.secret_file is None:
        raise DeidError(
            "--mode pseudonym needs --secret-file FILE. Fix: create one with "
            "`head -c 32 /dev/urandom > deid.key` and keep it private"
        )
    path = Path(args.secret_file)
    if not path.is_file():
        raise DataNotFoundError(f"--secret-file: {path} not found. Fix: pass an existing key file")
    key = path.read_bytes().strip()
    if len(key) < 16:
        raise DeidError(
            f"--secret-file: {path} holds {len(key)} bytes, too short to be secret. Fix: use "
            "at least 16 random bytes (`head -c 32 /dev/urandom > deid.key`)"
        )
    return key


def _parse(line: str, lineno: int, path: Path) -> tuple[Any, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}). Fix: one JSON "
            'object per line, e.g. {"id": "n1", "text": "..."}'
        ) from e
    if not isinstance(obj, dict):
        raise DataFormatError(
            f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}. Fix: "
            '{"id": ..., "text": ...} on each line'
        )
    text = obj.get("text")
    if not isinstance(text, str):
        what = "missing" if "text" not in obj else f"a {type(text).__name__}, not a string"
        raise DataFormatError(
            f'{path}:{lineno}: field "text" is {what}. Fix: give every line a "text" string'
        )
    return obj.get("id"), text


BATCH_LINES = 2000  # lines parsed, scrubbed and written together: bounded memory
PARALLEL_MIN_BYTES = 2_000_000  # below this, starting processes costs more than it saves

_worker_scrubber: Scrubber | None = None


def _init_worker(mode: str, secret: bytes | None, backend: str) -> None:
    global _worker_scrubber
    _worker_scrubber = Scrubber(mode=mode, secret=secret, backend=backend)  # type: ignore[arg-type]


def _scrub(text: str) -> ScrubResult:
    assert _worker_scrubber is not None
    return _worker_scrubber.scrub(text)


def _workers(requested: int, size: int) -> int:
    if requested < 0:
        raise DeidError(f"--workers: {requested} is negative. Fix: use 0 (automatic) or more")
    if requested == 0:
        return (os.cpu_count() or 1) if size >= PARALLEL_MIN_BYTES else 1
    return requested


def _batches(lines: Iterable[str], path: Path) -> Iterator[list[tuple[Any, str, int]]]:
    """(id, text, line bytes) of each non-blank line, parsed and checked, in batches."""
    batch: list[tuple[Any, str, int]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        note_id, text = _parse(line, lineno, path)
        batch.append((note_id, text, len(line.encode("utf-8"))))
        if len(batch) >= BATCH_LINES:
            yield batch
            batch = []
    if batch:
        yield batch


def run(args: argparse.Namespace) -> int:
    inp: Path = Path(args.inp)
    out: Path = Path(args.out)
    if not inp.is_file():
        raise DataNotFoundError(f"--in: {inp} not found. Fix: pass an existing JSONL file")
    secret = _secret(args)
    scrubber = Scrubber(mode=args.mode, secret=secret, backend=args.backend)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = inp.stat().st_size
    show = size >= PROGRESS_MIN_BYTES and not getattr(args, "quiet", False)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    n = 0
    try:
        with (
            os.fdopen(fd, "w", encoding="utf-8") as w,
            inp.open("r", encoding="utf-8") as r,
        ):
            progress = None
            task = None
            if show:
                from rich.console import Console
                from rich.progress import Progress

                progress = Progress(console=Console(stderr=True), transient=True)
                progress.start()
                task = progress.add_task("scrubbing", total=size)
            workers = _workers(getattr(args, "workers", 1), size)
            pool = (
                ProcessPoolExecutor(
                    workers, initializer=_init_worker, initargs=(args.mode, secret, args.backend)
                )
                if workers > 1
                else None
            )
            try:
                for batch in _batches(r, inp):
                    texts = [text for _, text, _ in batch]
                    if pool is None:
                        results = [scrubber.scrub(t) for t in texts]
                    else:
                        results = list(pool.map(_scrub, texts, chunksize=32))
                    for (note_id, _, nbytes), res in zip(batch, results, strict=True):
                        rec = {
                            "id": note_id,
                            "text": res.text,
                            "spans": [s.as_dict() for s in res.spans],
                        }
                        w.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        n += 1
                        if progress is not None and task is not None:
                            progress.update(task, advance=nbytes)
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
                if progress is not None:
                    progress.stop()
        os.replace(tmp, out)
    except UnicodeDecodeError as e:
        tmp.unlink(missing_ok=True)
        raise DataFormatError(f"{inp}: not UTF-8 text ({e.reason}). Fix: re-encode as UTF-8") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not getattr(args, "quiet", False):
        print(f"scrubbed {n} notes -> {out}", file=sys.stderr)
    return 0
