"""The audit log: append-only, hash-chained, every entry signed with Ed25519 by its writer.

A compliance officer must be able to check, without trusting the coordinator, that the
record of privacy decisions (rounds started, DP events, budgets refused, de-identification
reports) is the one that was written. This module writes that record and verifies it; the
format below is exact, so the verification can be re-implemented in any language.

Storage
-------
One SQLite file (WAL, ``synchronous=FULL``), one table ``audit_entries``; the API only
appends (there is no update or delete method, and SQLite triggers refuse ``UPDATE`` and
``DELETE`` on the table). The triggers only stop accidents: anybody who can write the file
can drop them, which is why the security rests on the chain and the signatures, not on
the file. ``PRAGMA user_version`` holds the format (:data:`FORMAT_VERSION`).

An entry
--------
======================  ===================================================================
``seq``                 1, 2, 3, ... with no gap; the position of the entry in the log
``time``                unix time in seconds (float, microsecond resolution); the integer
                        ``time_us = round(time * 1_000_000)`` is what is hashed
``actor``               who wrote it: ``"coordinator"``, ``"site:hospital-a"``, ...
``kind``                ``"round_started"``, ``"dp_event"``, ``"budget_refused"``, ...
``payload``             a JSON object; stored (and hashed) as its canonical text
                        ``payload_json = json.dumps(payload, sort_keys=True,
                        separators=(",", ":"), ensure_ascii=False, allow_nan=False)``
``prev_hash``           the ``hash`` of the entry before (lowercase hex); for ``seq`` 1 the
                        genesis value :data:`GENESIS_HASH`, 64 ``"0"`` characters
``hash``                lowercase hex SHA-256 of the entry's *hash input* (below)
``key_id``              lowercase hex SHA-256 of the signer's raw 32-byte Ed25519 public
                        key (``PublicFormat.Raw``, RFC 8032 encoding)
``signature``           lowercase hex of the 64-byte Ed25519 signature (RFC 8032, pure
                        Ed25519) over the 32 raw bytes of the SHA-256 digest (not its hex)
======================  ===================================================================

The hash input (exactly what is hashed)
---------------------------------------
The UTF-8 bytes of the compact JSON object with these eight members, keys in this (sorted)
order, no whitespace, no trailing newline::

    {"actor":A,"format":"confide-audit-1","key_id":K,"kind":N,"payload":P,
     "prev_hash":H,"seq":S,"time_us":T}

(shown on two lines here; it is one line). ``S`` and ``T`` are decimal integers; ``A``,
``K``, ``N``, ``H`` are JSON strings, and ``P`` is ``payload_json`` itself *as a JSON string*
(so ``{"round":1}`` appears as ``"{\\"round\\":1}"``): the hash covers the exact payload
text, and a verifier never has to re-serialise floats. Strings are escaped as Python's
``json.dumps(..., ensure_ascii=False)`` does: ``"`` -> ``\\"``, ``\\`` -> ``\\\\``,
``\\n \\r \\t \\b \\f`` as those escapes, other characters below U+0020 as ``\\u00xx``
(lowercase hex), everything else as itself in UTF-8. :func:`hash_input` builds these bytes;
:func:`entry_hash` hashes them. The signature is ``Ed25519.sign(bytes.fromhex(hash))``:
the signer's identity (``key_id``) is inside the hash, so it cannot be swapped afterwards.

What verification checks, and what each check detects
-----------------------------------------------------
Entries are checked in stored order (by ``seq`` in SQLite; list order in an export);
every problem names the ``seq`` and the check (:class:`Problem`):

* ``seq``: the n-th entry must carry ``seq`` n. Detects a deleted entry in the middle, an
  inserted one, and a reordering.
* ``prev_hash``: each entry's ``prev_hash`` must equal the ``hash`` of the entry before.
  Detects the same, even where an attacker renumbered ``seq``.
* ``hash``: the hash recomputed from the fields must equal the stored ``hash``. Detects an
  edited field (payload, actor, kind, time, seq, key_id, prev_hash).
* ``signer``: ``key_id`` must be in the verifier's trust store (key_id -> public key);
  optionally (``actors=``) the key must be allowed to write as the entry's ``actor``, so a
  site cannot write as the coordinator.
* ``signature``: the signature must verify over the *recomputed* hash with the trusted key.
  Detects an edit where the attacker also recomputed that hash and every later hash and
  ``prev_hash`` (the chain is then consistent, but the attacker cannot sign), and forged
  entries.
* ``format``: a missing field or a value of the wrong type is reported, never a crash.
* ``head`` (with ``expected_head=``): a hash published earlier (:meth:`AuditLog.head`) must
  be the ``hash`` of some entry of the log.

Limits
------
* Truncation of the tail is invisible to the chain alone: dropping the last k entries
  leaves a valid, shorter chain. It is detected only against a head hash published (or
  handed to the auditor) before the truncation: ``verify(..., expected_head=h)``. Sites
  should publish :meth:`AuditLog.head` regularly (e.g. in their ledger or by e-mail to the
  auditor); a head hash commits to every entry up to it.
* Whoever holds a trusted signing key can append entries that verify; and can rewrite a
  suffix of the log made only of its own entries if it also truncates (see the point above).
  Protect the key files (0600; they are refused otherwise) and publish heads.
* ``time`` is the writer's clock; it is authenticated (signed) but not checked for
  monotonicity or accuracy. Sub-microsecond digits are not part of the hash.
* A problem is reported at the first entry where a check fails; entries after a break may
  be reported too (e.g. after a deletion the next entry's ``seq`` and ``prev_hash`` fail).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from confide.db import DurableDB, connect
from confide.errors import ConfideError
from confide.privacy.crypto._files import exposed_key_problem, write_atomic

FORMAT = "confide-audit-1"
FORMAT_VERSION = 1
GENESIS_HASH = "0" * 64
TABLE = "audit_entries"

Check = Literal["seq", "prev_hash", "hash", "signer", "signature", "format", "head"]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    seq INTEGER PRIMARY KEY,
    time_us INTEGER NOT NULL,
    actor TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS {TABLE}_no_update BEFORE UPDATE ON {TABLE}
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS {TABLE}_no_delete BEFORE DELETE ON {TABLE}
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
_COLUMNS = "seq, time_us, actor, kind, payload, prev_hash, hash, key_id, signature"
_HEX = frozenset("0123456789abcdef")


# --------------------------------------------------------------------------- errors


class AuditError(ConfideError):
    """The audit log or one of its keys is unusable; the message says what to do."""


class AuditInputError(AuditError, ValueError):
    """An entry to append, or a JSON export to read, is invalid (empty actor, payload not a
    JSON object, NaN, a file that is not an export, ...)."""


class AuditKeyError(AuditError):
    """An audit signing key file is missing, unreadable, not Ed25519, or already exists."""


class AuditKeyPermissionsError(AuditKeyError, PermissionError):
    """An audit private key file is readable by other users; the message gives the ``chmod``."""


class AuditChainBroken(AuditError):
    """Verification found problems; ``report`` lists every one, by ``seq``."""

    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        shown = "; ".join(str(p) for p in report.problems[:5])
        more = len(report.problems) - 5
        if more > 0:
            shown += f"; and {more} more"
        super().__init__(
            f"the audit log failed verification ({len(report.problems)} problem(s) in "
            f"{report.entries_checked} entries): {shown}. Fix: treat the log as tampered from "
            "the first seq listed; compare it with a backup or an export and with the head "
            "hashes the sites published, and investigate who had write access to the file"
        )


# --------------------------------------------------------------------------- encoding


def canonical_json(value: Any) -> str:
    """The canonical text of a JSON value: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def hash_input(
    *,
    seq: int,
    time_us: int,
    actor: str,
    kind: str,
    payload_json: str,
    prev_hash: str,
    key_id: str,
) -> bytes:
    """The exact bytes that are SHA-256 hashed for one entry (see the module docstring)."""
    doc = {
        "actor": actor,
        "format": FORMAT,
        "key_id": key_id,
        "kind": kind,
        "payload": payload_json,
        "prev_hash": prev_hash,
        "seq": seq,
        "time_us": time_us,
    }
    return canonical_json(doc).encode("utf-8")


def entry_hash(
    *,
    seq: int,
    time_us: int,
    actor: str,
    kind: str,
    payload_json: str,
    prev_hash: str,
    key_id: str,
) -> str:
    """Lowercase hex SHA-256 of :func:`hash_input`; the value chained and signed."""
    data = hash_input(
        seq=seq,
        time_us=time_us,
        actor=actor,
        kind=kind,
        payload_json=payload_json,
        prev_hash=prev_hash,
        key_id=key_id,
    )
    return hashlib.sha256(data).hexdigest()


def time_to_us(t: float) -> int:
    """The hashed form of a unix time: whole microseconds."""
    return round(t * 1_000_000)


# --------------------------------------------------------------------------- keys


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """Lowercase hex SHA-256 of the raw 32-byte public key: the ``key_id`` of its entries."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def read_export(path: Path, what: str = "--log") -> list[dict[str, Any]]:
    """The entries of a log's JSON export (``confide audit export``), unverified."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AuditInputError(
            f"{what}: {path} is not a JSON export ({e}). Fix: pass audit.db or a file "
            "written by `confide audit export`"
        ) from None
    if not isinstance(entries, list):
        raise AuditInputError(
            f"{what}: {path} is JSON but not a list of entries. Fix: pass a file written "
            "by `confide audit export`"
        )
    return entries


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its PEM (``-----BEGIN PUBLIC KEY-----``) text."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise AuditKeyError(
            f"not a PEM public key ({e}). Fix: pass the public_key_pem of an AuditKey "
            "(the file written by AuditKey.write_public_key)"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(
            f"the public key is a {type(key).__name__}, not Ed25519. Fix: audit keys are "
            "Ed25519; pass the public_key_pem of an AuditKey"
        )
    return key


def read_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (e.g. one a site published)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AuditKeyError(
            f"{path}: cannot read the public key ({e.strerror or e}). Fix: check the path"
        ) from None
    try:
        return load_public_key(data)
    except AuditKeyError as e:
        raise AuditKeyError(f"{path}: {e}") from None


class AuditKey:
    """An Ed25519 signing key of one audit-log writer, kept in a PEM (PKCS8) file, mode 0600."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._key = private_key
        self.path = path
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def generate(cls, path: Path) -> AuditKey:
        """Make a new key and write it to ``path`` (atomically, 0600); refuse to overwrite."""
        path = Path(path)
        if path.exists():
            raise AuditKeyError(
                f"{path} already exists; refusing to overwrite an audit key (entries signed "
                f"with it could no longer be attributed). Fix: load it with AuditKey.load, "
                "or choose another path"
            )
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(path, pem, private=True)
        return cls(key, path)

    @classmethod
    def load(cls, path: Path) -> AuditKey:
        """Read a key file; refuse one that group or others can read, or that is not Ed25519."""
        path = Path(path)
        if not path.is_file():
            raise AuditKeyError(
                f"{path}: no such audit key file. Fix: create one with AuditKey.generate({path!s})"
            )
        problem = exposed_key_problem(path, "audit private key")
        if problem:
            raise AuditKeyPermissionsError(problem)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise AuditKeyError(
                f"{path}: not an unencrypted PEM private key ({e}). Fix: restore the key "
                "from your backup, or generate a new one and publish its public key"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditKeyError(
                f"{path}: a {type(key).__name__}, not an Ed25519 key. Fix: audit keys are "
                "Ed25519; generate one with AuditKey.generate"
            )
        return cls(key, path)

    @classmethod
    def load_or_generate(cls, path: Path) -> AuditKey:
        """Load the key at ``path``, making it first if the file does not exist."""
        path = Path(path)
        return cls.load(path) if path.exists() else cls.generate(path)

    @property
    def public_key_pem(self) -> str:
        """The public key as PEM text (SubjectPublicKeyInfo): what a verifier needs."""
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def write_public_key(self, path: Path) -> None:
        """Write :attr:`public_key_pem` to ``path`` (atomically, 0644) for auditors."""
        write_atomic(Path(path), self.public_key_pem.encode("ascii"))

    def sign(self, digest: bytes) -> bytes:
        """Ed25519 signature over ``digest`` (the 32 raw bytes of an entry's hash)."""
        return self._key.sign(digest)

    def __repr__(self) -> str:
        return f"AuditKey(key_id={self.key_id[:16]}..., path={self.path})"


PublicKeyLike = Ed25519PublicKey | AuditKey | str | bytes


def _as_public_key(value: PublicKeyLike) -> Ed25519PublicKey:
    if isinstance(value, AuditKey):
        return value.public_key
    if isinstance(value, Ed25519PublicKey):
        return value
    return load_public_key(value)


def trust_store(*keys: PublicKeyLike) -> dict[str, Ed25519PublicKey]:
    """``{key_id: public key}`` for the keys given (AuditKeys, PEM texts or public keys)."""
    out: dict[str, Ed25519PublicKey] = {}
    for k in keys:
        pub = _as_public_key(k)
        out[key_id_of(pub)] = pub
    return out


def _normalise_trust_store(public_keys: Mapping[str, PublicKeyLike]) -> dict[str, Ed25519PublicKey]:
    out: dict[str, Ed25519PublicKey] = {}
    for key_id, value in public_keys.items():
        pub = _as_public_key(value)
        actual = key_id_of(pub)
        if actual != key_id:
            raise AuditKeyError(
                f"trust store entry {key_id[:16]}... holds a key whose id is {actual[:16]}.... "
                "Fix: key the trust store by key_id_of(public key), e.g. build it with "
                "trust_store(...)"
            )
        out[key_id] = pub
    return out


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Entry:
    """One audit-log entry as stored; :meth:`to_dict` is its export form."""

    seq: int
    time_us: int
    actor: str
    kind: str
    payload_json: str
    prev_hash: str
    hash: str
    key_id: str
    signature: str

    @property
    def time(self) -> float:
        return self.time_us / 1_000_000

    @property
    def payload(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.payload_json)
        return value

    def to_dict(self) -> dict[str, Any]:
        """The export form: every stored field, plus ``time`` and the parsed ``payload``.

        ``payload_json`` and ``time_us`` are what is hashed; ``payload`` and ``time`` are
        for reading, and :func:`verify_entries` checks that they agree with them.
        """
        return {
            "seq": self.seq,
            "time": self.time,
            "time_us": self.time_us,
            "actor": self.actor,
            "kind": self.kind,
            "payload": self.payload,
            "payload_json": self.payload_json,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "key_id": self.key_id,
            "signature": self.signature,
        }


@dataclass(frozen=True)
class Problem:
    """One failed check: the entry's ``seq`` (its position when its own seq is unusable)."""

    seq: int
    check: Check
    message: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify_entries` found; ``ok`` when there is no problem at all."""

    entries_checked: int
    head: str
    problems: list[Problem] = field(default_factory=list)
    signers: dict[str, int] = field(default_factory=dict)  # key_id -> entries it signed

    @property
    def ok(self) -> bool:
        return not self.problems

    def first_bad_seq(self) -> int | None:
        return min((p.seq for p in self.problems), default=None)

    def raise_if_broken(self) -> VerifyReport:
        if self.problems:
            raise AuditChainBroken(self)
        return self

    def summary(self) -> str:
        if self.ok:
            return (
                f"audit log OK: {self.entries_checked} entries, chain intact, every signature "
                f"valid ({len(self.signers)} signer(s)); head {self.head}"
            )
        lines = [
            f"audit log BROKEN: {len(self.problems)} problem(s) in {self.entries_checked} entries"
        ]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


# --------------------------------------------------------------------------- verification


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_hex(v: Any, length: int) -> bool:
    return isinstance(v, str) and len(v) == length and set(v) <= _HEX


def verify_entries(
    entries: Iterable[Mapping[str, Any]],
    public_keys: Mapping[str, PublicKeyLike],
    *,
    expected_head: str | None = None,
    actors: Mapping[str, Collection[str]] | None = None,
) -> VerifyReport:
    """Verify a log given as plain dicts (e.g. ``json.load`` of an export), in list order.

    ``public_keys`` maps key_id -> public key (PEM text, ``Ed25519PublicKey`` or
    :class:`AuditKey`); an entry signed by any other key is a problem. ``actors``, when
    given, maps key_id -> the actors that key may write as. ``expected_head`` is a head
    hash published earlier: it must be the hash of one of the entries (detects truncation).
    Each dict needs ``seq``, ``actor``, ``kind``, ``prev_hash``, ``hash``, ``key_id``,
    ``signature``, ``time_us`` or ``time``, and ``payload_json`` or ``payload``.
    """
    trusted = _normalise_trust_store(public_keys)
    problems: list[Problem] = []
    signers: dict[str, int] = {}
    prev = GENESIS_HASH
    hashes: set[str] = set()
    n = 0
    for n, raw in enumerate(entries, start=1):
        fields = _entry_fields(raw)
        if isinstance(fields, str):
            seq = raw.get("seq") if isinstance(raw, Mapping) else None
            problems.append(Problem(seq if isinstance(seq, int) else n, "format", fields))
            prev = str(raw.get("hash", "")) if isinstance(raw, Mapping) else ""
            continue
        e = fields

        def problem(check: Check, message: str, seq: int = e.seq) -> None:
            problems.append(Problem(seq, check, message))

        if e.seq != n:
            problem(
                "seq",
                f"is entry number {n} of the log (expected seq {n}): an entry was deleted, "
                "inserted or moved before it",
            )
        if e.prev_hash != prev:
            problem(
                "prev_hash",
                f"prev_hash {e.prev_hash[:16]}... is not the hash of the entry before it "
                f"({prev[:16]}...): the chain is broken here (entry deleted, inserted or moved)",
            )
        recomputed = entry_hash(
            seq=e.seq,
            time_us=e.time_us,
            actor=e.actor,
            kind=e.kind,
            payload_json=e.payload_json,
            prev_hash=e.prev_hash,
            key_id=e.key_id,
        )
        if recomputed != e.hash:
            problem(
                "hash",
                "the stored hash does not match the entry's fields: the entry was edited",
            )
        pub = trusted.get(e.key_id)
        if pub is None:
            problem(
                "signer",
                f"signed by key {e.key_id[:16]}..., which is not in the trust store: an "
                "unknown signer (forged entry, or a key the auditor was not given)",
            )
        else:
            allowed = actors.get(e.key_id) if actors is not None else None
            if actors is not None and (allowed is None or e.actor not in allowed):
                problem(
                    "signer",
                    f"actor {e.actor!r} is not one the key {e.key_id[:16]}... may write as",
                )
            try:
                pub.verify(bytes.fromhex(e.signature), bytes.fromhex(recomputed))
            except InvalidSignature:
                problem(
                    "signature",
                    "the signature does not verify over the entry's content: the entry was "
                    "edited or forged without the signer's key",
                )
            else:
                signers[e.key_id] = signers.get(e.key_id, 0) + 1
        if recomputed == e.hash:
            hashes.add(e.hash)
        prev = e.hash
    head = prev if n else GENESIS_HASH
    if expected_head is not None and expected_head != GENESIS_HASH and expected_head not in hashes:
        problems.append(
            Problem(
                n + 1,
                "head",
                f"the published head {expected_head[:16]}... is not the hash of any entry: "
                f"entries were removed from the end (the log now ends at seq {n}) or rewritten",
            )
        )
    return VerifyReport(entries_checked=n, head=head, problems=problems, signers=signers)


def _entry_fields(raw: Any) -> Entry | str:
    """The entry's hashed fields from a dict, or a message naming what is malformed."""
    if not isinstance(raw, Mapping):
        return f"not a JSON object but {type(raw).__name__}"
    for name in ("seq", "actor", "kind", "prev_hash", "hash", "key_id", "signature"):
        if name not in raw:
            return f"field {name!r} is missing"
    if not _is_int(raw["seq"]):
        return "seq is not an integer"
    for name in ("actor", "kind"):
        if not isinstance(raw[name], str):
            return f"{name} is not text"
    for name, length in (("prev_hash", 64), ("hash", 64), ("key_id", 64), ("signature", 128)):
        if not _is_hex(raw[name], length):
            return f"{name} is not {length} lowercase hex digits"
    time_us = raw.get("time_us")
    t = raw.get("time")
    if time_us is None:
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            return "neither time_us nor a numeric time is present"
        time_us = time_to_us(t)
    elif not _is_int(time_us):
        return "time_us is not an integer"
    elif t is not None and (
        not isinstance(t, (int, float)) or isinstance(t, bool) or time_to_us(t) != time_us
    ):
        return "time does not agree with time_us (one of them was edited)"
    payload_json = raw.get("payload_json")
    if payload_json is None:
        if "payload" not in raw:
            return "neither payload_json nor payload is present"
        try:
            payload_json = canonical_json(raw["payload"])
        except (TypeError, ValueError):
            return "payload is not serialisable as canonical JSON"
    elif not isinstance(payload_json, str):
        return "payload_json is not text"
    else:
        try:
            parsed = json.loads(payload_json)
        except ValueError:
            return "payload_json is not valid JSON"
        if "payload" in raw and raw["payload"] != parsed:
            return "payload does not agree with payload_json (one of them was edited)"
    return Entry(
        seq=raw["seq"],
        time_us=time_us,
        actor=raw["actor"],
        kind=raw["kind"],
        payload_json=payload_json,
        prev_hash=raw["prev_hash"],
        hash=raw["hash"],
        key_id=raw["key_id"],
        signature=raw["signature"],
    )


def _check_plain_json(value: Any, where: str) -> None:
    """Refuse what JSON would silently change (non-text keys) or cannot hold (NaN, objects)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has the non-text key {k!r}")
            _check_plain_json(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain_json(v, f"{where}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}, which JSON cannot hold")
    elif not (value is None or isinstance(value, (str, int, bool))):
        raise TypeError(f"{where} is a {type(value).__name__}")


# --------------------------------------------------------------------------- the log


class AuditLog(DurableDB):
    """An append-only, hash-chained, signed audit log in one SQLite file.

    Thread-safe (one lock) and safe across processes (``BEGIN IMMEDIATE``): the previous
    hash is read and the entry written in the same write transaction, so two writers can
    never fork the chain. Each append is durable when it returns (WAL, ``synchronous=FULL``).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = connect(self.path)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, FORMAT_VERSION):
                self._db.close()
                raise AuditError(
                    f"{self.path}: audit log format {version}, this Confide reads format "
                    f"{FORMAT_VERSION}. Fix: upgrade Confide, or pass another file"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        except (sqlite3.Error, OSError) as e:
            raise AuditError(
                f"{self.path}: cannot open the audit log ({e}). Fix: pass a writable path to "
                "an audit log file (or a new one)"
            ) from e
        self._lock = threading.RLock()

    # --- lifecycle ------------------------------------------------------------------------

    # --- writing --------------------------------------------------------------------------

    def append(self, actor: str, kind: str, payload: Mapping[str, Any], key: AuditKey) -> Entry:
        """Sign and append one entry; return it once it is on disk."""
        if not isinstance(actor, str) or not actor.strip():
            raise AuditInputError(
                f"actor {actor!r} is empty or not text. Fix: name the writer, e.g. "
                "'coordinator' or 'site:hospital-a'"
            )
        if not isinstance(kind, str) or not kind.strip():
            raise AuditInputError(
                f"kind {kind!r} is empty or not text. Fix: name the event, e.g. 'dp_event'"
            )
        if not isinstance(payload, Mapping):
            raise AuditInputError(
                f"payload is a {type(payload).__name__}, not a JSON object. Fix: pass a dict"
            )
        try:
            _check_plain_json(payload, "payload")
            payload_json = canonical_json(dict(payload))
            # ensure_ascii=False keeps lone surrogates, which UTF-8 cannot encode
            (actor + kind + payload_json).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise AuditInputError(
                f"the {kind!r} payload is not plain JSON ({e}). Fix: pass only dicts with "
                "text keys, lists, text, finite numbers, booleans and None"
            ) from None
        if not isinstance(key, AuditKey):
            raise AuditInputError(
                f"key is a {type(key).__name__}, not an AuditKey. Fix: AuditKey.load(path)"
            )
        time_us = time.time_ns() // 1000
        with self._tx() as db:
            row = db.execute(f"SELECT seq, hash FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev_hash = (row[0] + 1, row[1]) if row else (1, GENESIS_HASH)
            digest = entry_hash(
                seq=seq,
                time_us=time_us,
                actor=actor,
                kind=kind,
                payload_json=payload_json,
                prev_hash=prev_hash,
                key_id=key.key_id,
            )
            entry = Entry(
                seq=seq,
                time_us=time_us,
                actor=actor,
                kind=kind,
                payload_json=payload_json,
                prev_hash=prev_hash,
                hash=digest,
                key_id=key.key_id,
                signature=key.sign(bytes.fromhex(digest)).hex(),
            )
            db.execute(
                f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.seq,
                    entry.time_us,
                    entry.actor,
                    entry.kind,
                    entry.payload_json,
                    entry.prev_hash,
                    entry.hash,
                    entry.key_id,
                    entry.signature,
                ),
            )
        return entry

    # --- reading --------------------------------------------------------------------------

    def _rows(self) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(f"SELECT {_COLUMNS} FROM {TABLE} ORDER BY seq").fetchall()

    def _raw(self) -> list[dict[str, Any]]:
        names = [c.strip() for c in _COLUMNS.split(",")]
        out = []
        for row in self._rows():
            d = dict(zip(names, row, strict=True))
            d["payload_json"] = d.pop("payload")
            out.append(d)
        return out

    def entries(self) -> list[Entry]:
        """Every entry, by seq (as stored: call :meth:`verify` to know they are genuine)."""
        return [Entry(*row) for row in self._rows()]

    def export(self) -> list[dict[str, Any]]:
        """Every entry as a JSON-ready dict (:meth:`Entry.to_dict`), for :func:`verify_entries`."""
        return [e.to_dict() for e in self.entries()]

    def head(self) -> str:
        """The hash of the last entry (:data:`GENESIS_HASH` when empty): publish it to anchor."""
        with self._lock:
            row = self._db.execute(f"SELECT hash FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
        return str(row[0]) if row else GENESIS_HASH

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])

    # --- verification ---------------------------------------------------------------------

    def verify(
        self,
        public_keys: Mapping[str, PublicKeyLike],
        *,
        expected_head: str | None = None,
        actors: Mapping[str, Collection[str]] | None = None,
    ) -> VerifyReport:
        """Check every entry (see the module docstring); never raises for a broken log."""
        return verify_entries(self._raw(), public_keys, expected_head=expected_head, actors=actors)

    def verify_or_raise(
        self,
        public_keys: Mapping[str, PublicKeyLike],
        *,
        expected_head: str | None = None,
        actors: Mapping[str, Collection[str]] | None = None,
    ) -> VerifyReport:
        """:meth:`verify`, raising :class:`AuditChainBroken` if anything is wrong."""
        return self.verify(
            public_keys, expected_head=expected_head, actors=actors
        ).raise_if_broken()


__all__ = [
    "FORMAT",
    "GENESIS_HASH",
    "AuditChainBroken",
    "AuditError",
    "AuditInputError",
    "AuditKey",
    "AuditKeyError",
    "AuditKeyPermissionsError",
    "AuditLog",
    "Entry",
    "Problem",
    "VerifyReport",
    "canonical_json",
    "entry_hash",
    "hash_input",
    "key_id_of",
    "load_public_key",
    "read_public_key",
    "trust_store",
    "verify_entries",
]
