"""Flower's two ClientApp dialects: the message API and the legacy ``NumPyClient`` adapter.

A site may bring any Flower ClientApp: one written with the message API
(``@app.train()``, ``@app.evaluate()``) or a ``ClientApp(client_fn=...)`` around a
``NumPyClient``. They read and write different records; :class:`AppDialect` speaks to
each in its own, for the simulator's round driver and for the site agent alike.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import (
    FitIns,
    Parameters,
    bytes_to_ndarray,
    ndarray_to_bytes,
    parameters_to_ndarrays,
)
from flwr.common.constant import SType
from flwr.common.typing import EvaluateIns
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)

from confide.wire import NUM_EXAMPLES

# --- ndarray <-> Flower Array, without np.save / np.load -------------------------------
#
# ``Array(ndarray)`` runs ``np.save`` into a BytesIO (``tobytes`` copy, then the BytesIO's
# own copy) and ``Array.numpy()`` runs ``np.load`` on one (a read copy, then a copy into
# the new array). For a model of a few MB that is milliseconds per site and round. The
# functions below produce the very same ``.npy`` bytes with one copy, and read them back
# without any; anything out of the ordinary is left to Flower.

_NPY_MAGIC = b"\x93NUMPY"
_PLAIN_KINDS = frozenset("biufc")  # bool, ints, floats, complex: raw bytes in .npy


def _plain(dtype: np.dtype[Any]) -> bool:
    """A dtype whose .npy data is its raw bytes (no pickle, no fields, no metadata)."""
    return (
        dtype.kind in _PLAIN_KINDS
        and dtype.names is None
        and dtype.metadata is None
        and dtype.itemsize > 0
        and not dtype.hasobject
    )


def _npy_bytes(a: npt.NDArray[Any]) -> bytes | None:
    """``np.save(BytesIO(), a, allow_pickle=False)``'s bytes, built with one copy.

    ``None`` when ``a`` is not a plain C-ordered array that format 1.0 can describe (the
    caller then asks numpy itself).
    """
    if type(a) is not np.ndarray or not _plain(a.dtype):
        return None
    if not a.flags.c_contiguous:
        if a.flags.f_contiguous:
            return None  # np.save writes it in Fortran order: leave that to numpy
        a = np.array(a, order="C")  # np.save writes non-contiguous data in C order
    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(a))
    except ValueError:  # a header too long for format 1.0: np.save switches to 2.0
        return None
    return b"".join((header.getvalue(), a.data))  # the array's buffer is copied once, here


def array_of(a: npt.NDArray[Any]) -> Array:
    """``Array(a)`` as Flower builds it (same dtype, shape, stype and data bytes), faster."""
    data = _npy_bytes(a)
    if data is None:
        return Array(a)
    return Array(dtype=str(a.dtype), shape=tuple(a.shape), stype=SType.NUMPY, data=data)


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]] | None:
    """``(shape, fortran_order, dtype)`` of a complete .npy header, parsed by numpy."""
    fp = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            return None
    except ValueError:
        return None
    if fp.tell() != len(header):
        return None
    return tuple(shape), bool(fortran), dtype


def _npy_view(
    data: bytes, dtype: str | None = None, shape: Sequence[int] | None = None
) -> npt.NDArray[Any] | None:
    """The array in .npy ``data`` as a read-only view of it (no copy).

    ``None`` (read it with numpy instead) unless the header is format 1.0/2.0, C order, a
    plain dtype, agrees with ``dtype``/``shape`` when given, and the data is exactly the
    array's size.
    """
    if type(data) is not bytes or len(data) < 10 or data[:6] != _NPY_MAGIC:
        return None
    if data[6:8] == b"\x01\x00":
        start = 10 + int.from_bytes(data[8:10], "little")
    elif data[6:8] == b"\x02\x00" and len(data) >= 12:
        start = 12 + int.from_bytes(data[8:12], "little")
    else:
        return None
    if start > len(data):
        return None
    parsed = _npy_header(data[:start])
    if parsed is None:
        return None
    got_shape, fortran, got_dtype = parsed
    if fortran or not _plain(got_dtype):
        return None
    if dtype is not None and str(got_dtype) != dtype:
        return None
    if shape is not None and tuple(shape) != got_shape:
        return None
    count = math.prod(got_shape)
    if len(data) - start != count * got_dtype.itemsize:
        return None
    return np.frombuffer(data, dtype=got_dtype, count=count, offset=start).reshape(got_shape)


def ndarray_of(array: Array) -> npt.NDArray[Any]:
    """``array.numpy()``, as a READ-ONLY view of ``array.data`` where it can be (no copy).

    Equal in dtype, shape and values to Flower's own; anything but a plain C-ordered
    ``numpy.ndarray`` whose header agrees with the Array's fields is read by Flower (and
    then writable). Callers must not write into what this returns.
    """
    if array.stype == SType.NUMPY:
        view = _npy_view(array.data, array.dtype, array.shape)
        if view is not None:
            return view
    return array.numpy()


def ndarrays_of(record: ArrayRecord) -> list[npt.NDArray[Any]]:
    """``record.to_numpy_ndarrays()`` through :func:`ndarray_of` (read-only arrays)."""
    return [ndarray_of(a) for a in record.values()]


def _tensors_to_ndarrays(parameters: Parameters) -> list[npt.NDArray[Any]]:
    """``parameters_to_ndarrays`` (legacy records), read-only views where possible."""
    if parameters.tensor_type != SType.NUMPY:
        return parameters_to_ndarrays(parameters)
    out = []
    for tensor in parameters.tensors:
        view = _npy_view(tensor)
        out.append(view if view is not None else bytes_to_ndarray(tensor))
    return out


def _ndarrays_to_parameters(weights: list[npt.NDArray[Any]]) -> Parameters:
    """``ndarrays_to_parameters``, byte for byte, with one copy per array."""
    tensors = []
    for w in weights:
        data = _npy_bytes(w)
        tensors.append(data if data is not None else ndarray_to_bytes(w))
    return Parameters(tensors=tensors, tensor_type=SType.NUMPY)


def _arrays(names: Sequence[str], weights: list[npt.NDArray[Any]]) -> ArrayRecord:
    return ArrayRecord(
        {n: array_of(np.require(w, requirements="C")) for n, w in zip(names, weights, strict=True)}
    )


def _number(metrics: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


@dataclass(frozen=True)
class TrainReply:
    """A site's train reply, whichever API its app speaks.

    ``weights`` are read-only views of the reply's bytes where they can be (see
    :func:`ndarray_of`): copy one before writing into it.
    """

    weights: list[npt.NDArray[Any]]
    num_examples: int
    metrics: dict[str, Any]


class AppDialect:
    """How to talk to one ClientApp: Flower's message API, or a legacy ``NumPyClient``.

    Message-API apps (``@app.train()``) get ``{"arrays", "config"}`` and answer with one
    ``ArrayRecord`` and a ``MetricRecord`` holding ``num-examples``, as Flower's own
    strategies expect. A ``ClientApp(client_fn=...)`` around a ``NumPyClient`` only
    understands the legacy ``fitins.*`` / ``evaluateins.*`` records; Flower's own adapter
    converts them, and this class speaks them.
    """

    def __init__(self, legacy: bool) -> None:
        self.legacy = legacy

    @classmethod
    def of(cls, app: ClientApp) -> AppDialect:
        return cls(_speaks_legacy(app))

    @staticmethod
    def ndarrays(record: ArrayRecord) -> list[npt.NDArray[Any]]:
        """A reply's arrays, as ``record.to_numpy_ndarrays()`` gives them but READ-ONLY
        views of the record's bytes (no copy): see :func:`ndarray_of`."""
        return ndarrays_of(record)

    def train_content(
        self, names: Sequence[str], weights: list[npt.NDArray[Any]], config: ConfigRecord
    ) -> RecordDict:
        if self.legacy:
            fitins = FitIns(_ndarrays_to_parameters(weights), dict(config))  # type: ignore[arg-type]
            return fitins_to_recorddict(fitins, keep_input=True)
        return RecordDict({"arrays": _arrays(names, weights), "config": config})

    def evaluate_content(
        self, names: Sequence[str], weights: list[npt.NDArray[Any]], config: ConfigRecord
    ) -> RecordDict:
        if self.legacy:
            ins = EvaluateIns(_ndarrays_to_parameters(weights), dict(config))  # type: ignore[arg-type]
            return evaluateins_to_recorddict(ins, keep_input=True)
        return RecordDict({"arrays": _arrays(names, weights), "config": config})

    def train_reply(self, reply: Message) -> TrainReply:
        content = reply.content
        if self.legacy:
            res = recorddict_to_fitres(content, keep_input=False)
            n = int(res.num_examples)
            return TrainReply(
                _tensors_to_ndarrays(res.parameters), n, {**res.metrics, NUM_EXAMPLES: n}
            )
        arrays = next(iter(content.array_records.values()), None)
        metrics = next(iter(content.metric_records.values()), None)
        if arrays is None or metrics is None or NUM_EXAMPLES not in metrics:
            raise ValueError(
                f"a train reply needs an ArrayRecord and a MetricRecord with {NUM_EXAMPLES!r}"
            )
        n = int(metrics[NUM_EXAMPLES])  # type: ignore[arg-type]
        return TrainReply(ndarrays_of(arrays), n, dict(metrics))

    def evaluate_reply(self, reply: Message) -> tuple[int, float | None, float | None]:
        """``(num_examples, loss, accuracy)`` of an evaluate reply."""
        if self.legacy:
            res = recorddict_to_evaluateres(reply.content)
            metrics = dict(res.metrics)
            return (
                int(res.num_examples),
                float(res.loss),
                _number(metrics, "accuracy", "eval_accuracy", "eval_acc"),
            )
        record = next(iter(reply.content.metric_records.values()), None)
        if record is None or NUM_EXAMPLES not in record:
            raise ValueError(f"an evaluate reply needs a MetricRecord with {NUM_EXAMPLES!r}")
        values = dict(record)
        return (
            int(record[NUM_EXAMPLES]),  # type: ignore[arg-type]
            _number(values, "eval_loss", "loss"),
            _number(values, "eval_accuracy", "eval_acc", "accuracy"),
        )

    def modern_reply(self, reply: Message, train: bool, names: Sequence[str]) -> RecordDict:
        """A reply as message-API records: ``{"arrays", "metrics"}`` (train) or ``{"metrics"}``.

        The site agent reads every reply this way, whichever dialect its app speaks.
        Evaluation metrics are named ``eval_loss`` / ``eval_accuracy`` as the built-in
        apps name them.
        """
        if not self.legacy:
            return reply.content
        if train:
            got = self.train_reply(reply)
            metrics: dict[str, Any] = {
                k: v
                for k, v in got.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            return RecordDict(
                {"arrays": _arrays(names, got.weights), "metrics": MetricRecord(metrics)}
            )
        n, loss, accuracy = self.evaluate_reply(reply)
        values: dict[str, Any] = {NUM_EXAMPLES: n}
        if loss is not None:
            values["eval_loss"] = loss
        if accuracy is not None:
            values["eval_accuracy"] = accuracy
        return RecordDict({"metrics": MetricRecord(values)})


def _speaks_legacy(app: ClientApp) -> bool:
    """Whether ``app`` was built as ``ClientApp(client_fn=...)`` (Flower's legacy adapter).

    Message-API apps register handlers and leave ``_call`` unset; ``client_fn`` apps set it
    to Flower's adapter function (wrapped by their mods). An app whose ``_call`` defers to
    another ClientApp (a hand-written wrapper) speaks what that app speaks.
    """
    call = getattr(app, "_call", None)
    if call is None:
        return False
    stack: list[Any] = [call]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ClientApp):
            return _speaks_legacy(obj)
        if getattr(obj, "__qualname__", "") == "ClientApp.__init__.<locals>.ffn":
            return True
        for cell in getattr(obj, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                stack.append(cell.cell_contents)
    return False


__all__ = ["AppDialect", "TrainReply", "array_of", "ndarray_of", "ndarrays_of"]
