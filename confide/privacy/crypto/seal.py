"""Sealing data at rest: checkpoints and model files as AES-256-GCM blobs, verified on load.

One intent per call: :func:`seal` turns bytes into a self-describing sealed blob and
:func:`unseal` gives them back only when every byte is authentic, the key is the one
the blob was sealed with, and the ``purpose`` is the one it was sealed for. Callers
hold a :class:`SealKey` (from a 0600 key file, or a passphrase stretched by scrypt)
and never see the key, the nonce or the mode.

Blob layout, version 1 (every header byte is authenticated as associated data)::

    magic      8   b"CONFSEAL"
    version    1   1
    kdf        1   1 = key file (32 random bytes), 2 = scrypt(passphrase)
    key id     8   HMAC-SHA256(key, "confide-seal/key-id")[:8]: names the key, reveals nothing
    scrypt         (kdf 2 only) salt length (1), salt (16), log2 n (1), r (4), p (4), big-endian
    nonce     12   random, fresh for every seal
    ciphertext     AES-256-GCM of the data, 16-byte tag at the end

The associated data is the header followed by the length-prefixed ``purpose``, so a
checkpoint of round 3 cannot be passed off as round 5's, nor a model export as a
checkpoint. Sealing is one call over bytes held in memory (a checkpoint is at most the
model's size); AES-GCM in one call is limited to 2 GiB, beyond which :func:`seal`
refuses with :class:`SealError` (a later format version can segment).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import unicodedata
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from confide.errors import ConfideError
from confide.privacy.crypto._files import exposed_key_problem, make_private_dir, write_atomic

MAGIC = b"CONFSEAL"
VERSION = 1
KDF_KEY_FILE = 1
KDF_SCRYPT = 2
KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
SALT_BYTES = 16
# scrypt as recommended for file encryption (n = 2**15 is ~32 MiB and ~0.1 s); stated in
# every header, so a later release can raise them and still read older blobs.
SCRYPT_LOG2_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
# What a header may ask for: bounded, so an edited header cannot make unseal eat 100 GiB.
_MAX_SCRYPT_MEMORY = 1 << 30
_MAX_LOG2_N = 20
_MAX_R = 32
_MAX_P = 16
MIN_PASSPHRASE_CHARS = 12
MAX_SEAL_BYTES = 2**31 - 1 - TAG_BYTES  # one AES-GCM call
_FIXED = struct.Struct(f">{len(MAGIC)}sBB{KEY_ID_BYTES}s")
_SCRYPT = struct.Struct(">B16sBII")
_KEY_FIX = "create one with `confide coordinator seal-key --out PATH` (32 random bytes, mode 0600)"


class SealError(ConfideError):
    """Sealed data cannot be opened (tampered, truncated, other key or purpose) or a seal key
    is unusable; the message names the file and the fix. No partial data is ever returned."""


class SealKey:
    """A 256-bit sealing key: read from a key file, or derived from a passphrase by scrypt.

    Its ``repr`` names where it came from and its key id, never the key or the passphrase.
    """

    __slots__ = ("_derived", "_kdf", "_key", "_params", "_passphrase", "_salt", "source")
    _derived: dict[tuple[bytes, int, int, int], bytes]
    _kdf: int
    _key: bytes
    _params: tuple[int, int, int]
    _passphrase: bytes | None
    _salt: bytes
    source: str

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("use SealKey.from_file, SealKey.from_passphrase or SealKey.from_env")

    @classmethod
    def _make(
        cls,
        key: bytes,
        kdf: int,
        source: str,
        *,
        passphrase: bytes | None = None,
        salt: bytes = b"",
        params: tuple[int, int, int] = (0, 0, 0),
    ) -> SealKey:
        self = object.__new__(cls)
        self._key = key
        self._kdf = kdf
        self.source = source
        self._passphrase = passphrase
        self._salt = salt
        self._params = params
        self._derived = {}
        if passphrase is not None:
            self._derived[(salt, *params)] = key
        return self

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> SealKey:
        """The key in ``path``: exactly 32 random bytes, readable by its owner only."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise SealError(f"seal key file {p} does not exist. Fix: {_KEY_FIX}")
        problem = exposed_key_problem(p, "seal key")
        if problem is not None:
            raise SealError(problem)
        try:
            key = p.read_bytes()
        except OSError as e:
            raise SealError(f"cannot read the seal key file {p} ({e}). Fix: {_KEY_FIX}") from None
        if len(key) != KEY_BYTES:
            raise SealError(
                f"seal key file {p} holds {len(key)} bytes, not {KEY_BYTES}. Fix: {_KEY_FIX}"
            )
        return cls._make(key, KDF_KEY_FILE, f"key file {p}")

    @classmethod
    def from_passphrase(
        cls,
        passphrase: str | bytes,
        salt: bytes | None = None,
        *,
        log2_n: int = SCRYPT_LOG2_N,
        r: int = SCRYPT_R,
        p: int = SCRYPT_P,
        source: str = "the passphrase",
    ) -> SealKey:
        """A key stretched from ``passphrase`` with scrypt (n = 2**log2_n, r, p).

        ``salt`` (16 bytes) defaults to a fresh random one; it is written into every blob
        this key seals, and a blob sealed under another salt is opened by deriving again.
        """
        pw = _passphrase_bytes(passphrase, source)
        salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
        if len(salt) != SALT_BYTES:
            raise SealError(f"a seal salt is {SALT_BYTES} bytes, got {len(salt)}")
        params = (log2_n, r, p)
        problem = _scrypt_problem(*params)
        if problem is not None:
            raise SealError(f"scrypt parameters for {source}: {problem}")
        key = _scrypt(pw, salt, *params)
        return cls._make(key, KDF_SCRYPT, source, passphrase=pw, salt=salt, params=params)

    @classmethod
    def from_env(cls, variable: str) -> SealKey:
        """A passphrase key from the environment variable ``variable`` (never from a file)."""
        value = os.environ.get(variable)
        if not value:
            raise SealError(
                f"server.seal_passphrase_env names ${variable}, but it is not set. Fix: export "
                f"{variable} with the federation's seal passphrase before starting Confide"
            )
        return cls.from_passphrase(value, source=f"the passphrase in ${variable}")

    # --- facts --------------------------------------------------------------------------

    @property
    def key_id(self) -> str:
        """16 hex characters that name this key (the same for every blob it seals)."""
        return _key_id(self._key).hex()

    @property
    def kdf(self) -> str:
        return "scrypt" if self._kdf == KDF_SCRYPT else "key-file"

    def __repr__(self) -> str:
        return f"SealKey({self.kdf}, id {self.key_id}, from {self.source})"

    def _key_for(self, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
        if self._passphrase is None:
            return self._key
        cached = self._derived.get((salt, log2_n, r, p))
        if cached is None:
            cached = _scrypt(self._passphrase, salt, log2_n, r, p)
            self._derived[(salt, log2_n, r, p)] = cached
        return cached


def create_key_file(path: str | Path) -> SealKey:
    """Write 32 fresh random bytes to ``path`` (mode 0600 from the first byte); never overwrite.

    The folder is created 0700 when missing. Overwriting a seal key would make everything
    sealed with it unreadable, so an existing file is refused.
    """
    p = Path(path).expanduser()
    if p.exists():
        raise SealError(
            f"{p} exists already; replacing a seal key makes everything sealed with it "
            "unreadable. Fix: choose another --out, or delete the old key only when nothing "
            "sealed with it is still needed"
        )
    if not p.parent.exists():
        make_private_dir(p.parent)
    write_atomic(p, secrets.token_bytes(KEY_BYTES), private=True)
    return SealKey.from_file(p)


# --- sealing --------------------------------------------------------------------------------


def is_sealed(blob: bytes) -> bool:
    """Whether ``blob`` starts like a sealed blob (says nothing about its authenticity)."""
    return blob[: len(MAGIC)] == MAGIC


def seal(data: bytes, key: SealKey, *, purpose: str) -> bytes:
    """``data`` encrypted and authenticated for ``purpose`` under ``key``, with its header."""
    _check_purpose(purpose)
    if len(data) > MAX_SEAL_BYTES:
        raise SealError(
            f"{len(data)} bytes are too many to seal in one piece (at most {MAX_SEAL_BYTES}). "
            "Fix: keep sealing off for models above 2 GiB (this format version seals in one "
            "AES-GCM call)"
        )
    header = _FIXED.pack(MAGIC, VERSION, key._kdf, _key_id(key._key))
    if key._kdf == KDF_SCRYPT:
        header += _SCRYPT.pack(SALT_BYTES, key._salt, *key._params)
    nonce = secrets.token_bytes(NONCE_BYTES)
    header += nonce
    return header + AESGCM(key._key).encrypt(nonce, bytes(data), _aad(header, purpose))


def unseal(blob: bytes, key: SealKey, *, purpose: str, where: str | Path | None = None) -> bytes:
    """The data sealed in ``blob``, after checking every byte; :class:`SealError` otherwise.

    ``where`` (a path, or words such as "the checkpoint of round 3") names the blob in
    the error message. A refused blob yields nothing: no partial plaintext exists.
    """
    _check_purpose(purpose)
    what = f"file {where}" if isinstance(where, Path) else (where or "the sealed data")
    if not is_sealed(blob):
        raise SealError(
            f"{what} is not sealed by Confide (it does not start with the seal header). Fix: "
            "restore the sealed copy from backup"
        )
    if len(blob) < _FIXED.size:
        raise _truncated(what, len(blob))
    _, version, kdf, key_id = _FIXED.unpack_from(blob)
    if version != VERSION:
        raise SealError(
            f"{what} uses seal format version {version}; this Confide reads version {VERSION} "
            "(or the header is damaged). Fix: open it with the Confide release that wrote it, "
            "or restore it from backup"
        )
    offset = _FIXED.size
    salt, params = b"", (0, 0, 0)
    if kdf == KDF_SCRYPT:
        if len(blob) < offset + _SCRYPT.size:
            raise _truncated(what, len(blob))
        salt_len, salt, log2_n, r, p = _SCRYPT.unpack_from(blob, offset)
        problem = _scrypt_problem(log2_n, r, p)
        if salt_len != SALT_BYTES or problem is not None:
            raise SealError(
                f"{what} has a damaged header ({problem or 'salt length'}): corrupted or "
                "tampered. Fix: restore it from backup"
            )
        params = (log2_n, r, p)
        offset += _SCRYPT.size
    elif kdf != KDF_KEY_FILE:
        raise SealError(
            f"{what} names an unknown key kind ({kdf}): corrupted or tampered. Fix: restore it "
            "from backup"
        )
    if kdf != key._kdf:
        sealed_with = "a passphrase" if kdf == KDF_SCRYPT else "a key file"
        raise SealError(
            f"{what} was sealed with {sealed_with}, but the key given is {key.source}. Fix: "
            "configure the key it was sealed with (server.seal_key_file or "
            "server.seal_passphrase_env)"
        )
    if len(blob) < offset + NONCE_BYTES + TAG_BYTES:
        raise _truncated(what, len(blob))
    header = blob[: offset + NONCE_BYTES]
    raw = key._key_for(salt, *params)
    if not hmac.compare_digest(_key_id(raw), key_id):
        which = "passphrase" if kdf == KDF_SCRYPT else "key"
        raise SealError(
            f"{what} was sealed with another {which} (key id {key_id.hex()}; {key.source} "
            f"gives {_key_id(raw).hex()}), or its header was changed. Fix: configure the "
            f"{which} it was sealed with, or restore the file from backup"
        )
    try:
        return AESGCM(raw).decrypt(
            header[-NONCE_BYTES:], blob[len(header) :], _aad(header, purpose)
        )
    except InvalidTag:
        raise SealError(
            f"{what} failed authentication: it was changed after sealing (a flipped byte, a "
            f"cut copy) or sealed for another purpose than {purpose!r}; none of it is used. "
            "Fix: restore it from backup"
        ) from None


# --- helpers --------------------------------------------------------------------------------


def _aad(header: bytes, purpose: str) -> bytes:
    p = purpose.encode()
    return header + struct.pack(">I", len(p)) + p


def _check_purpose(purpose: str) -> None:
    if not isinstance(purpose, str) or not purpose:
        raise SealError("a seal purpose is a non-empty string, e.g. 'confide checkpoint'")


def _key_id(key: bytes) -> bytes:
    return hmac.new(key, b"confide-seal/key-id", hashlib.sha256).digest()[:KEY_ID_BYTES]


def _truncated(what: str, size: int) -> SealError:
    return SealError(
        f"{what} is truncated ({size} bytes, shorter than its header and tag). Fix: restore "
        "it from backup (a full disk or an interrupted copy cuts files short)"
    )


def _passphrase_bytes(passphrase: str | bytes, source: str) -> bytes:
    text = passphrase if isinstance(passphrase, str) else passphrase.decode("utf-8", "replace")
    # NFC: the same passphrase typed on two keyboards gives the same key.
    text = unicodedata.normalize("NFC", text)
    if len(text) < MIN_PASSPHRASE_CHARS:
        raise SealError(
            f"{source} has {len(text)} characters, fewer than {MIN_PASSPHRASE_CHARS}. Fix: use "
            "a longer passphrase (several random words), or a key file (server.seal_key_file)"
        )
    return text.encode()


def _scrypt_problem(log2_n: int, r: int, p: int) -> str | None:
    if not 10 <= log2_n <= _MAX_LOG2_N or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
        return f"n = 2**{log2_n}, r = {r}, p = {p} are out of range"
    if 128 * r * (1 << log2_n) > _MAX_SCRYPT_MEMORY:
        return f"n = 2**{log2_n}, r = {r} need more than 1 GiB"
    return None


def _scrypt(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=KEY_BYTES, n=1 << log2_n, r=r, p=p).derive(passphrase)
