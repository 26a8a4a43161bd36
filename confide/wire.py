"""Arrays and Flower records <-> the chunk streams of the wire contract (confide.v1.Chunk).

A stream is a ``Manifest`` (array names, dtypes, shapes; metric and config records),
then the arrays' raw little-endian bytes cut into chunks of a configurable size, then
the BLAKE3-256 digest of those bytes; an upload then ends with the site's signature of its update
statement (:class:`Signer`, :mod:`confide.privacy.crypto.signing`). The decoder trusts
nothing: it checks the order of parts, the dtypes against an allow-list, every size
against the manifest and a ceiling, and the digest, and raises :class:`WireError` naming
what was wrong, so a malformed upload is rejected and the round carries on.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import queue
import threading
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3
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
    # manifest_digest), BLAKE3-256 of the data bytes, and the signature (empty if none).
    manifest_sha256: bytes = b""
    data_digest: bytes = b""
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
# A data frame is the tag, the length as a varint padded to 7 bytes (protobuf parsers read
# varints of up to 10 bytes, over-long ones included), then the data: 8 header bytes, so
# the data starts 8-byte aligned wherever the frame does. A received frame is a Python
# ``bytes`` whose buffer is 8-byte aligned, so arrays are read in place (:func:`decode`).
DATA_HEADER_BYTES = 8
_LENGTH_BYTES = DATA_HEADER_BYTES - 1


def _data_header(n: int) -> bytes:
    """Tag and over-long (7-byte) varint length of a data frame of ``n`` bytes."""
    if not 0 <= n < 1 << (7 * _LENGTH_BYTES):
        raise WireError(f"a data frame of {n} bytes is too large")
    out = bytearray((_DATA_TAG,))
    for _ in range(_LENGTH_BYTES - 1):
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
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


# The data digest is BLAKE3-256: 5.3 GB/s on one core of the reference machine against
# SHA-256's 1.3 GB/s (SHA-NI), so a 4 MB update costs 0.8 ms instead of 3.3 ms at the
# receiver, where it cannot overlap the transfer (docs/protocol.md). blake3 releases the
# GIL, so helper threads hash while gRPC moves bytes. A sender's stream of at least
# SEND_AHEAD_BYTES is framed and hashed by a helper one frame ahead of gRPC (_ahead); a
# receiver's stream of at least RECEIVE_BACKGROUND_HASH_BYTES is hashed by a helper from
# the received frames while the next frame arrives.
SEND_AHEAD_BYTES = 1 << 20
RECEIVE_BACKGROUND_HASH_BYTES = 1 << 20
# A received data frame of at least this size is kept and read in place; smaller ones
# (only a stream's last frame, from an honest peer: models move in chunks of 64 KiB or
# more) are copied together, so a stream cut into tiny frames cannot make the receiver
# hold one object per few bytes.
KEEP_FRAME_BYTES = 64 * 1024


class _Digest:
    """BLAKE3-256 of a stream's data, computed inline or by a helper thread, in order."""

    def __init__(self, background: bool) -> None:
        self._hash = blake3.blake3()
        self._queue: queue.SimpleQueue[memoryview | bytes | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="confide-digest", daemon=True)
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

    def __call__(self, manifest_sha256: bytes, data_digest: bytes) -> bytes:
        """The signature that ends the stream, over the manifest's and data's digests."""
        ...


def frames(
    payload: Payload, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, signer: Signer | None = None
) -> Iterator[bytes]:
    """Yield the serialized ``confide.v1.Chunk`` messages of ``payload``.

    This is what goes on the wire, built without protobuf objects: a data frame is the
    field tag, the padded length (:data:`DATA_HEADER_BYTES`) and the arrays' bytes, so
    each byte is copied once (into the frame). Large streams are hashed by a helper
    thread while gRPC sends them, which takes the digest off the critical path.
    :func:`encode` gives the same stream as ``Chunk`` messages. With a ``signer`` (every
    upload of a site), its record joins the manifest's config and its signature follows
    the digest as the last frame: one ECDSA signature after the data, so signing adds no
    pass over the bytes.
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
    rest = _data_frames(arrays, chunk_bytes, head_digest, signer)
    # Started now, so the first data frame is built while the manifest is sent.
    ahead = _Ahead(rest) if manifest.total_bytes >= SEND_AHEAD_BYTES else None
    try:
        yield pb.Chunk(manifest=manifest).SerializeToString()
        yield from rest if ahead is None else ahead
    finally:
        if ahead is not None:
            ahead.close()  # a consumer that stops early (a cancelled upload) stops the helper


def _data_frames(
    arrays: Sequence[npt.NDArray[Any]],
    chunk_bytes: int,
    head_digest: bytes,
    signer: Signer | None,
) -> Generator[bytes, None, None]:
    """The data frames of ``arrays``, then the digest frame (and the signature frame).

    A frame is joined once from views of the arrays (an array's tail and the next array's
    head share a frame), so every byte is copied exactly once, into the frame."""
    digest = blake3.blake3()

    def framed(pieces: list[memoryview], n: int) -> bytes:
        return b"".join((_data_header(n), *pieces))

    pieces: list[memoryview] = []
    pending = 0
    for a in arrays:
        view = memoryview(a.reshape(-1).view(np.uint8).data)
        offset = 0
        while offset < len(view):
            piece = view[offset : offset + chunk_bytes - pending]
            pieces.append(piece)
            pending += len(piece)
            offset += len(piece)
            if pending == chunk_bytes:
                out = framed(pieces, pending)
                pieces.clear()
                pending = 0
                yield out
                # Hashed after it is handed over (sent while this runs, when built ahead),
                # and the frame's own copy: the caller's arrays may change once framed.
                digest.update(memoryview(out)[DATA_HEADER_BYTES:])
    if pending:
        out = framed(pieces, pending)
        pieces.clear()
        yield out
        digest.update(memoryview(out)[DATA_HEADER_BYTES:])
    data_digest = digest.digest()
    yield pb.Chunk(digest=data_digest).SerializeToString()
    if signer is not None:
        yield pb.Chunk(signature=signer(head_digest, data_digest)).SerializeToString()


class _Ahead:
    """An iterator over ``frames`` built by a helper thread, one frame ahead of its consumer.

    gRPC asks for the next message only once the previous one is written, so a frame built
    on demand (a copy of up to a chunk of the arrays) would wait for the send and the send
    for it; built ahead, the two overlap, and each frame's hash runs while it is sent. At
    most two frames exist beyond the one being sent. An error in the helper is raised to
    the consumer, in order; :meth:`close` (also when nothing was read) stops the helper.
    """

    def __init__(self, frames: Generator[bytes, None, None]) -> None:
        self._frames = frames
        self._handoff: queue.Queue[tuple[bytes | None, BaseException | None]] = queue.Queue(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="confide-framer", daemon=True)
        self._thread.start()

    def _put(self, frame: bytes | None, error: BaseException | None = None) -> bool:
        while not self._stop.is_set():
            try:
                self._handoff.put((frame, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for frame in self._frames:
                if not self._put(frame):
                    return
            self._put(None)
        except BaseException as e:  # raised by the consumer, in order
            self._put(None, e)
        finally:
            self._frames.close()

    def __iter__(self) -> _Ahead:
        return self

    def __next__(self) -> bytes:
        frame, error = self._handoff.get()
        if error is not None:
            raise error
        if frame is None:
            raise StopIteration
        return frame

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a helper waiting to hand over a frame
            with contextlib.suppress(queue.Empty):
                self._handoff.get(timeout=0.05)
        self._thread.join()


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
    total: int,
    hasher: _Digest,
    stats: StreamStats,
) -> tuple[list[memoryview | bytes | bytearray], bytes, bytes]:
    """The ``total`` data bytes of a stream as the received frames' data parts (frames
    of :data:`KEEP_FRAME_BYTES` or more as they are, smaller ones copied together), the
    digest it ends with and its signature (empty if the stream carried none)."""
    pieces: list[memoryview | bytes | bytearray] = []
    small = bytearray()
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
            # A received frame is immutable bytes: with a helper thread it is hashed while
            # the next frame arrives.
            hasher.update(data)
            if n >= KEEP_FRAME_BYTES:
                if small:
                    pieces.append(small)
                    small = bytearray()
                pieces.append(data)
            else:
                small += data
            received += n
            continue
        part = message.WhichOneof("part")
        if part == "digest":
            if digest is not None:
                raise WireError("two digests in one stream")
            digest = message.digest
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
        raise WireError("stream ended without its BLAKE3 digest")
    if small:
        pieces.append(small)
    return pieces, digest, signature or b""


def _arrays_from(
    pieces: Sequence[memoryview | bytes | bytearray], headers: Sequence[pb.ArrayHeader]
) -> list[npt.NDArray[Any]]:
    """The arrays of ``headers`` out of the data ``pieces`` (their sizes already checked
    against the manifest), all READ-ONLY. An array inside one frame, aligned for its dtype
    (data frames start 8-byte aligned), is a view of that frame: no copy. One that spans
    frames, or is misaligned, is copied."""
    arrays: list[npt.NDArray[Any]] = []
    i = at = 0  # the piece being read, and the offset in it
    for h in headers:
        dtype, shape, n = np.dtype(h.dtype), tuple(h.shape), h.nbytes
        while n and len(pieces[i]) == at:  # an exhausted (or empty) piece
            i, at = i + 1, 0
        if n == 0:
            a = np.empty(shape, dtype=dtype)
        elif len(pieces[i]) - at >= n:
            a = np.frombuffer(pieces[i], dtype=dtype, count=n // dtype.itemsize, offset=at)
            if not a.flags.aligned:
                a = a.copy()
            at += n
        else:
            buffer = np.empty(n, dtype=np.uint8)
            filled = 0
            while filled < n:
                if len(pieces[i]) == at:
                    i, at = i + 1, 0
                    continue
                take = min(n - filled, len(pieces[i]) - at)
                buffer[filled : filled + take] = np.frombuffer(
                    pieces[i], dtype=np.uint8, count=take, offset=at
                )
                filled += take
                at += take
            a = buffer.view(dtype)
        a = a.reshape(shape)
        a.flags.writeable = False
        arrays.append(a)
    return arrays


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
    a different model before any data is read. The arrays are READ-ONLY, most of them
    views of the received frames (see :func:`_arrays_from`): copy one to change it.
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
    hasher = _Digest(background=manifest.total_bytes >= RECEIVE_BACKGROUND_HASH_BYTES)
    try:
        pieces, digest, signature = _read_data(it, manifest.total_bytes, hasher, stats)
        if hasher.digest() != digest:
            raise WireError("digest mismatch: the data was corrupted in transit")
    finally:
        hasher.close()
    arrays = _arrays_from(pieces, headers)
    return Payload(
        task_id=manifest.task_id,
        names=[h.name for h in headers],
        arrays=arrays,
        metrics=decode_records(manifest.metrics),
        config=decode_records(manifest.config),
        manifest_sha256=head_digest,
        data_digest=digest,
        signature=signature,
    )
