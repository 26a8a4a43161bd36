"""Arrays and Flower records <-> the chunk streams of the wire contract (confide.v1.Chunk).

A stream is a ``Manifest`` (array names, dtypes, shapes; metric and config records),
then the arrays' raw little-endian bytes cut into chunks of a configurable size, then
the SHA-256 of those bytes; an upload then ends with the site's signature of its update
statement (:class:`Signer`, :mod:`confide.privacy.crypto.signing`). The decoder trusts
nothing: it checks the order of parts, the dtypes against an allow-list, every size
against the manifest and a ceiling, and the digest, and raises :class:`WireError` naming
what was wrong, so a malformed upload is rejected and the round carries on.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from confide.errors import ConfideError
from confide.protos.v1 import coordinator_pb2 as pb

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
# The metric Flower's strategies (and ours) weight results by.
NUM_EXAMPLES = "num-examples"
# Dtypes a model or an update may use; object and string arrays never cross the wire.
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "<u4", "<i4", "<i8", "|u1", "|i1", "|b1"})
# Dimensions an array may have (NumPy's own ceiling is 32 in 1.x, 64 in 2.x).
MAX_NDIM = 32

ScalarValue = int | float | bool | str | bytes
# A signature frame is a DER ECDSA signature (about 72 bytes); anything far longer is junk.
MAX_SIGNATURE_BYTES = 512


class WireError(ConfideError, ValueError):
    """A stream does not follow the wire contract; the message says what and how to fix it."""


@dataclass
class Payload:
    """What a stream carries: named arrays plus Flower-style metric and config records."""

    task_id: str
    names: list[str]
    arrays: list[npt.NDArray[Any]]
    metrics: dict[str, ScalarValue] = field(default_factory=dict)
    config: dict[str, ScalarValue] = field(default_factory=dict)
    # Set by decode(): SHA-256 of the manifest (deterministic serialization, see
    # manifest_digest) and of the data bytes, and the signature (empty if none came).
    manifest_sha256: bytes = b""
    data_sha256: bytes = b""
    signature: bytes = b""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def to_scalar(value: ScalarValue) -> pb.Scalar:
    # bool before int: bool is an int subclass and must keep its type.
    if isinstance(value, bool):
        return pb.Scalar(bool_value=value)
    if isinstance(value, int):
        return pb.Scalar(int_value=value)
    if isinstance(value, float):
        return pb.Scalar(double_value=value)
    if isinstance(value, str):
        return pb.Scalar(string_value=value)
    if isinstance(value, bytes):
        return pb.Scalar(bytes_value=value)
    raise WireError(
        f"cannot send a value of type {type(value).__name__}; use int, float, bool, str or bytes"
    )


def from_scalar(s: pb.Scalar) -> ScalarValue:
    kind = s.WhichOneof("value")
    if kind is None:
        raise WireError("empty Scalar in a record; every value must be set")
    value: ScalarValue = getattr(s, kind)
    return value


def encode_records(values: Mapping[str, ScalarValue]) -> dict[str, pb.Scalar]:
    return {k: to_scalar(v) for k, v in values.items()}


def decode_records(values: Mapping[str, pb.Scalar]) -> dict[str, ScalarValue]:
    return {k: from_scalar(v) for k, v in values.items()}


def _dtype_str(a: npt.NDArray[Any]) -> str:
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    return dt.str


# A serialized ``Chunk`` whose part is ``data`` starts with this tag (field 2, length-delimited).
_DATA_TAG = 0x12


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; (-1, pos) if it is malformed."""
    value = shift = 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


# Streams at least this large hash their data in a helper thread (hashlib releases the
# GIL), so the digest overlaps sending and receiving instead of following them.
BACKGROUND_HASH_BYTES = 1 << 20


class _Sha256:
    """SHA-256 of a stream's data, computed inline or by a helper thread, in order."""

    def __init__(self, background: bool) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue[memoryview | bytes | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="confide-sha256", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._queue is not None
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def update(self, data: memoryview | bytes) -> None:
        """Add ``data``, which the caller must not modify until :meth:`digest` returns."""
        if self._queue is None:
            self._hash.update(data)
        else:
            self._queue.put(data)

    def close(self) -> None:
        """Stop the helper thread (idempotent); called on every exit path of a stream."""
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def digest(self) -> bytes:
        self.close()
        return self._hash.digest()


def manifest_digest(manifest: pb.Manifest) -> bytes:
    """SHA-256 of a manifest in protobuf's deterministic serialization (fields in number
    order, map entries sorted by key): what an upload's signature covers. Not the bytes as
    sent: a peer on generated stubs may re-serialize a parsed message with its maps in
    another order, which must not break the signature."""
    return hashlib.sha256(manifest.SerializeToString(deterministic=True)).digest()


class Signer(Protocol):
    """Signs an upload (:class:`confide.privacy.crypto.UpdateSigner` is one)."""

    @property
    def record(self) -> Mapping[str, ScalarValue]:
        """Entries added to the manifest's config record (the claimed statement)."""
        ...

    def __call__(self, manifest_sha256: bytes, data_sha256: bytes) -> bytes:
        """The signature that ends the stream, over the manifest's and data's digests."""
        ...


def frames(
    payload: Payload, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, signer: Signer | None = None
) -> Iterator[bytes]:
    """Yield the serialized ``confide.v1.Chunk`` messages of ``payload``.

    This is what goes on the wire, built without protobuf objects: a data frame is the
    field tag, the length and a slice of the array's buffer, so each byte is copied once
    (into the frame). Large streams are hashed by a helper thread while gRPC sends them,
    which takes the digest off the critical path. :func:`encode` gives the same stream
    as ``Chunk`` messages. With a ``signer`` (every upload of a site), its record joins
    the manifest's config and its signature follows the digest as the last frame: one
    ECDSA signature after the data, so signing adds no pass over the bytes.
    """
    if chunk_bytes <= 0:
        raise WireError(f"chunk size must be positive (got {chunk_bytes})")
    if len(payload.names) != len(payload.arrays):
        raise WireError(f"{len(payload.names)} names for {len(payload.arrays)} arrays")
    arrays = [
        # np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes them shape (1,))
        np.require(a.astype(a.dtype.newbyteorder("<"), copy=False), requirements="C")
        for a in payload.arrays
    ]
    headers = []
    for name, a in zip(payload.names, arrays, strict=True):
        dtype = _dtype_str(a)
        if dtype not in ALLOWED_DTYPES:
            raise WireError(f"array {name!r} has dtype {dtype}, which the wire does not carry")
        headers.append(pb.ArrayHeader(name=name, dtype=dtype, shape=list(a.shape), nbytes=a.nbytes))
    manifest = pb.Manifest(
        task_id=payload.task_id,
        arrays=headers,
        metrics=encode_records(payload.metrics),
        config=encode_records(
            payload.config if signer is None else {**payload.config, **signer.record}
        ),
        total_bytes=sum(a.nbytes for a in arrays),
    )
    head_digest = manifest_digest(manifest) if signer is not None else b""
    yield pb.Chunk(manifest=manifest).SerializeToString()
    digest = _Sha256(background=manifest.total_bytes >= BACKGROUND_HASH_BYTES)

    def framed(data: memoryview | bytearray) -> bytes:
        out = b"".join((bytes((_DATA_TAG,)), _varint(len(data)), data))
        # Hash the frame's own copy: the caller's arrays may change once they are framed.
        digest.update(memoryview(out)[len(out) - len(data) :])
        return out

    try:
        pending = bytearray()
        for a in arrays:
            view = memoryview(a.reshape(-1).view(np.uint8).data)
            offset = 0
            while offset < len(view):
                if not pending and len(view) - offset >= chunk_bytes:
                    yield framed(view[offset : offset + chunk_bytes])
                    offset += chunk_bytes
                    continue
                piece = view[offset : offset + chunk_bytes - len(pending)]
                pending += piece
                offset += len(piece)
                if len(pending) == chunk_bytes:
                    yield framed(pending)
                    pending.clear()
        if pending:
            yield framed(pending)
        data_digest = digest.digest()
        yield pb.Chunk(sha256=data_digest).SerializeToString()
        if signer is not None:
            yield pb.Chunk(signature=signer(head_digest, data_digest)).SerializeToString()
    finally:
        digest.close()  # also when the stream is abandoned half-way


def encode(
    payload: Payload, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, signer: Signer | None = None
) -> Iterator[pb.Chunk]:
    """:func:`frames` as ``Chunk`` messages: manifest, data chunks, digest (, signature)."""
    for f in frames(payload, chunk_bytes, signer=signer):
        yield pb.Chunk.FromString(f)


@dataclass
class StreamStats:
    """Bytes of a stream as serialized on the wire, counted while decoding it."""

    wire_bytes: int = 0


def _data_part_size(n: int) -> int:
    # Serialized size of a Chunk whose `data` holds n bytes: tag, length varint, bytes.
    return 1 + max(1, (n.bit_length() + 6) // 7) + n


def _parse(item: pb.Chunk | bytes) -> tuple[pb.Chunk | None, memoryview | bytes, int]:
    """(message, data, serialized size) of one stream item.

    Raw frames (``bytes``, as the coordinator and the agent receive them) whose part is
    ``data`` are read in place, without a protobuf copy; any other frame is parsed as a
    ``Chunk`` (``message`` is then set and ``data`` empty).
    """
    if isinstance(item, pb.Chunk):
        if item.WhichOneof("part") == "data":
            data = item.data  # one read: upb copies the bytes on every access
            return None, data, _data_part_size(len(data))
        return item, b"", item.ByteSize()
    if not isinstance(item, bytes | bytearray | memoryview):
        raise WireError(f"a stream carries Chunk messages, not {type(item).__name__}")
    raw = memoryview(item)
    if len(raw) and raw[0] == _DATA_TAG:
        n, pos = _read_varint(raw, 1)
        if n >= 0 and pos + n == len(raw):
            return None, raw[pos:], len(raw)
    try:
        message = pb.Chunk.FromString(bytes(raw))
    except DecodeError:
        raise WireError("a frame is not a confide.v1.Chunk message (malformed bytes)") from None
    if message.WhichOneof("part") == "data":
        return None, message.data, len(raw)
    return message, b"", len(raw)


def _read_data(
    it: Iterator[pb.Chunk | bytes],
    buffer: npt.NDArray[np.uint8],
    hasher: _Sha256,
    stats: StreamStats,
) -> tuple[bytes, bytes]:
    """Fill ``buffer`` from the data parts of a stream; return the digest it ends with and
    its signature (empty if the stream carried none)."""
    total = len(buffer)
    received = 0
    digest: bytes | None = None
    signature: bytes | None = None
    for item in it:
        message, data, size = _parse(item)
        stats.wire_bytes += size
        if signature is not None:
            raise WireError("a frame after the signature; the signature is a stream's last frame")
        if message is None:
            if digest is not None:
                raise WireError("data after the digest")
            n = len(data)
            if received + n > total:
                raise WireError(f"more data than the manifest announced ({total} bytes)")
            buffer[received : received + n] = np.frombuffer(data, dtype=np.uint8)
            hasher.update(memoryview(buffer.data)[received : received + n])
            received += n
            continue
        part = message.WhichOneof("part")
        if part == "sha256":
            if digest is not None:
                raise WireError("two digests in one stream")
            digest = message.sha256
        elif part == "signature":
            if digest is None:
                raise WireError("a signature before the digest; it follows the digest")
            if not 0 < len(message.signature) <= MAX_SIGNATURE_BYTES:
                raise WireError(
                    f"a signature of {len(message.signature)} bytes "
                    f"(1..{MAX_SIGNATURE_BYTES} allowed)"
                )
            signature = message.signature
        else:
            raise WireError(f"unexpected {part or 'empty'} part inside a stream")
    if received != total:
        raise WireError(f"stream ended after {received} of {total} bytes")
    if digest is None:
        raise WireError("stream ended without its SHA-256 digest")
    return digest, signature or b""


def decode(
    chunks: Iterable[pb.Chunk] | Iterable[bytes],
    *,
    max_bytes: int,
    expect: Sequence[tuple[str, tuple[int, ...]]] | None = None,
    stats: StreamStats | None = None,
) -> Payload:
    """Reassemble a stream into a :class:`Payload`, validating every part.

    ``max_bytes`` bounds what the receiver will buffer (a hostile or broken peer cannot
    exhaust memory); ``expect`` (names and shapes of the model) rejects an update for
    a different model before any data is read.
    """
    stats = stats if stats is not None else StreamStats()
    it = iter(chunks)
    item = next(it, None)
    first = None if item is None else _parse(item)
    if first is None or first[0] is None or first[0].WhichOneof("part") != "manifest":
        raise WireError("a stream must start with a manifest")
    stats.wire_bytes += first[2]
    manifest = first[0].manifest
    head_digest = manifest_digest(manifest)
    if manifest.total_bytes > max_bytes:
        raise WireError(
            f"the stream announces {manifest.total_bytes} bytes, above the limit of {max_bytes}"
        )
    headers = list(manifest.arrays)
    for h in headers:
        if h.dtype not in ALLOWED_DTYPES:
            raise WireError(f"array {h.name!r} has dtype {h.dtype!r}, which is not allowed")
        if len(h.shape) > MAX_NDIM:
            raise WireError(f"array {h.name!r} has {len(h.shape)} dimensions, above {MAX_NDIM}")
        if any(d < 0 for d in h.shape):
            raise WireError(f"array {h.name!r} has a negative dimension {list(h.shape)}")
        itemsize = np.dtype(h.dtype).itemsize
        # Exact (Python int) products: int64 arithmetic would wrap a hostile shape such as
        # [2**62, 4] to 0 bytes or to a negative size, and NumPy refuses even an empty array
        # whose other dimensions overflow its index type.
        if math.prod(d for d in h.shape if d) * itemsize > max_bytes:
            raise WireError(
                f"array {h.name!r} of shape {list(h.shape)} is above the limit of {max_bytes} bytes"
            )
        expected = math.prod(h.shape) * itemsize
        if expected != h.nbytes:
            raise WireError(f"array {h.name!r}: {h.nbytes} bytes do not fit shape {list(h.shape)}")
    if sum(h.nbytes for h in headers) != manifest.total_bytes:
        raise WireError("the arrays' sizes do not add up to the manifest's total")
    if expect is not None:
        got = [(h.name, tuple(h.shape)) for h in headers]
        if [s for _, s in got] != [tuple(s) for _, s in expect]:
            raise WireError(
                "the arrays do not match the federation's model "
                f"({len(got)} arrays vs {len(expect)} expected, or shapes differ)"
            )
    # Uninitialised on purpose: every byte is either written below or the stream fails.
    buffer = np.empty(manifest.total_bytes, dtype=np.uint8)
    hasher = _Sha256(background=manifest.total_bytes >= BACKGROUND_HASH_BYTES)
    try:
        digest, signature = _read_data(it, buffer, hasher, stats)
        if hasher.digest() != digest:
            raise WireError("SHA-256 mismatch: the data was corrupted in transit")
    finally:
        hasher.close()
    arrays: list[npt.NDArray[Any]] = []
    offset = 0
    for h in headers:
        a = np.frombuffer(
            buffer.data,
            dtype=np.dtype(h.dtype),
            count=math.prod(h.shape),
            offset=offset,
        )
        arrays.append(a.reshape(tuple(h.shape)))
        offset += h.nbytes
    return Payload(
        task_id=manifest.task_id,
        names=[h.name for h in headers],
        arrays=arrays,
        metrics=decode_records(manifest.metrics),
        config=decode_records(manifest.config),
        manifest_sha256=head_digest,
        data_sha256=digest,
        signature=signature,
    )
