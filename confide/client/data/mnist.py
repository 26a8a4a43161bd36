"""Load MNIST from its IDX files (gzip or raw) into normalised arrays, cached per process."""

from __future__ import annotations

import functools
import gzip
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from confide.errors import ConfigError, DataFormatError

from .arrays import ArrayDataset
from .paths import locate

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), the number of dims.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"

# Mapping bytes through a 256-entry table is exact and avoids a float pass
# over 47M pixels.
_PIXEL_LUT = (
    (np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(MNIST_MEAN))
    / np.float32(MNIST_STD)
).astype(np.float32)


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(
            f"{path} is not a valid gzip file ({exc}). Fix: re-download the MNIST files"
        ) from exc


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The unsigned-byte array stored in an IDX file whose header must start with ``magic``."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataFormatError(f"{path} is too short to be an IDX file. Fix: re-download it")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataFormatError(
            f"{path} has IDX magic number 0x{found:08x}, expected 0x{magic:08x}. Fix: check "
            "that images and labels files are not swapped and that the file is MNIST IDX"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path} ends inside its IDX header. Fix: re-download it")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataFormatError(
            f"{path} holds {len(data)} bytes but its header {dims} needs {expected}. "
            "Fix: the file is truncated or corrupt; re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _load_cached(images: Path, labels: Path, _stamp: tuple[int, ...]) -> ArrayDataset:
    # _stamp (mtime, size of both files) is only part of the cache key, so a
    # replaced file is re-read instead of served stale.
    pixels = read_idx(images, _IMAGES_MAGIC)
    y = read_idx(labels, _LABELS_MAGIC).astype(np.int64)
    x = _PIXEL_LUT[pixels][:, None, :, :]
    if x.shape[0] != y.shape[0]:
        raise DataFormatError(
            f"{images} has {x.shape[0]} images but {labels} has {y.shape[0]} labels. "
            "Fix: use the images and labels files of the same split"
        )
    # Every simulated site shares these arrays; read-only stops one site's
    # in-place augmentation from silently changing every other site's data.
    x.flags.writeable = False
    y.flags.writeable = False
    return ArrayDataset(x, y)


def _find(data_dir: str | Path | None, stem: str) -> Path:
    return locate(data_dir, "mnist", f"{stem}.gz", stem).resolve()


def load_mnist(
    split: Literal["train", "test"] = "train", data_dir: str | Path | None = None
) -> ArrayDataset:
    """MNIST ``split`` as x float32 (N, 1, 28, 28), normalised with the usual mean/std, y int64.

    Reads ``<data_dir>/mnist/`` or a ``data_dir`` that holds the IDX files
    directly (gzip or not). The arrays are cached per process and read-only;
    ``subset`` or ``np.array(x)`` gives a writable copy.
    """
    if split not in _FILES:
        raise ConfigError("split", f"unknown MNIST split {split!r}", "use 'train' or 'test'")
    img_stem, lbl_stem = _FILES[split]
    images, labels = _find(data_dir, img_stem), _find(data_dir, lbl_stem)
    st_i, st_l = images.stat(), labels.stat()
    stamp = (st_i.st_mtime_ns, st_i.st_size, st_l.st_mtime_ns, st_l.st_size)
    return _load_cached(images, labels, stamp)
