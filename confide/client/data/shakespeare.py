"""Tiny Shakespeare split by speaking role, a character vocabulary, and next-character data sets."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from confide.errors import ConfigError, DataFormatError

from .arrays import ArrayDataset
from .paths import locate

# Index 0 stands for every character outside the vocabulary; U+FFFD is what
# decode() shows for it, the Unicode convention for "unrepresentable".
OOV = "\ufffd"
VOCAB = OOV + "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB)

_ENCODE_LUT = np.zeros(128, dtype=np.int64)
for _i, _ch in enumerate(VOCAB[1:], start=1):
    _ENCODE_LUT[ord(_ch)] = _i
_DECODE_CODEPOINTS = np.array([ord(c) for c in VOCAB], dtype="<u4")

# A speaker heading: a whole line such as "First Citizen:" or "KING RICHARD III:".
# Commas and '&' occur in real headings ("Senators, &C:"), so they are allowed.
_SPEAKER = re.compile(r"[A-Za-z][A-Za-z '.,&-]*:")


def encode(text: str) -> npt.NDArray[np.int64]:
    """Character ids of ``text``; characters outside :data:`VOCAB` become 0."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    ascii_ids = _ENCODE_LUT[np.minimum(cps, 127)]
    return np.where(cps < 128, ascii_ids, 0).astype(np.int64, copy=False)


def decode(ids: npt.ArrayLike) -> str:
    """The text of character ids (0 shows as U+FFFD)."""
    arr = np.asarray(ids)
    valid = np.issubdtype(arr.dtype, np.integer) and (
        arr.size == 0 or (arr.min() >= 0 and arr.max() < VOCAB_SIZE)
    )
    if not valid:
        raise DataFormatError(
            f"character ids must be integers in 0..{VOCAB_SIZE - 1}. Fix: decode model "
            "outputs with argmax over the vocabulary first"
        )
    return bytes(_DECODE_CODEPOINTS[arr.reshape(-1)].tobytes()).decode("utf-32-le")


def _is_speaker(line: str) -> bool:
    return _SPEAKER.fullmatch(line) is not None


def parse_speeches(text: str) -> list[tuple[str, str]]:
    """``(role, speech)`` pairs in order of appearance.

    A speech is a paragraph (lines between blank lines) whose first line is a
    speaker heading. A heading is only recognised at the start of a paragraph:
    verse lines such as "Come:" or "Nay, let them follow:" look exactly like
    headings (1,300+ of them in Tiny Shakespeare). A paragraph without a
    heading continues the previous role; text before the first heading is
    not a speech and is skipped. Runs of spaces in role names are collapsed
    ("LADY  CAPULET" is LADY CAPULET).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    speeches: list[tuple[str, str]] = []
    role: str | None = None
    body: list[str] = []
    paragraph_start = True

    def flush() -> None:
        if role is not None and body:
            speeches.append((role, "\n".join(body)))
        body.clear()

    for line in lines:
        stripped = line.strip()
        if not stripped:
            paragraph_start = True
            continue
        if paragraph_start and _is_speaker(stripped):
            flush()
            role = " ".join(stripped[:-1].split())
        elif paragraph_start:
            flush()
            body.append(line)
        else:
            body.append(line)
        paragraph_start = False
    flush()
    if not speeches:
        raise DataFormatError(
            "no speeches found: no paragraph starts with a 'NAME:' line. Fix: use a play "
            "text in the Tiny Shakespeare layout (a 'NAME:' line, the speech, a blank line)"
        )
    return speeches


def split_by_role(text: str) -> dict[str, str]:
    """Role -> its speeches joined with newlines; roles and speeches in order of appearance."""
    grouped: dict[str, list[str]] = {}
    for role, speech in parse_speeches(text):
        grouped.setdefault(role, []).append(speech)
    return {role: "\n".join(parts) for role, parts in grouped.items()}


@functools.lru_cache(maxsize=4)
def _roles_cached(path: Path, _stamp: tuple[int, int]) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"{path} is not UTF-8 text ({exc}). Fix: convert it to UTF-8"
        ) from exc
    return split_by_role(text)


def load_shakespeare_roles(data_dir: str | Path | None = None) -> dict[str, str]:
    """Role -> text of ``<data_dir>/tinyshakespeare/input.txt`` (or of a text file ``data_dir``)."""
    path = locate(data_dir, "tinyshakespeare", "input.txt").resolve()
    st = path.stat()
    # A shallow copy: the cached dict stays intact whatever the caller does.
    return dict(_roles_cached(path, (st.st_mtime_ns, st.st_size)))


def char_sequences(text: str, seq_len: int = 80) -> ArrayDataset:
    """Non-overlapping windows: x = ids[i:i+seq_len], y = that window shifted by one character."""
    if seq_len < 1:
        raise ConfigError("seq_len", f"must be at least 1, got {seq_len}", "use e.g. seq_len=80")
    ids = encode(text)
    n = max(0, (ids.size - 1) // seq_len)
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len).copy()
    return ArrayDataset(x, y)


@dataclass(frozen=True, eq=False)
class RoleData:
    """One role's data: earlier sequences for training, the last ones for testing."""

    role: str
    train: ArrayDataset
    test: ArrayDataset


def role_datasets(
    roles: Mapping[str, str],
    seq_len: int = 80,
    min_sequences: int = 2,
    test_fraction: float = 0.2,
) -> list[RoleData]:
    """Per-role train/test sequences, largest roles first (ties by name).

    Roles with fewer than ``min_sequences`` sequences are dropped. The test split
    is each role's last ``ceil(test_fraction * n)`` sequences (at least one, and
    at least one left for training): a temporal split as in LEAF, so the model
    is tested on what the character says later.
    """
    if min_sequences < 2:
        raise ConfigError(
            "min_sequences",
            f"must be at least 2, got {min_sequences}",
            "keep at least one sequence for training and one for testing",
        )
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            "test_fraction", f"must be in (0, 1), got {test_fraction}", "use e.g. 0.2"
        )
    out: list[RoleData] = []
    for role, text in roles.items():
        seqs = char_sequences(text, seq_len)
        n = len(seqs)
        if n < min_sequences:
            continue
        # The epsilon keeps float noise (0.1 * 30 = 3.0000000000000004) from adding a sequence.
        n_test = min(max(1, math.ceil(test_fraction * n - 1e-9)), n - 1)
        cut = n - n_test
        out.append(RoleData(role, seqs.subset(np.arange(cut)), seqs.subset(np.arange(cut, n))))
    out.sort(key=lambda r: (-(len(r.train) + len(r.test)), r.role))
    return out
