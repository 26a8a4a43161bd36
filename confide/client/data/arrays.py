"""The in-memory data set every loader returns: paired numpy arrays, convertible to torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from confide.errors import DataFormatError

if TYPE_CHECKING:  # torch is imported when a data set is first turned into tensors:
    # loading, partitioning and pricing (confide sim estimate) never need it.
    import torch
    from torch.utils.data import TensorDataset


def _tensor(a: np.ndarray, floating: bool) -> torch.Tensor:
    import torch

    dtype, np_dtype = (torch.float32, np.float32) if floating else (torch.int64, np.int64)
    # Zero-copy when possible. Loader caches hand out read-only arrays, which
    # torch would alias as writable, so those (and only those) are copied.
    if a.flags.writeable and a.dtype == np.dtype(np_dtype):
        return torch.from_numpy(a)
    return torch.tensor(a, dtype=dtype)


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Features ``x`` and targets ``y`` with the same number of rows."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or not isinstance(self.y, np.ndarray):
            raise DataFormatError(
                f"ArrayDataset needs numpy arrays, got {type(self.x).__name__} and "
                f"{type(self.y).__name__}. Fix: wrap the data with np.asarray"
            )
        if self.x.ndim == 0 or self.y.ndim == 0 or self.x.shape[0] != self.y.shape[0]:
            raise DataFormatError(
                f"x has shape {self.x.shape} but y has shape {self.y.shape}; they must have "
                "the same number of rows. Fix: pass one target per sample"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: npt.ArrayLike) -> ArrayDataset:
        """The rows ``idx`` (integer indices or a boolean mask), as independent copies."""
        sel = np.asarray(idx)
        if sel.dtype != np.bool_:
            sel = sel.astype(np.int64, copy=False)
        return ArrayDataset(self.x[sel], self.y[sel])

    def to_torch(self) -> TensorDataset:
        """A ``TensorDataset``: x as float32 (or int64 for token ids), y as int64."""
        from torch.utils.data import TensorDataset

        floating_x = not np.issubdtype(self.x.dtype, np.integer)
        return TensorDataset(_tensor(self.x, floating_x), _tensor(self.y, False))
