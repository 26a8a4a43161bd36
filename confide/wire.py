"""Arrays and Flower records <-> the chunk streams of the wire contract (confide.v1.Chunk).

A stream is a ``Manifest`` (array names, dtypes, shapes; metric and config records),
then the arrays' raw little-endian bytes cut into chunks of a configurable size, then
the SHA-256 of those bytes. The decoder trusts nothing: it checks the order of parts,
the dtypes against an allow-list, every size against the manifest and a ceiling, and
the digest, and raises :class:`WireError` naming what was wrong, so a malformed upload
is rejected and the round carries on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from confide.errors import ConfideError
from confide.protos.v1 import coordinator_pb2 as pb

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
# The metric Flower's strategies (and ours) weight results by.
NUM_EXAMPLES = "num-examples"
# Dtypes a model or an update may use; object and string arrays never cross the wire.
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "<u4", "<i4", "<i8", "|u1", "|i1", "|b1"})

ScalarValue = int | float | bool | str | bytes


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


def encode(payload: Payload, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """Yield the chunks of ``payload``: manifest, data chunks, digest.

    Arrays are sent as little-endian bytes without copying them twice: each array's
    buffer is sliced into chunks of at most ``chunk_bytes``.
    """
    if chunk_bytes <= 0:
        raise WireError(f"chunk size must be positive (got {chunk_bytes})")
    if len(payload.names) != len(payload.arrays):
        raise WireError(f"{len(payload.names)} names for {len(payload.arrays)} arrays")
    arrays = [
        np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        for a in payload.arrays
    ]
    headers = []
    for name, a in zip(payload.names, arrays, strict=True):
        dtype = _dtype_str(a)
        if dtype not in ALLOWED_DTYPES:
            raise WireError(f"array {name!r} has dtype {dtype}, which the wire does not carry")
        headers.append(pb.ArrayHeader(name=name, dtype=dtype, shape=list(a.shape), nbytes=a.nbytes))
    total = sum(a.nbytes for a in arrays)
    yield pb.Chunk(
        manifest=pb.Manifest(
            task_id=payload.task_id,
            arrays=headers,
            metrics=encode_records(payload.metrics),
            config=encode_records(payload.config),
            total_bytes=total,
        )
    )
    digest = hashlib.sha256()
    pending = bytearray()
    for a in arrays:
        view = a.reshape(-1).view(np.uint8)
        offset = 0
        while offset < len(view):
            room = chunk_bytes - len(pending)
            piece = view[offset : offset + room]
            # Hash piece by piece, so the first chunk leaves before the last is hashed.
            digest.update(piece.data)
            if not pending and len(piece) == chunk_bytes:
                yield pb.Chunk(data=piece.tobytes())
            else:
                pending += piece.tobytes()
                if len(pending) == chunk_bytes:
                    yield pb.Chunk(data=bytes(pending))
                    pending.clear()
            offset += len(piece)
    if pending:
        yield pb.Chunk(data=bytes(pending))
    yield pb.Chunk(sha256=digest.digest())


@dataclass
class StreamStats:
    """Bytes of a stream as serialized on the wire, counted while decoding it."""

    wire_bytes: int = 0


def _data_part_size(n: int) -> int:
    # Serialized size of a Chunk whose `data` holds n bytes: tag, length varint, bytes.
    return 1 + max(1, (n.bit_length() + 6) // 7) + n


def decode(
    chunks: Iterable[pb.Chunk],
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
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "manifest":
        raise WireError("a stream must start with a manifest")
    stats.wire_bytes += first.ByteSize()
    manifest = first.manifest
    if manifest.total_bytes > max_bytes:
        raise WireError(
            f"the stream announces {manifest.total_bytes} bytes, above the limit of {max_bytes}"
        )
    headers = list(manifest.arrays)
    for h in headers:
        if h.dtype not in ALLOWED_DTYPES:
            raise WireError(f"array {h.name!r} has dtype {h.dtype!r}, which is not allowed")
        if any(d < 0 for d in h.shape):
            raise WireError(f"array {h.name!r} has a negative dimension {list(h.shape)}")
        expected = int(np.prod(h.shape, dtype=np.int64)) * np.dtype(h.dtype).itemsize
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
    hasher = hashlib.sha256()
    received = 0
    digest: bytes | None = None
    for chunk in it:
        part = chunk.WhichOneof("part")
        if part == "data":
            if digest is not None:
                raise WireError("data after the digest")
            data = chunk.data  # one read: upb copies the bytes on every access
            n = len(data)
            stats.wire_bytes += _data_part_size(n)
            if received + n > manifest.total_bytes:
                raise WireError(
                    f"more data than the manifest announced ({manifest.total_bytes} bytes)"
                )
            buffer[received : received + n] = np.frombuffer(data, dtype=np.uint8)
            hasher.update(data)
            received += n
        elif part == "sha256":
            if digest is not None:
                raise WireError("two digests in one stream")
            digest = chunk.sha256
            stats.wire_bytes += chunk.ByteSize()
        else:
            raise WireError(f"unexpected {part or 'empty'} part inside a stream")
    if received != manifest.total_bytes:
        raise WireError(f"stream ended after {received} of {manifest.total_bytes} bytes")
    if digest is None:
        raise WireError("stream ended without its SHA-256 digest")
    if hasher.digest() != digest:
        raise WireError("SHA-256 mismatch: the data was corrupted in transit")
    arrays: list[npt.NDArray[Any]] = []
    offset = 0
    for h in headers:
        a = np.frombuffer(
            buffer.data,
            dtype=np.dtype(h.dtype),
            count=int(np.prod(h.shape, dtype=np.int64)),
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
    )
