"""Secure aggregation: vectorized SecAgg+ with dropout recovery (see :mod:`.protocol`)."""

from confide.privacy.secagg.masking import MaskExpander, QuantizationError, dequantize_sum, quantize
from confide.privacy.secagg.protocol import (
    Aggregate,
    KeyAdvert,
    MaskedInput,
    MaskedInputError,
    ProtocolViolation,
    SecAggAborted,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    SharedKeys,
    UnmaskReply,
    UnmaskRequest,
    default_neighbours,
    default_threshold,
)
from confide.privacy.secagg.shamir import ShamirError

__all__ = [
    "Aggregate",
    "KeyAdvert",
    "MaskExpander",
    "MaskedInput",
    "MaskedInputError",
    "ProtocolViolation",
    "QuantizationError",
    "SecAggAborted",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "ShamirError",
    "SharedKeys",
    "UnmaskReply",
    "UnmaskRequest",
    "default_neighbours",
    "default_threshold",
    "dequantize_sum",
    "quantize",
]
