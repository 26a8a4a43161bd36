"""Recurrent models (Shakespeare next-character LSTM, credit-history classifier) with a DP twin.

``torch.nn.LSTM`` runs one fused kernel, which Opacus cannot see inside, so
its validator rejects it; ``opacus.layers.DPLSTM`` rebuilds the LSTM from
per-gate linear layers whose per-sample gradients Opacus can compute, at a
large speed cost. Each model here takes ``dp`` and picks one of the two, and
both modes expose *the same* ``state_dict`` (same keys, same order, same
shapes) so weights move freely between a private and a non-private site and
federated aggregation sees identical arrays.

Left alone, a ``DPLSTM`` nested inside another module does not give that:
Opacus drops the internal names (``l0.ih.weight``...) only when the DPLSTM
itself is the root of the ``state_dict`` call, so a nested one reports every
weight twice, and its order (``weight_ih, bias_ih, weight_hh, bias_hh``)
differs from ``nn.LSTM``'s (``weight_ih, weight_hh, bias_ih, bias_hh``).
:func:`_add_lstm` attaches hooks that fix both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from opacus.layers import DPLSTM
from torch import nn

from confide.errors import ConfigError


def _check_positive(field: str, value: int) -> None:
    if value < 1:
        raise ConfigError(field, f"must be a positive integer, got {value}", f"set {field} >= 1")


class _SaveAsLSTM:
    """``state_dict`` post-hook: the owner's DPLSTM entries, as ``nn.LSTM`` would write them.

    A module-level class rather than a closure so models stay picklable
    (Ray, multiprocessing and ``torch.save(model)`` pickle whole modules).
    """

    def __init__(self, attr: str, lstm_order: Sequence[str]) -> None:
        self.attr = attr
        self.lstm_order = list(lstm_order)

    def __call__(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        lstm_prefix = f"{prefix}{self.attr}."
        entries = list(state_dict.items())
        own = {k[len(lstm_prefix) :]: v for k, v in entries if k.startswith(lstm_prefix)}
        if not own:
            return
        # Rebuild in place (the caller holds this dict), dropping the internal
        # duplicates and putting the LSTM's entries, in nn.LSTM order, where they stood.
        state_dict.clear()
        placed = False
        for key, value in entries:
            if not key.startswith(lstm_prefix):
                state_dict[key] = value
            elif not placed:
                state_dict.update((lstm_prefix + name, own[name]) for name in self.lstm_order)
                placed = True


class _LoadAsLSTM:
    """``load_state_dict`` pre-hook: accept ``nn.LSTM``-named entries for the owner's DPLSTM."""

    def __init__(self, attr: str, aliases: dict[str, str]) -> None:
        self.attr = attr
        self.aliases = dict(aliases)  # DPLSTM internal name -> nn.LSTM name

    def __call__(
        self,
        module: nn.Module,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The per-gate submodules load from their internal names; feed them the
        # nn.LSTM-named tensors so a canonical state_dict loads with strict=True.
        lstm_prefix = f"{prefix}{self.attr}."
        for internal, public in self.aliases.items():
            if lstm_prefix + public in state_dict:
                state_dict[lstm_prefix + internal] = state_dict[lstm_prefix + public]


def _align_state_dict_with_lstm(owner: nn.Module, attr: str, lstm_order: Sequence[str]) -> None:
    """Make the DPLSTM ``owner.<attr>`` save and load exactly like an ``nn.LSTM`` would.

    The hooks sit on the owner, not on the DPLSTM: Opacus' own key filter on
    the DPLSTM returns a fresh dict, which torch honours only at the root, so
    a hook on the DPLSTM itself would edit a dict that is then thrown away.
    """
    aliases = dict(getattr(owner, attr).old_to_new)
    # torch leaves these two registration methods unannotated.
    owner.register_state_dict_post_hook(_SaveAsLSTM(attr, lstm_order))  # type: ignore[no-untyped-call]
    owner.register_load_state_dict_pre_hook(_LoadAsLSTM(attr, aliases))  # type: ignore[no-untyped-call]


def _add_lstm(
    owner: nn.Module, attr: str, input_size: int, hidden_size: int, num_layers: int, *, dp: bool
) -> None:
    """Set ``owner.<attr>`` to a batch-first LSTM whose state is ``nn.LSTM``'s in both modes.

    ``dp=False`` gives the fused ``nn.LSTM``; ``dp=True`` a ``DPLSTM`` holding
    the very weights that ``nn.LSTM`` would have been initialised with.
    """
    reference = nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)
    if not dp:
        setattr(owner, attr, reference)
        return
    # A side RNG stream for the DPLSTM's own (discarded) initialisation keeps
    # every later layer's draw identical to the non-DP build.
    with torch.random.fork_rng(devices=[]):
        dplstm = DPLSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)
    dplstm.load_state_dict(reference.state_dict())
    setattr(owner, attr, dplstm)
    _align_state_dict_with_lstm(owner, attr, [name for name, _ in reference.named_parameters()])


class CharLSTM(nn.Module):
    """The Shakespeare next-character LSTM of McMahan et al. 2017.

    An 8-dimensional character embedding, two LSTM layers of 256 units and a
    linear read-out, predicting the next character at every position.

    Input ``(B, T)`` int64 character ids, output ``(B, T, vocab_size)`` logits.
    """

    def __init__(
        self,
        vocab_size: int = 97,
        embed_dim: int = 8,
        hidden_size: int = 256,
        num_layers: int = 2,
        *,
        dp: bool = False,
    ) -> None:
        super().__init__()
        for field, value in (
            ("vocab_size", vocab_size),
            ("embed_dim", embed_dim),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            _check_positive(field, value)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm: nn.Module
        _add_lstm(self, "lstm", embed_dim, hidden_size, num_layers, dp=dp)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Contiguous ids: Opacus' ghost-clipping embedding norm calls .view() on them.
        hidden, _ = self.lstm(self.embedding(tokens.contiguous()))
        out: torch.Tensor = self.head(hidden)
        return out


class SequenceClassifier(nn.Module):
    """An LSTM classifier for short multivariate series, e.g. six months of credit history.

    The top layer's final hidden state summarises the series and a linear
    layer maps it to class logits.

    Input ``(B, T, in_features)`` float32 (``T`` = 6, ``in_features`` = 8 for
    the credit data), output ``(B, num_classes)`` logits.
    """

    def __init__(
        self,
        in_features: int = 8,
        num_classes: int = 2,
        hidden_size: int = 64,
        num_layers: int = 1,
        *,
        dp: bool = False,
    ) -> None:
        super().__init__()
        for field, value in (
            ("in_features", in_features),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            _check_positive(field, value)
        if num_classes < 2:
            raise ConfigError(
                "num_classes", f"must be at least 2, got {num_classes}", "set num_classes >= 2"
            )
        self.lstm: nn.Module
        _add_lstm(self, "lstm", in_features, hidden_size, num_layers, dp=dp)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(series)
        out: torch.Tensor = self.head(h_n[-1])
        return out
