"""Book-keeping (``grad_sample_mode="bk"``): the same DP-SGD steps as plain Opacus, in one pass.

Book-keeping computes every example's gradient norm as ghost clipping does
(or from materialised per-sample gradients, layer by layer, whichever is
cheaper) and then forms the clipped sum from what the single backward pass
saw. These tests hold it to plain Opacus (ghost clipping's two passes, and
the hooks mode's materialised per-sample gradients) on the registered
models and on small models that take each of its per-layer paths.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_sgd_reference import steps_with_plain_opacus, steps_with_stepper
from torch import nn

from confide.client.models import MODELS, build_model
from confide.privacy.dp import sgd
from confide.privacy.dp.sgd import DpSgdStepper

VOCAB = 31
SMALL_KWARGS: dict[str, dict[str, Any]] = {
    "char-transformer": {"d_model": 32, "n_heads": 2, "max_len": 16},
    "seq-transformer": {"d_model": 32, "n_heads": 2},
}


class TokenModel(nn.Module):
    """Embedding, LayerNorm, dense layers on every position, a Conv1d, mean-pooled head."""

    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 64)
        self.conv = nn.Conv1d(64, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.up(self.norm(self.embedding(tokens))))  # (B, T, 64)
        x = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # (B, T, 8)
        out: torch.Tensor = self.head(x.mean(dim=1))
        return out


class SequenceTagger(nn.Module):
    """Logits at every position (B, T, C): an example's loss is its mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 12)
        self.norm = nn.LayerNorm(12)
        self.hidden = nn.Linear(12, 40)
        self.out = nn.Linear(40, 7)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.tanh(self.hidden(self.norm(self.embedding(tokens)))))
        return out


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "tokens":
        return TokenModel()
    if name == "tagger":
        return SequenceTagger()
    return build_model(name, dp=True, **SMALL_KWARGS.get(name, {}))


def make_batch(
    name: str, batch_size: int, seed: int = 0, seq_len: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if name in ("tokens", "tagger"):
        x = torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)
        if name == "tagger":
            return x, torch.randint(0, 7, (batch_size, seq_len), generator=gen)
        return x, torch.randint(0, 5, (batch_size,), generator=gen)
    kind = MODELS[name].input_kind
    if kind == "image":
        return torch.randn(batch_size, 1, 28, 28, generator=gen), torch.randint(
            0, 10, (batch_size,), generator=gen
        )
    if kind == "chars":
        tokens = torch.randint(0, 97, (batch_size, 11), generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    series = torch.randn(batch_size, 6, 8, generator=gen)
    return series, (series[:, :, 0].mean(dim=1) > 0).long()


CASES = [
    ("cnn", 10),
    ("cnn-small", 10),
    ("seq-transformer", 6),
    ("char-transformer", 10),
    ("tokens", 3),  # dense layer on 3 positions: ghost norm and book-keeping
    ("tokens", 12),  # on 12 positions: per-sample gradients
    ("tagger", 10),
]


@pytest.mark.parametrize(("name", "seq_len"), CASES)
@pytest.mark.parametrize("reference", ["ghost", "hooks"])
def test_book_keeping_steps_match_plain_opacus(name: str, seq_len: int, reference: str) -> None:
    # Same batches (one empty), same noise generator, momentum: the weights
    # after three steps are Opacus' to float32 rounding.
    batches = [make_batch(name, b, seed=i, seq_len=seq_len) for i, b in enumerate([5, 0, 4])]
    ours = steps_with_stepper(build(name), batches, "bk")
    theirs = steps_with_plain_opacus(build(name), batches, ghost=reference == "ghost")
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_both_linear_paths_are_taken() -> None:
    # The test cases above reach both branches of the per-layer choice.
    a3, g3 = [torch.zeros(2, 3, 16)], torch.zeros(2, 3, 64)
    a12, g12 = [torch.zeros(2, 12, 16)], torch.zeros(2, 12, 64)
    assert not sgd._materialise_linear(a3, g3)
    assert sgd._materialise_linear(a12, g12)
    assert not sgd._materialise_linear([torch.zeros(2, 3136)], torch.zeros(2, 512))


def clipped_sum_one_at_a_time(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> list[torch.Tensor]:
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(len(x)):
        logits = model(x[i : i + 1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i : i + 1].reshape(-1))
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        factor = min(1.0, clip / (norm + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g.double()
    return total


def test_padding_rows_get_no_gradient_and_count_in_no_norm() -> None:
    # An embedding's padding row is never trained: book-keeping neither adds
    # it to the clipped sum nor counts it in an example's norm.
    torch.manual_seed(3)
    model = TokenModel(padding_idx=0)
    x, y = make_batch("tokens", 6, seed=4, seq_len=8)
    x[:, :3] = 0
    reference = clipped_sum_one_at_a_time(model, x, y, clip=0.05)
    with DpSgdStepper(
        model,
        noise_multiplier=0.0,
        clip_norm=0.05,
        expected_batch_size=1.0,
        lr=1.0,
        grad_sample_mode="bk",
    ) as stepper:
        stepper.step(x, y)
        got = [p.grad.detach().clone() for p in model.parameters()]
    assert torch.count_nonzero(got[0][0]) == 0
    for g, r in zip(got, reference, strict=True):
        assert float((g.double() - r).norm() / r.norm().clamp(min=1e-12)) < 1e-5


class Tied(nn.Module):
    """One dense layer applied twice per example: ghost norms cannot be attributed."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))
        return out


def test_auto_falls_back_to_hooks_for_weights_used_twice() -> None:
    model = Tied()
    assert sgd.choose_grad_sample_mode(model, torch.zeros(2, 6)) == "hooks"
    assert sgd.choose_grad_sample_mode(build("tokens"), torch.zeros(2, 5, dtype=torch.long)) == "bk"
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    with DpSgdStepper(
        model, noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=4.0, lr=0.1, example=x
    ) as stepper:
        stepper.step(x, y)
        assert stepper.grad_sample_mode == "hooks"
