"""Signed updates: a site signs what it uploads, the coordinator verifies before it counts.

Every upload (a train or evaluate result, a secure-aggregation stage message) carries an
:class:`UpdateStatement` signed with the site's kit key (ECDSA P-256, SHA-256): the
federation, the round, the task id, the site, a fresh 128-bit nonce, the SHA-256 of the
stream's manifest (deterministic protobuf serialization) and the BLAKE3-256 of its data
bytes (the stream's own digest frame, :mod:`confide.wire`). The
statement is serialized canonically (:meth:`UpdateStatement.canonical`: the domain
``confide/update/v2`` and each field length-prefixed, in a fixed order), so a signature
made for one federation, round, task, site or content verifies for no other, and the
nonce lets the coordinator refuse a second copy of the same upload.

How a statement travels (:meth:`UpdateSigner.record`, :meth:`UpdateStatement.from_record`):
federation, round, site and nonce go in the manifest's config record under the reserved
``confide.*`` keys, the task id is the manifest's own, the two digests are what the
receiver computes from the frames it read, and the signature follows the data digest as
the stream's last frame (``Chunk.signature``). Nothing here knows gRPC or protobuf.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from confide.errors import ConfideError
from confide.privacy.crypto.errors import PKIError
from confide.privacy.crypto.pki import Kit, _parse_cert

__all__ = [
    "DOMAIN",
    "NONCE_BYTES",
    "RECORD_KEYS",
    "SignatureInvalid",
    "StatementInvalid",
    "UpdateSigner",
    "UpdateStatement",
    "new_nonce",
    "sign_update",
    "verify_update",
]

DOMAIN = b"confide/update/v2"  # v2: the data digest is BLAKE3-256 (protocol 4)
NONCE_BYTES = 16
DIGEST_BYTES = 32
MAX_FIELD_BYTES = 1024  # names are DNS labels and task ids are short: anything longer is junk
MAX_ROUND = 2**63 - 1

# The reserved keys of an upload's manifest config record.
FEDERATION_KEY = "confide.federation"
ROUND_KEY = "confide.round"
SITE_KEY = "confide.site"
NONCE_KEY = "confide.nonce"
RECORD_KEYS = (FEDERATION_KEY, ROUND_KEY, SITE_KEY, NONCE_KEY)

RecordValue = str | int | bytes


class SignatureInvalid(ConfideError, ValueError):
    """A signature does not verify for the statement and the certificate given."""


class StatementInvalid(ConfideError, ValueError):
    """An update statement is missing or malformed (a field of the wrong type or size)."""


def new_nonce() -> bytes:
    """A fresh 128-bit nonce from the operating system's CSPRNG."""
    return secrets.token_bytes(NONCE_BYTES)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise StatementInvalid(f"the statement's {what} must be a string, not {value!r}")
    if len(value.encode("utf-8")) > MAX_FIELD_BYTES:
        raise StatementInvalid(f"the statement's {what} is longer than {MAX_FIELD_BYTES} bytes")
    return value


def _blob(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise StatementInvalid(f"the statement's {what} must be {size} bytes")
    return value


@dataclass(frozen=True)
class UpdateStatement:
    """What a site vouches for with one upload; checked field by field on construction."""

    federation: str
    round: int
    task_id: str
    site: str
    nonce: bytes
    manifest_sha256: bytes
    data_digest: bytes

    def __post_init__(self) -> None:
        _text(self.federation, "federation")
        _text(self.task_id, "task id")
        _text(self.site, "site")
        if isinstance(self.round, bool) or not isinstance(self.round, int):
            raise StatementInvalid(f"the statement's round must be an integer, not {self.round!r}")
        if not 0 <= self.round <= MAX_ROUND:
            raise StatementInvalid(f"the statement's round {self.round} is out of range")
        _blob(self.nonce, NONCE_BYTES, "nonce")
        _blob(self.manifest_sha256, DIGEST_BYTES, "manifest digest")
        _blob(self.data_digest, DIGEST_BYTES, "data digest")

    def canonical(self) -> bytes:
        """The signed bytes: each field as a 4-byte big-endian length and its bytes."""
        parts = (
            DOMAIN,
            self.federation.encode("utf-8"),
            self.round.to_bytes(8, "big"),
            self.task_id.encode("utf-8"),
            self.site.encode("utf-8"),
            self.nonce,
            self.manifest_sha256,
            self.data_digest,
        )
        return b"".join(len(p).to_bytes(4, "big") + p for p in parts)

    @classmethod
    def from_record(
        cls,
        record: Mapping[str, object],
        *,
        task_id: str,
        manifest_sha256: bytes,
        data_digest: bytes,
    ) -> UpdateStatement:
        """The statement an upload claims: its config record's ``confide.*`` entries, its
        task id and the digests the receiver computed; :class:`StatementInvalid` if any
        entry is missing or malformed."""
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise StatementInvalid(f"the upload carries no {', '.join(missing)}")
        rnd = record[ROUND_KEY]
        if isinstance(rnd, bool) or not isinstance(rnd, int):
            raise StatementInvalid(f"{ROUND_KEY} must be an integer")
        return cls(
            federation=_text(record[FEDERATION_KEY], FEDERATION_KEY),
            round=rnd,
            task_id=task_id,
            site=_text(record[SITE_KEY], SITE_KEY),
            nonce=_blob(record[NONCE_KEY], NONCE_BYTES, NONCE_KEY),
            manifest_sha256=manifest_sha256,
            data_digest=data_digest,
        )


# --------------------------------------------------------------------------- keys


@functools.lru_cache(maxsize=16)
def _load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise PKIError(
            f"not an unencrypted PEM private key ({e}). Fix: use the .key file of the "
            "site's startup kit"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PKIError("the key is not an ECDSA P-256 key. Fix: use a kit made by `confide pki`")
    return key


@functools.lru_cache(maxsize=16)
def _kit_key(path: Path, stamp: tuple[int, int]) -> ec.EllipticCurvePrivateKey:
    del stamp  # part of the cache key only: a replaced key file is read again
    return _load_private_key(path.read_bytes())


def _private_key(key: Kit | bytes) -> ec.EllipticCurvePrivateKey:
    if isinstance(key, Kit):
        st = os.stat(key.private_key)
        return _kit_key(Path(key.private_key), (st.st_mtime_ns, st.st_size))
    return _load_private_key(bytes(key))


@functools.lru_cache(maxsize=4096)
def _public_key(certificate: bytes) -> ec.EllipticCurvePublicKey:
    cert = _parse_cert(certificate, "the signer's certificate")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SignatureInvalid(
            "the signer's certificate holds no ECDSA P-256 key. Fix: use a kit made by "
            "`confide pki issue`"
        )
    return key


# --------------------------------------------------------------------------- intents


def sign_update(key: Kit | bytes, statement: UpdateStatement) -> bytes:
    """Sign ``statement`` with a kit's private key (or a PEM private key): a DER ECDSA
    P-256 / SHA-256 signature of :meth:`UpdateStatement.canonical`."""
    return _private_key(key).sign(statement.canonical(), ec.ECDSA(hashes.SHA256()))


def verify_update(certificate: bytes, statement: UpdateStatement, signature: bytes) -> None:
    """Check that the holder of ``certificate`` (PEM or DER) signed ``statement``.

    Raises :class:`SignatureInvalid` otherwise. Only the signature is checked: that the
    statement's fields are the ones expected (the caller's identity, the round, ...) is
    the caller's comparison to make.
    """
    if not isinstance(signature, bytes) or not signature:
        raise SignatureInvalid("the upload carries no signature. Fix: upgrade the site's confide")
    try:
        _public_key(certificate).verify(signature, statement.canonical(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid(
            f"the signature does not verify for {statement.site!r}'s certificate: signed with "
            "another key, or the upload was altered after signing"
        ) from None


@dataclass(frozen=True)
class UpdateSigner:
    """Signs one upload: its :attr:`record` goes in the manifest's config, and calling it
    with the manifest and data digests gives the signature that ends the stream.

    This is what :func:`confide.wire.frames` takes as ``signer``. Each signer holds a
    fresh nonce: make one per upload.
    """

    key: Kit | bytes = field(repr=False)
    federation: str
    round: int
    task_id: str
    site: str
    nonce: bytes = field(default_factory=new_nonce, repr=False)

    @classmethod
    def for_task(cls, kit: Kit, round: int, task_id: str) -> UpdateSigner:
        """The signer of a site's own upload for a task: its kit's federation and identity."""
        return cls(kit, federation=kit.federation, round=round, task_id=task_id, site=kit.identity)

    @property
    def record(self) -> dict[str, RecordValue]:
        return {
            FEDERATION_KEY: self.federation,
            ROUND_KEY: self.round,
            SITE_KEY: self.site,
            NONCE_KEY: self.nonce,
        }

    def statement(self, manifest_sha256: bytes, data_digest: bytes) -> UpdateStatement:
        return UpdateStatement(
            self.federation,
            self.round,
            self.task_id,
            self.site,
            self.nonce,
            manifest_sha256,
            data_digest,
        )

    def __call__(self, manifest_sha256: bytes, data_digest: bytes) -> bytes:
        return sign_update(self.key, self.statement(manifest_sha256, data_digest))
