"""The fast ndarray <-> Flower ``Array`` conversions of ``confide.client.dialect``.

They must give what Flower gives (``Array(ndarray)`` / ``Array.numpy()``), byte for byte
and value for value, and leave anything unusual to Flower.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType, ndarrays_to_parameters, parameters_to_ndarrays
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from confide.client import dialect
from confide.client.dialect import AppDialect, array_of, ndarray_of, ndarrays_of
from confide.sims.engine import instruction

DTYPES = ["float32", "float64", "int64", "int32", "uint8", "bool", "float16", "complex64"]


def _same_array(a: Array, b: Array) -> None:
    assert (a.dtype, a.shape, a.stype) == (b.dtype, b.shape, b.stype)
    assert type(a.data) is bytes and a.data == b.data


def _same_values(got: npt.NDArray[Any], want: npt.NDArray[Any]) -> None:
    assert type(got) is np.ndarray
    assert got.dtype == want.dtype and got.dtype.str == want.dtype.str
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def _sample(dtype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    rng = np.random.default_rng(0)
    return np.asarray(rng.standard_normal(shape) * 100).astype(dtype)


def _check(a: npt.NDArray[Any]) -> None:
    fast = array_of(a)
    flower = Array(a)
    _same_array(fast, flower)
    _same_values(ndarray_of(fast), flower.numpy())
    _same_values(ndarray_of(flower), np.asarray(a))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (7,), (4, 5), (2, 3, 4), (1000,)])
def test_matches_flower(dtype: str, shape: tuple[int, ...]) -> None:
    _check(_sample(dtype, shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input(dtype: str) -> None:
    a = _sample(dtype, (6, 8))
    _check(a[::2, 1::3])  # neither C nor F contiguous: np.save writes it in C order
    assert dialect._npy_bytes(a[::2, 1::3]) is not None  # the fast path, not the fallback


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i8", ">i2", ">c8"])
def test_big_endian_input(dtype: str) -> None:
    a = _sample(dtype.lstrip(">"), (3, 4)).astype(dtype)
    _check(a)
    _check(np.asarray(a[0, 0]).reshape(()))
    assert array_of(a).dtype == str(a.dtype)
    assert ndarray_of(array_of(a)).dtype.str == a.dtype.str


def test_fortran_order_falls_back() -> None:
    a = np.asfortranarray(_sample("float32", (3, 4)))
    assert dialect._npy_bytes(a) is None
    _check(a)  # Flower's own bytes (fortran_order True) ...
    fast = ndarray_of(Array(a))  # ... read by Flower, values intact
    _same_values(fast, a)


def test_unusual_dtypes_fall_back() -> None:
    for a in [
        np.array(["a", "bc"]),
        np.array([b"x", b"yz"]),
        np.zeros(3, dtype=[("x", "f4"), ("y", "i4")]),
        np.array([1, 2], dtype="datetime64[s]"),
    ]:
        assert dialect._npy_bytes(a) is None
        assert dialect._npy_view(Array(a).data) is None
        _same_array(array_of(a), Array(a))
        _same_values(ndarray_of(array_of(a)), a)
    tagged = np.zeros(2, dtype=np.dtype("f4", metadata={"k": 1}))
    assert dialect._npy_bytes(tagged) is None
    with pytest.warns(UserWarning, match="metadata"):  # numpy's own warning, kept
        fast, flower = array_of(tagged), Array(tagged)
    _same_array(fast, flower)
    _same_values(ndarray_of(fast), flower.numpy())
    objects = np.array([{"a": 1}], dtype=object)
    with pytest.raises(ValueError):
        Array(objects)
    with pytest.raises(ValueError):
        array_of(objects)  # the same error as Flower's


def test_subclass_falls_back() -> None:
    m = np.ma.masked_array(np.arange(4.0), mask=np.array([False, True, False, False]))
    assert dialect._npy_bytes(m) is None
    _same_array(array_of(m), Array(m))


def test_header_equals_np_save() -> None:
    for a in [np.zeros((), "f4"), np.zeros((0,), "u1"), np.zeros((2, 10**12 // 8, 0), "f8")]:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        assert dialect._npy_bytes(a) == buf.getvalue()


def test_long_header_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # a header format 1.0 cannot hold (np.save would switch to 2.0) is left to numpy
    a = np.zeros((1,) * 64, dtype="f4")
    _check(a)

    def too_long(fp: Any, d: Any) -> None:
        raise ValueError("Header length too big for version=(1, 0)")

    monkeypatch.setattr(np.lib.format, "write_array_header_1_0", too_long)
    assert dialect._npy_bytes(a) is None
    _same_array(array_of(a), Array(a))


def test_read_is_zero_copy_and_read_only() -> None:
    fast = array_of(_sample("float32", (1000, 10)))
    view = ndarray_of(fast)
    assert not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(fast.data, dtype=np.uint8))
    with pytest.raises(ValueError):
        view[0, 0] = 1.0
    # what Flower hands an app stays writable
    assert fast.numpy().flags.writeable


def test_read_falls_back_on_disagreement() -> None:
    a = _sample("float32", (4, 5))
    good = array_of(a)
    cases = [
        Array(dtype="float64", shape=(4, 5), stype=good.stype, data=good.data),
        Array(dtype="float32", shape=(5, 4), stype=good.stype, data=good.data),
        Array(dtype="float32", shape=(4, 5), stype=good.stype, data=good.data + b"\0" * 4),
        Array(dtype="", shape=(), stype=good.stype, data=good.data),  # legacy records
    ]
    for arr in cases:
        assert dialect._npy_view(arr.data, arr.dtype, arr.shape) is None or arr.dtype == ""
        _same_values(ndarray_of(arr), arr.numpy())
    short = Array(dtype="float32", shape=(4, 5), stype=good.stype, data=good.data[:-4])
    assert dialect._npy_view(short.data, short.dtype, short.shape) is None
    with pytest.raises(ValueError):
        ndarray_of(short)  # Flower's own error
    other = Array(dtype="float32", shape=(4, 5), stype="torch.raw", data=good.data)
    with pytest.raises(TypeError):
        ndarray_of(other)
    for junk in [b"", b"\x93NUMPY", b"\x93NUMPY\x03\x00" + good.data[8:], b"notnumpy" * 4]:
        assert dialect._npy_view(junk) is None
    # a header that claims more bytes than there are
    assert dialect._npy_view(b"\x93NUMPY\x01\x00\xff\xff{}") is None


def test_record_round_trip() -> None:
    weights = [_sample("float32", (1000, 100)), _sample("float32", (100,)), np.array(3)]
    names = ["w", "b", "steps"]
    record = dialect._arrays(names, weights)
    flower = ArrayRecord({n: Array(w) for n, w in zip(names, weights, strict=True)})
    assert list(record) == names
    for n in names:
        _same_array(record[n], flower[n])
    for got, want in zip(ndarrays_of(record), flower.to_numpy_ndarrays(), strict=True):
        _same_values(got, want)


def test_legacy_parameters_match_flower() -> None:
    weights = [
        _sample("float32", (30, 4)),
        np.asfortranarray(_sample("float64", (3, 4))),
        _sample("int64", (5,))[::2],
        np.array(7, dtype=">i4"),
    ]
    fast = dialect._ndarrays_to_parameters(weights)
    flower = ndarrays_to_parameters(weights)
    assert fast.tensor_type == flower.tensor_type
    assert fast.tensors == flower.tensors
    for got, want in zip(
        dialect._tensors_to_ndarrays(fast), parameters_to_ndarrays(flower), strict=True
    ):
        _same_values(got, want)


def _reply(content: RecordDict) -> Message:
    msg = instruction(RecordDict(), 1, MessageType.TRAIN, 1, "m1")
    return Message(content, reply_to=msg)


def test_train_reply_message_api() -> None:
    weights = [_sample("float32", (20, 3)), _sample("float32", (3,))]
    content = RecordDict(
        {
            "arrays": ArrayRecord({"a": Array(weights[0]), "b": Array(weights[1])}),
            "metrics": MetricRecord({"num-examples": 12, "train_loss": 0.5}),
        }
    )
    got = AppDialect(legacy=False).train_reply(_reply(content))
    assert got.num_examples == 12
    for g, w in zip(got.weights, weights, strict=True):
        _same_values(g, w)
    instruction = AppDialect(legacy=False).train_content(["a", "b"], weights, ConfigRecord({}))
    record = instruction.array_records["arrays"]
    for n, w in zip(["a", "b"], weights, strict=True):
        _same_array(record[n], Array(w))


def test_legacy_content_matches_flower() -> None:
    weights = [_sample("float32", (20, 3)), np.asfortranarray(_sample("float32", (3, 2)))]
    content = AppDialect(legacy=True).train_content(["a", "b"], weights, ConfigRecord({}))
    record = content.array_records["fitins.parameters"]
    assert [a.data for a in record.values()] == ndarrays_to_parameters(weights).tensors


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.dtype(d) for d in DTYPES] + [np.dtype(">f8"), np.dtype(">i4")]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    st.sampled_from(["c", "f", "strided"]),
)
def test_matches_flower_property(a: npt.NDArray[Any], layout: str) -> None:
    if layout == "f":
        a = np.asfortranarray(a)
    elif layout == "strided" and a.ndim > 0:
        a = a[..., ::2]
    fast, flower = array_of(a), Array(a)
    _same_array(fast, flower)
    # NaN payloads survive too: compare the bytes of the values read back
    got, want = ndarray_of(fast), flower.numpy()
    assert got.dtype.str == want.dtype.str and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
