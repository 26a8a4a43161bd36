"""DP-SGD steps two ways, for the tests that hold ``DpSgdStepper`` to plain Opacus: the
same batches (empty ones included) and the same noise generator through our stepper and
through Opacus' own modules and optimizers, as its tutorials use them."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from confide.privacy.dp.sgd import DpSgdStepper


def weights(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


def steps_with_stepper(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], mode: str
) -> list[np.ndarray]:
    with DpSgdStepper(
        model,
        noise_multiplier=0.5,
        clip_norm=0.7,
        expected_batch_size=3.5,
        lr=0.3,
        momentum=0.5,
        grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(7),
    ) as stepper:
        for x, y in batches:
            stepper.step(x, y)
    return weights(model)


def steps_with_plain_opacus(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], *, ghost: bool
) -> list[np.ndarray]:
    """Opacus' own modules and optimizers, as its tutorials use them."""
    settings: dict[str, Any] = {
        "noise_multiplier": 0.5,
        "max_grad_norm": 0.7,
        "expected_batch_size": 3.5,
        "generator": torch.Generator().manual_seed(7),
    }
    module: Any = (
        GradSampleModuleFastGradientClipping(model, max_grad_norm=0.7)
        if ghost
        else GradSampleModule(model)
    )
    base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    optimizer: Any = (DPOptimizerFastGradientClipping if ghost else DPOptimizer)(base, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in batches:
            optimizer.zero_grad()
            if len(x) == 0:
                for p in model.parameters():
                    if ghost:
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = p.new_zeros((0, *p.shape))
            else:
                logits = module(x)
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
                ).view(len(x), -1)
                per_example = loss.mean(dim=1)
                if ghost:
                    DPTensorFastGradientClipping(module, optimizer, per_example, "mean").backward()
                else:
                    per_example.mean().backward()
            optimizer.step()
    return weights(model)
