"""The chunk-stream codec: exact round trips, and every malformed stream rejected with a reason."""

from __future__ import annotations

import threading
from typing import ClassVar

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide import wire
from confide.protos.v1 import coordinator_pb2 as pb
from confide.wire import Payload, StreamStats, WireError, decode, encode

MB = 1 << 20


def _payload() -> Payload:
    rng = np.random.default_rng(0)
    return Payload(
        task_id="t-1",
        names=["w", "b", "counts"],
        arrays=[
            rng.standard_normal((300, 200)).astype(np.float32),
            rng.standard_normal(200).astype(np.float32),
            np.arange(7, dtype=np.uint32),
        ],
        metrics={"num-examples": 600, "train_loss": 0.25, "dp": True},
        config={"lr": 0.05, "note": "hello", "blob": b"\x00\x01"},
    )


@settings(max_examples=25, deadline=None)
@given(chunk=st.integers(min_value=1, max_value=300_000))
def test_round_trip_is_exact_for_any_chunk_size(chunk: int) -> None:
    p = _payload()
    chunks = list(encode(p, chunk))
    assert all(len(c.data) <= chunk for c in chunks if c.WhichOneof("part") == "data")
    out = decode(chunks, max_bytes=16 * MB)
    assert out.names == p.names and out.task_id == "t-1"
    for a, b in zip(out.arrays, p.arrays, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert out.metrics == p.metrics and out.config == p.config
    assert isinstance(out.metrics["dp"], bool) and isinstance(out.metrics["num-examples"], int)


def test_float32_costs_four_bytes_per_parameter_on_the_wire() -> None:
    p = _payload()
    data = sum(len(c.data) for c in encode(p, MB))
    assert data == 4 * (300 * 200 + 200) + 4 * 7


def _tamper(chunks: list[pb.Chunk], index: int, new: pb.Chunk) -> list[pb.Chunk]:
    return [*chunks[:index], new, *chunks[index + 1 :]]


def test_malformed_streams_are_rejected_with_the_reason() -> None:
    chunks = list(encode(_payload(), 64 * 1024))
    with pytest.raises(WireError, match="start with a manifest"):
        decode(chunks[1:], max_bytes=16 * MB)
    with pytest.raises(WireError, match="above the limit"):
        decode(chunks, max_bytes=1000)
    with pytest.raises(WireError, match="without its BLAKE3 digest"):
        decode(chunks[:-1], max_bytes=16 * MB)
    with pytest.raises(WireError, match="ended after"):
        decode(chunks[:2] + chunks[-1:], max_bytes=16 * MB)
    corrupted = bytearray(chunks[1].data)
    corrupted[0] ^= 0xFF
    with pytest.raises(WireError, match="digest mismatch"):
        decode(_tamper(chunks, 1, pb.Chunk(data=bytes(corrupted))), max_bytes=16 * MB)
    with pytest.raises(WireError, match="more data"):
        decode([*chunks[:-1], pb.Chunk(data=b"x"), *chunks[-1:]], max_bytes=16 * MB)
    with pytest.raises(WireError, match="do not match the federation's model"):
        decode(chunks, max_bytes=16 * MB, expect=[("w", (300, 200))])


def test_manifest_lies_are_caught_before_reading_data() -> None:
    bad = pb.Manifest(
        task_id="t",
        arrays=[pb.ArrayHeader(name="x", dtype="|O", shape=[2], nbytes=16)],
        total_bytes=16,
    )
    with pytest.raises(WireError, match="not allowed"):
        decode([pb.Chunk(manifest=bad)], max_bytes=MB)
    bad = pb.Manifest(
        task_id="t",
        arrays=[pb.ArrayHeader(name="x", dtype="<f4", shape=[3], nbytes=16)],
        total_bytes=16,
    )
    with pytest.raises(WireError, match="do not fit shape"):
        decode([pb.Chunk(manifest=bad)], max_bytes=MB)
    data = b"\x00" * 8
    ok = pb.Manifest(
        task_id="t",
        arrays=[pb.ArrayHeader(name="x", dtype="<f4", shape=[2], nbytes=8)],
        total_bytes=8,
    )
    out = decode(
        [
            pb.Chunk(manifest=ok),
            pb.Chunk(data=data),
            pb.Chunk(digest=blake3.blake3(data).digest()),
        ],
        max_bytes=MB,
    )
    assert out.arrays[0].tolist() == [0.0, 0.0]


def test_object_arrays_cannot_be_sent() -> None:
    p = Payload(task_id="t", names=["o"], arrays=[np.array([object()], dtype=object)])
    with pytest.raises(WireError, match="does not carry"):
        list(encode(p))


def test_decode_counts_the_serialized_bytes_of_the_stream() -> None:
    chunks = list(encode(_payload(), 100_000))
    stats = StreamStats()
    decode(chunks, max_bytes=16 * MB, stats=stats)
    assert stats.wire_bytes == sum(c.ByteSize() for c in chunks)


@settings(max_examples=20, deadline=None)
@given(chunk=st.integers(min_value=64, max_value=300_000))
def test_frames_are_the_serialized_chunks_and_decode_in_place(chunk: int) -> None:
    p = _payload()
    frames = list(wire.frames(p, chunk))
    messages = list(encode(p, chunk))
    # Same messages (protobuf does not fix the byte order of map entries, so the manifest
    # is compared parsed); a data frame is the message with its length padded to 7 bytes
    # (protobuf reads the over-long varint), the digest frame is byte-identical.
    assert [pb.Chunk.FromString(f) for f in frames] == messages
    for f, m in zip(frames[1:-1], messages[1:-1], strict=True):
        assert f[: wire.DATA_HEADER_BYTES] == wire._data_header(len(m.data))
        assert f[wire.DATA_HEADER_BYTES :] == m.data
    assert frames[-1] == messages[-1].SerializeToString()
    stats = StreamStats()
    out = decode(frames, max_bytes=16 * MB, stats=stats)
    assert stats.wire_bytes == sum(len(f) for f in frames)
    for a, b in zip(out.arrays, p.arrays, strict=True):
        np.testing.assert_array_equal(a, b)


def _inside(a: np.ndarray, frame: bytes) -> bool:
    lo, hi = np.lib.array_utils.byte_bounds(a)
    start = np.frombuffer(frame, dtype=np.uint8).ctypes.data
    return start <= lo and hi <= start + len(frame)


def test_arrays_inside_one_frame_are_read_in_place_and_every_array_is_read_only() -> None:
    rng = np.random.default_rng(1)
    chunk = wire.KEEP_FRAME_BYTES
    p = Payload(
        "t",
        ["f64", "f32", "odd", "f64b", "span"],
        [
            rng.standard_normal(10),  # float64 at offset 0 of frame 1
            rng.standard_normal(6).astype(np.float32),  # at 80: aligned
            np.arange(3, dtype=np.uint8),  # at 104, leaves the next array at 107
            rng.standard_normal(4),  # float64 at 107: misaligned, so copied
            rng.standard_normal(chunk // 4).astype(np.float32),  # runs into frame 2: copied
        ],
    )
    frames = list(wire.frames(p, chunk))
    data = frames[1:3]  # manifest, two data frames, digest
    assert [len(f) - wire.DATA_HEADER_BYTES for f in data] == [chunk, 139]
    out = decode(frames, max_bytes=MB)
    for got, sent in zip(out.arrays, p.arrays, strict=True):
        np.testing.assert_array_equal(got, sent)
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert not got.flags.writeable and got.flags.aligned
        with pytest.raises(ValueError, match="read-only"):
            got[...] = 0
    # Received frames are bytes: their data starts 8-byte aligned, so the aligned arrays
    # of frame 1 are views of it; the misaligned one and the one across frames are copies.
    assert [_inside(a, data[0]) for a in out.arrays] == [True, True, True, False, False]
    assert not any(_inside(a, data[1]) for a in out.arrays)


def test_tiny_frames_are_copied_together_not_kept_one_by_one() -> None:
    """A peer cutting a stream into tiny frames cannot make the receiver keep an object
    per frame: frames under KEEP_FRAME_BYTES are gathered into one buffer."""
    big = np.arange(10_000, dtype=np.float32)
    frames = list(wire.frames(Payload("t", ["w"], [big]), 16))  # 2,500 frames of 16 bytes
    stats = StreamStats()
    hasher = wire._Digest(background=False)
    pieces, digest, _ = wire._read_data(iter(frames[1:]), big.nbytes, hasher, stats)
    assert len(pieces) == 1 and len(pieces[0]) == big.nbytes
    assert digest == hasher.digest() == blake3.blake3(big.tobytes()).digest()
    np.testing.assert_array_equal(decode(frames, max_bytes=MB).arrays[0], big)


def test_a_large_stream_hashes_in_the_background_and_still_checks_the_digest() -> None:
    big = np.arange(
        17 * MB // 4, dtype=np.float32
    )  # 17 MiB: hashed by the receiver's helper thread
    assert big.nbytes >= wire.RECEIVE_BACKGROUND_HASH_BYTES
    frames = list(wire.frames(Payload("t", ["w"], [big]), 4 * MB))
    out = decode(frames, max_bytes=32 * MB)
    np.testing.assert_array_equal(out.arrays[0], big)
    assert out.data_digest == blake3.blake3(big.tobytes()).digest()
    corrupt = bytearray(frames[2])
    corrupt[-1] ^= 1
    with pytest.raises(WireError, match="digest mismatch"):
        decode([*frames[:2], bytes(corrupt), *frames[3:]], max_bytes=32 * MB)


def test_the_data_digest_is_blake3_of_the_array_bytes_in_order() -> None:
    p = _payload()
    frames = list(wire.frames(p, 64 * 1024))
    expected = blake3.blake3(b"".join(np.ascontiguousarray(a).tobytes() for a in p.arrays))
    assert pb.Chunk.FromString(frames[-1]).digest == expected.digest()
    assert decode(frames, max_bytes=16 * MB).data_digest == expected.digest()


def test_the_sender_hashes_its_own_copy_so_later_changes_cannot_break_the_digest() -> None:
    a = np.ones(MB // 2, dtype=np.float32)  # 2 MiB in two frames, framed ahead by a helper
    stream = wire.frames(Payload("t", ["w"], [a]), MB)
    sent = [next(stream), next(stream)]
    a[:] = 7  # the caller reuses its buffer while the stream is still running
    sent += list(stream)
    out = decode(sent, max_bytes=8 * MB)  # whatever went out, the digest matches it
    half = MB // 4  # elements in one 1 MiB frame
    assert set(out.arrays[0][:half].tolist()) == {1}  # copied before it was handed over
    # The second frame may have been copied while the caller wrote (then it holds both
    # values); it is hashed from that copy, so the stream still checks out.
    assert set(out.arrays[0][half:].tolist()) <= {1, 7}


def test_frames_built_ahead_stop_with_the_consumer_and_raise_in_order() -> None:
    def framers() -> int:
        return sum(t.name == "confide-framer" for t in threading.enumerate())

    big = np.ones(3 * MB // 4, dtype=np.float32)  # 3 MiB: framed ahead
    before = framers()
    stream = wire.frames(Payload("t", ["w"], [big]), MB // 4)
    next(stream), next(stream)
    stream.close()  # a cancelled upload: the helper must not live on
    assert framers() == before

    class Failing:
        record: ClassVar[dict[str, wire.ScalarValue]] = {}

        def __call__(self, manifest_sha256: bytes, data_digest: bytes) -> bytes:
            raise RuntimeError("no key")

    frames = wire.frames(Payload("t", ["w"], [big]), MB, signer=Failing())
    got = [next(frames) for _ in range(5)]  # manifest, 3 data frames, digest
    assert pb.Chunk.FromString(got[-1]).WhichOneof("part") == "digest"
    with pytest.raises(RuntimeError, match="no key"):
        next(frames)
    assert framers() == before


def test_raw_frames_that_are_not_plain_data_are_parsed_as_protobuf() -> None:
    p = _payload()
    frames = list(wire.frames(p, 100_000))
    # A data frame followed by a second encoding of the field (protobuf: the last wins)
    # does not match the in-place fast path and must still be read correctly.
    data = pb.Chunk.FromString(frames[1]).data
    odd = pb.Chunk(data=b"ignored").SerializeToString() + frames[1]
    assert pb.Chunk.FromString(odd).data == data
    out = decode([frames[0], odd, *frames[2:]], max_bytes=16 * MB)
    np.testing.assert_array_equal(out.arrays[0], p.arrays[0])
    with pytest.raises(WireError, match="malformed bytes"):
        decode([frames[0], b"\x12\xff\xff\xff", *frames[2:]], max_bytes=16 * MB)
    with pytest.raises(WireError, match="not str"):
        decode([frames[0], "text"], max_bytes=16 * MB)  # type: ignore[list-item]


def test_a_zero_dimensional_array_keeps_its_shape() -> None:
    # BatchNorm's num_batches_tracked is a 0-d tensor: sent as shape (1,) it would not
    # load back into the model's state dict.
    payload = Payload("t", ["count", "w"], [np.array(7, dtype=np.int64), np.ones(3, np.float32)])
    for stream in (
        list(wire.frames(payload, 8)),
        [c.SerializeToString() for c in encode(payload, 8)],
    ):
        out = decode(iter(stream), max_bytes=1 << 20)
        assert out.arrays[0].shape == ()
        assert int(out.arrays[0]) == 7
