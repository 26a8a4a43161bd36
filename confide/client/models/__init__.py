"""The model zoo a site can train: a name registry, a factory, and weight exchange as NumPy arrays.

Every model is Opacus-compatible when built with ``dp=True`` and has the same
``state_dict`` (keys, order, shapes) with ``dp=False``, so the arrays from
:func:`get_weights` are interchangeable between private and non-private
sites and the server aggregates them position by position.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from confide.client.models.cnn import McMahanCNN, SmallCNN
from confide.client.models.lstm import CharLSTM, SequenceClassifier
from confide.client.models.transformer import CharTransformer, TransformerClassifier
from confide.errors import ConfigError

__all__ = [
    "MODELS",
    "CharLSTM",
    "CharTransformer",
    "InputKind",
    "McMahanCNN",
    "ModelInfo",
    "SequenceClassifier",
    "SmallCNN",
    "TransformerClassifier",
    "build_model",
    "count_parameters",
    "get_weights",
    "set_weights",
]

InputKind = Literal["image", "chars", "sequence"]
"""What a model eats: ``image`` (B,1,28,28) float32, ``chars`` (B,T) int64,
``sequence`` (B,T,F) float32."""


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry: what the model is, what input it takes, how to build it."""

    description: str
    input_kind: InputKind
    constructor: Callable[..., nn.Module]


MODELS: dict[str, ModelInfo] = {
    "cnn": ModelInfo(
        "MNIST CNN of McMahan et al. 2017 (2x 5x5 conv, dense 512; 1.66M params)",
        "image",
        McMahanCNN,
    ),
    "cnn-small": ModelInfo(
        "small MNIST CNN for quick runs (5x5 conv 8 and 16, GroupNorm, dense 64; 54k params)",
        "image",
        SmallCNN,
    ),
    "char-lstm": ModelInfo(
        "Shakespeare next-character LSTM of McMahan et al. (embed 8, 2x LSTM 256)",
        "chars",
        CharLSTM,
    ),
    "char-transformer": ModelInfo(
        "causal pre-LN character Transformer (d_model 128, 2 layers, 4 heads)",
        "chars",
        CharTransformer,
    ),
    "seq-lstm": ModelInfo(
        "LSTM classifier for 6-step credit histories (hidden 64)",
        "sequence",
        SequenceClassifier,
    ),
    "seq-transformer": ModelInfo(
        "Transformer encoder classifier for 6-step credit histories (d_model 64, 2 layers)",
        "sequence",
        TransformerClassifier,
    ),
}


def build_model(name: str, *, dp: bool = False, **kwargs: object) -> nn.Module:
    """Build the registered model ``name``; ``dp=True`` picks Opacus-compatible layers.

    Weights are drawn from torch's global RNG, so ``torch.manual_seed`` makes
    construction reproducible (and, for the LSTMs, identical in both modes).
    """
    info = MODELS.get(name)
    if info is None:
        raise ConfigError("model", f"unknown model '{name}'", f"use one of: {', '.join(MODELS)}")
    accepted = [
        p.name
        for p in inspect.signature(info.constructor).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "dp"
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            "model",
            f"model '{name}' takes no argument(s) {', '.join(unknown)}",
            f"use only: {', '.join(accepted)}",
        )
    return info.constructor(dp=dp, **kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    # Opacus' GradSampleModule prefixes every key with "_module."; names in
    # error messages should match what the user built.
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (trainable or not) in ``model``."""
    return sum(p.numel() for p in model.parameters())


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Float32 copies of ``model.state_dict()`` values, in ``state_dict`` order."""
    return [
        t.detach().cpu().numpy().astype(np.float32, copy=True)
        for t in _unwrap(model).state_dict().values()
    ]


def set_weights(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Overwrite ``model``'s state in place from arrays in ``state_dict`` order.

    Every shape is checked before anything is written, so a mismatch leaves
    the model untouched. Tensors are updated in place, which keeps an
    optimizer (or an Opacus wrapper) that holds the parameters valid.
    """
    state = _unwrap(model).state_dict()
    if len(arrays) != len(state):
        raise ConfigError(
            "weights",
            f"got {len(arrays)} arrays for a model with {len(state)} state entries",
            "send the arrays from get_weights() of the same model architecture",
        )
    for (name, tensor), array in zip(state.items(), arrays, strict=True):
        expected, got = tuple(tensor.shape), tuple(np.shape(array))
        if expected != got:
            raise ConfigError(
                "weights",
                f"parameter '{name}' expects shape {expected}, got {got}",
                "send the arrays from get_weights() of the same model architecture and arguments",
            )
    with torch.no_grad():
        for tensor, array in zip(state.values(), arrays, strict=True):
            tensor.copy_(torch.as_tensor(np.asarray(array)))
