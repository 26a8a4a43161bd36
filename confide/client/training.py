"""Local training and evaluation loops shared by every built-in task.

Every task is classification: images to a digit, a window of characters to the next
character at each position, a six-month repayment history to default / no default.
Logits of shape (B, T, C) are flattened so one loop serves all of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from confide.client.data import ArrayDataset


@dataclass(frozen=True)
class TrainResult:
    """Outcome of local training on one site."""

    loss: float
    accuracy: float
    num_examples: int
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Outcome of evaluating a model on one data set."""

    loss: float
    accuracy: float
    num_examples: int


def _flat(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() == 3:
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    return logits, y


def make_loader(
    data: ArrayDataset, batch_size: int, *, shuffle: bool, seed: int = 0
) -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(data.to_torch(), batch_size=batch_size, shuffle=shuffle, generator=generator)


def train(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    seed: int = 0,
    max_steps: int | None = None,
    clip_grad_norm: float | None = None,
) -> TrainResult:
    """Train ``model`` in place with mini-batch SGD for ``epochs`` passes over ``data``.

    ``max_steps`` caps the number of optimizer steps (quick runs, fair budgets across
    sites of very different sizes). The returned loss and accuracy are averaged over
    the examples seen, weighted per target.
    """
    if len(data) == 0:
        return TrainResult(math.nan, math.nan, 0, 0, 0.0)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    loader = make_loader(data, batch_size, shuffle=True, seed=seed)
    total_loss = 0.0
    correct = 0
    targets = 0
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            logits, flat_y = _flat(model(x), y)
            loss = loss_fn(logits, flat_y)
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            n = flat_y.numel()
            total_loss += float(loss.detach()) * n
            correct += int((logits.detach().argmax(dim=-1) == flat_y).sum())
            targets += n
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.perf_counter() - start
    return TrainResult(total_loss / targets, correct / targets, len(data), steps, seconds)


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayDataset, *, batch_size: int = 256) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` over ``data`` (per target)."""
    if len(data) == 0:
        return EvalResult(math.nan, math.nan, 0)
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    correct = 0
    targets = 0
    for x, y in make_loader(data, batch_size, shuffle=False):
        logits, flat_y = _flat(model(x), y)
        total_loss += float(loss_fn(logits, flat_y))
        correct += int((logits.argmax(dim=-1) == flat_y).sum())
        targets += flat_y.numel()
    return EvalResult(total_loss / targets, correct / targets, len(data))
