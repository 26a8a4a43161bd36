"""Small pre-LayerNorm Transformers built only from layers Opacus computes per-sample gradients for.

Opacus rejects ``nn.MultiheadAttention`` and cannot see a raw ``nn.Parameter``
added in ``forward`` (a learned positional table would silently escape
clipping), so attention here is two ``nn.Linear`` layers around
``F.scaled_dot_product_attention`` and positions come from an ``nn.Embedding``
looked up with one row of position ids per sample. The same modules therefore
serve private and non-private training; the ``dp`` argument exists only so
every model in the registry takes the same arguments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from confide.errors import ConfigError


def _check_dims(d_model: int, n_heads: int, n_layers: int, dropout: float) -> None:
    if n_heads < 1 or d_model < 1 or d_model % n_heads:
        raise ConfigError(
            "d_model",
            f"d_model={d_model} is not a positive multiple of n_heads={n_heads}",
            "choose d_model divisible by n_heads (e.g. d_model=128, n_heads=4)",
        )
    if n_layers < 1:
        raise ConfigError("n_layers", f"must be at least 1, got {n_layers}", "set n_layers >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(
            "dropout", f"must be in [0, 1), got {dropout}", "set dropout to e.g. 0.0 or 0.1"
        )


class SelfAttention(nn.Module):
    """Multi-head self-attention from two linear layers (Opacus-compatible)."""

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        head_dim = d_model // self.n_heads
        q, k, v = (
            self.qkv(x)
            .view(batch, length, 3, self.n_heads, head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal
        )
        out: torch.Tensor = self.proj(attended.transpose(1, 2).reshape(batch, length, d_model))
        return out


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, causal=causal, dropout=dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x)))
        out: torch.Tensor = x + self.mlp(self.ln_mlp(x))
        return out


def _init_weights(model: nn.Module, n_layers: int) -> None:
    """GPT-2 style initialisation: small normal weights, residual projections scaled by depth.

    Keeps the residual stream's scale independent of depth, so the same
    learning rate works for 2 to 4 layers.
    """
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if name.endswith("attn.proj") or name.endswith("mlp.2"):
                std /= math.sqrt(2 * n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)


def _positions(x: torch.Tensor, max_len: int, field: str) -> torch.Tensor:
    batch, length = x.shape[0], x.shape[1]
    if length > max_len:
        raise ValueError(
            f"sequence length {length} exceeds {field}={max_len}; "
            f"build the model with {field} >= {length} or feed shorter sequences"
        )
    # One row of ids per sample, not a shared (T,) vector: Opacus needs the
    # batch dimension on every layer input to attribute gradients to samples.
    # Contiguous, because Opacus' ghost-clipping embedding norm calls .view().
    return torch.arange(length, device=x.device).repeat(batch, 1)


class CharTransformer(nn.Module):
    """A causal character-level Transformer language model (next character at every position).

    Input ``(B, T)`` int64 character ids with ``T <= max_len``, output
    ``(B, T, vocab_size)`` logits.
    """

    def __init__(
        self,
        vocab_size: int = 97,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 128,
        dropout: float = 0.0,
        *,
        dp: bool = False,
    ) -> None:
        super().__init__()
        del dp
        if not 2 <= n_layers <= 4:
            raise ConfigError(
                "n_layers", f"must be between 2 and 4, got {n_layers}", "set n_layers to 2, 3 or 4"
            )
        _check_dims(d_model, n_heads, n_layers, dropout)
        if vocab_size < 2 or max_len < 1:
            raise ConfigError(
                "vocab_size",
                f"vocab_size={vocab_size}, max_len={max_len} are too small",
                "use vocab_size >= 2 and max_len >= 1",
            )
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *(
                TransformerBlock(d_model, n_heads, causal=True, dropout=dropout)
                for _ in range(n_layers)
            )
        )
        self.ln_final = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        _init_weights(self, n_layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = _positions(tokens, self.max_len, "max_len")
        # Contiguous ids: Opacus' ghost-clipping embedding norm calls .view() on them.
        tokens = tokens.contiguous()
        x = self.drop(self.token_embedding(tokens) + self.position_embedding(positions))
        out: torch.Tensor = self.head(self.ln_final(self.blocks(x)))
        return out


class TransformerClassifier(nn.Module):
    """A Transformer encoder classifier for short multivariate series (e.g. credit histories).

    Each step's features are projected to ``d_model``, a learned position
    embedding is added, non-causal blocks mix the steps, and the mean over
    steps feeds a linear head.

    Input ``(B, T, in_features)`` float32 with ``T <= seq_len``, output
    ``(B, num_classes)`` logits.
    """

    def __init__(
        self,
        in_features: int = 8,
        seq_len: int = 6,
        num_classes: int = 2,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.0,
        *,
        dp: bool = False,
    ) -> None:
        super().__init__()
        del dp
        _check_dims(d_model, n_heads, n_layers, dropout)
        if in_features < 1 or seq_len < 1 or num_classes < 2:
            raise ConfigError(
                "in_features",
                f"in_features={in_features}, seq_len={seq_len}, num_classes={num_classes} "
                "are out of range",
                "use in_features >= 1, seq_len >= 1 and num_classes >= 2",
            )
        self.seq_len = seq_len
        self.input_projection = nn.Linear(in_features, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *(
                TransformerBlock(d_model, n_heads, causal=False, dropout=dropout)
                for _ in range(n_layers)
            )
        )
        self.ln_final = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        _init_weights(self, n_layers)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        positions = _positions(series, self.seq_len, "seq_len")
        x = self.drop(self.input_projection(series) + self.position_embedding(positions))
        pooled = self.ln_final(self.blocks(x)).mean(dim=1)
        out: torch.Tensor = self.head(pooled)
        return out
