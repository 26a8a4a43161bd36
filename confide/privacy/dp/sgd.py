"""Example-level DP-SGD for one site's local training: Poisson sampling, per-sample clipping, noise.

:func:`train_private` is the one entry point: it trains a ``dp=True`` model
from :func:`confide.client.models.build_model` in place with Opacus, exactly
as the round's plan says (noise multiplier σ, sampling rate q, number of
steps, clip norm C), so the privacy ledger can account for precisely the
mechanism that ran: ``steps`` compositions of the Poisson-subsampled
Gaussian mechanism. Each step

1. draws a batch by including every one of the N examples independently
   with probability q (Opacus' ``UniformWithReplacementSampler``; a batch may
   be empty, and the step still happens),
2. clips every example's gradient to L2 norm C (for a sequence model an
   example is a whole sequence, its loss the mean over its positions),
3. sums them, adds N(0, σ²C²) noise to every coordinate, divides by the
   *expected* batch size qN (never the realised one, which would leak it),
4. takes an SGD (momentum) step.

How the per-sample norms are obtained is an implementation choice that does
not change the mechanism: ``grad_sample_mode`` selects Opacus' hooks
(per-sample gradients materialised), ghost clipping (norms without
per-sample gradients, then a second backward pass of the reweighted loss),
functorch, or ``bk``, book-keeping (ghost norms or per-sample gradients,
whichever is cheaper per layer, and the clipped sum formed from what the
one backward pass saw); ``"auto"`` picks the fastest one for the model (see
:func:`choose_grad_sample_mode`). :class:`DpSgdStepper` is the step itself,
exposed so benchmarks time the very code a site runs.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module import create_or_accumulate_grad_sample
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from confide.client.data import ArrayDataset
from confide.errors import ConfigError

__all__ = [
    "GRAD_SAMPLE_MODES",
    "DpSgdStepper",
    "PrivateTrainResult",
    "StepStats",
    "choose_grad_sample_mode",
    "train_private",
]

GRAD_SAMPLE_MODES: Final = ("auto", "hooks", "ghost", "bk", "functorch")
"""Accepted ``grad_sample_mode`` values: Opacus' own names, ``bk`` (book-keeping) and ``auto``."""


@dataclass(frozen=True)
class PrivateTrainResult:
    """Outcome of private local training on one site.

    ``loss`` and ``accuracy`` are averaged over the examples the Poisson
    batches contained (per target, like :func:`confide.client.training.train`),
    before each step's update; ``num_examples`` is the data set size N.
    """

    loss: float
    accuracy: float
    num_examples: int
    steps: int
    seconds: float
    noise_multiplier: float
    sample_rate: float
    clip_norm: float
    grad_sample_mode: str
    examples_seen: int


# --- choosing how per-sample norms are computed -----------------------------------------------


def choose_grad_sample_mode(model: nn.Module, example: torch.Tensor) -> str:
    """The fastest mode for ``model`` (what ``"auto"`` runs): ``bk`` unless weights are shared.

    ``bk`` (book-keeping, :class:`_BookKeepingGradSampleModule`) decides per
    layer what Opacus' ``hooks`` and ``ghost`` modes decide for the whole
    model: it materialises per-sample gradients where they are cheap
    (convolutions, normalisation layers, dense layers applied at many
    positions) and takes ghost norms where they are not (dense layers on
    one vector or a few positions, embeddings), and it needs one backward
    pass where ghost clipping needs two. Measured with
    benchmarks/train_throughput.py it is at least as fast as the better of
    the two on every registered model.

    Like ghost clipping it cannot attribute the ghost norm of a dense or
    embedding layer that one example uses several times (shared weights, or
    a layer called in a loop): then the ``hooks`` mode runs. ``example`` is
    one input batch (one example is enough); a forward pass on it (no
    backward, eval mode, so no randomness is drawn) counts the calls.
    """
    ghost_types = set(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
    calls: dict[int, int] = {}

    def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if type(module) in ghost_types:  # Opacus matches layer types exactly
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    calls[id(p)] = calls.get(id(p), 0) + 1

    handles = [m.register_forward_hook(record) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return "hooks" if any(n > 1 for n in calls.values()) else "bk"


# --- Opacus, with faster per-layer rules and noise ------------------------------------------
#
# The classes below are Opacus' own (GradSampleModule, its ghost-clipping
# variant, DPOptimizer and its ghost-clipping variant). What they compute is
# unchanged: the same per-sample norms, clip factors min(1, C / (norm + 1e-6)),
# clipped sums, noise values (same generator, calls and order) and division
# by qN. tests/test_dp_sgd.py checks the weights against plain Opacus after
# several steps (equal to 1e-6; a few formulas round differently in the last
# bit). How it is computed changes:
#
# * per-sample gradients are handed to Opacus as computed, instead of being
#   copied into a freshly zeroed tensor of the batch size (Opacus does that
#   for layers called several times per batch, which still take that path);
# * ghost norms of linear layers use the cheaper of the Gram-matrix and the
#   materialised formula, and embedding norms a 1-D ``unique`` over
#   (example, row) keys instead of a row-wise one over pairs (milliseconds
#   per step on CPU);
# * the backward pass that feeds the hooks stops at the lowest layers'
#   outputs (see DpSgdStepper._backprop_to_hooks): the batch gradients it
#   would also compute are discarded by DP-SGD anyway;
# * the clipped sum is a matrix-vector product per parameter, and ghost
#   clipping's optimizer reuses the gradient tensor instead of copying it;
# * book-keeping (``bk``, not in Opacus) replaces ghost clipping's second
#   backward pass by one product per layer (see _BookKeepingGradSampleModule);
# * for large models, each step's noise is drawn one step ahead in a helper
#   thread while the main thread runs the forward and backward passes (for
#   the 1.66M-parameter CNN the noise alone takes about as long as a plain
#   SGD step at B=10).

SamplerFn = Callable[
    [nn.Module, list[torch.Tensor], torch.Tensor], dict[torch.Tensor, torch.Tensor]
]


class _HandOver:
    """A grad sampler that stores each per-sample gradient on its parameter directly."""

    def __init__(self, sampler: SamplerFn) -> None:
        self.sampler = sampler

    def __call__(
        self, layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
    ) -> dict[torch.Tensor, torch.Tensor]:
        rest = {}
        for param, grad_sample in self.sampler(layer, activations, backprops).items():
            if (
                param.requires_grad
                and not hasattr(param, "_current_grad_sample")
                and grad_sample.shape[0] == layer.max_batch_len
            ):
                param._current_grad_sample = grad_sample  # type: ignore[attr-defined]
            else:  # a second call in the same batch: Opacus accumulates
                rest[param] = grad_sample
        return rest


def _embedding_norm_sample(
    layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradient norms of an embedding (rows hit twice in one example add up first)."""
    if not layer.weight.requires_grad:
        return {}
    ids = activations[0]
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    grads = backprops.reshape(-1, layer.embedding_dim)
    if layer.padding_idx is not None:
        grads = grads * (ids.reshape(-1, 1) != layer.padding_idx)
    rows = torch.arange(batch, device=ids.device).unsqueeze(1)
    keys = (rows * layer.num_embeddings + ids).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = grads.new_zeros(len(unique), layer.embedding_dim).index_add_(0, inverse, grads)
    norms_sq = grads.new_zeros(batch).index_add_(
        0, unique // layer.num_embeddings, summed.square().sum(dim=1)
    )
    return {layer.weight: norms_sq.sqrt()}


def _linear_norm_sample(
    layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradient norms of a linear layer, by the cheaper of two exact formulas.

    For one vector per example the weight norm is ``|a| |g|``. For a sequence
    of ``T`` vectors it is ``sum_ts (a_t.a_s)(g_t.g_s)`` (ghost norm, ``T^2``
    Gram matrices) or the norm of the materialised ``g^T a``, whichever
    costs fewer multiplications; the bias gradient ``sum_t g_t`` is formed
    directly. Opacus' rule computes the same with generic einsums, and
    always the Gram matrices.
    """
    g = backprops
    a = activations[0].to(g.dtype)
    batch = g.shape[0]
    ret: dict[torch.Tensor, torch.Tensor] = {}
    if g.dim() == 2:
        g_sq = g.square().sum(dim=1)
        if layer.weight.requires_grad:
            ret[layer.weight] = (g_sq * a.square().sum(dim=1)).sqrt()
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = g_sq.sqrt()
        return ret
    g = g.reshape(batch, -1, g.shape[-1])
    a = a.reshape(batch, -1, a.shape[-1])
    steps, d_out, d_in = g.shape[1], g.shape[2], a.shape[2]
    if layer.weight.requires_grad:
        if steps * (d_in + d_out) < d_in * d_out:
            gram = torch.bmm(g, g.transpose(1, 2)).mul_(torch.bmm(a, a.transpose(1, 2)))
            w_sq = gram.sum(dim=(1, 2)).clamp_(min=0)
        else:
            w_sq = torch.bmm(g.transpose(1, 2), a).square_().sum(dim=(1, 2))
        ret[layer.weight] = w_sq.sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(dim=1).square_().sum(dim=1).sqrt()
    return ret


def _hand_over(samplers: dict[type, SamplerFn]) -> dict[type, SamplerFn]:
    return {layer_type: _HandOver(fn) for layer_type, fn in samplers.items()}


class _GradSampleModule(GradSampleModule):  # type: ignore[misc]
    """Opacus' hooks-mode ``GradSampleModule`` with per-sample gradients handed over as computed."""

    def __init__(self, model: nn.Module, *, functorch: bool) -> None:
        # Read at construction, so samplers registered since import (the LSTM's) are included.
        self.GRAD_SAMPLERS = _hand_over(GradSampleModule.GRAD_SAMPLERS)
        super().__init__(
            model, batch_first=True, loss_reduction="mean", strict=True, force_functorch=functorch
        )


class _GhostGradSampleModule(GradSampleModuleFastGradientClipping):  # type: ignore[misc]
    """Opacus' ghost-clipping module with a faster embedding norm and handed-over gradients."""

    def __init__(self, model: nn.Module, *, clip_norm: float) -> None:
        self.GRAD_SAMPLERS = _hand_over(GradSampleModuleFastGradientClipping.GRAD_SAMPLERS)
        # Every layer that uses Opacus' nn.Linear norm rule (nn.Linear, the
        # LSTM's recurrent weights) gets the faster one.
        self.NORM_SAMPLERS = {
            layer_type: _linear_norm_sample if fn is compute_linear_norm_sample else fn
            for layer_type, fn in GradSampleModuleFastGradientClipping.NORM_SAMPLERS.items()
        }
        self.NORM_SAMPLERS[nn.Embedding] = _embedding_norm_sample
        super().__init__(
            model,
            batch_first=True,
            loss_reduction="mean",
            strict=True,
            max_grad_norm=clip_norm,
            use_ghost_clipping=True,
        )


def _linear_clipped_sum(
    layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor, coef: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """``sum_i c_i g_i^T a_i`` (and ``sum_i c_i sum_t g_it``): one matrix product for the batch.

    The backprops are scaled by the examples' clip factors, then multiplied
    with the activations over every (example, position) at once, as the
    weight gradient of a plain backward pass is.
    """
    g = backprops * coef.view(-1, *([1] * (backprops.dim() - 1)))
    g = g.reshape(-1, g.shape[-1])
    ret: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        a = activations[0].to(g.dtype)
        ret[layer.weight] = torch.mm(g.t(), a.reshape(-1, a.shape[-1]))
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(dim=0)
    return ret


def _embedding_clipped_sum(
    layer: nn.Embedding,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
    coef: torch.Tensor,
) -> dict[torch.Tensor, torch.Tensor]:
    """``sum_i c_i`` (example i's embedding gradient): the clip-scaled rows added at their ids."""
    if not layer.weight.requires_grad:
        return {}
    ids = activations[0].reshape(-1)
    g = backprops * coef.view(-1, *([1] * (backprops.dim() - 1)))
    g = g.reshape(-1, layer.embedding_dim)
    if layer.padding_idx is not None:
        g = g * (ids != layer.padding_idx).unsqueeze(1)
    return {layer.weight: g.new_zeros(layer.weight.shape).index_add_(0, ids, g)}


def _linear_grad_sample(
    layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a linear layer on sequences: one batched product per example."""
    g = backprops
    a = activations[0].to(g.dtype)
    batch = g.shape[0]
    g = g.reshape(batch, -1, g.shape[-1])
    ret: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.bmm(g.transpose(1, 2), a.reshape(batch, -1, a.shape[-1]))
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(dim=1)
    return ret


def _materialise_linear(activations: list[torch.Tensor], backprops: torch.Tensor) -> bool:
    """Whether per-sample gradients beat ghost norms plus book-keeping for this linear layer.

    Per example, ghost norms cost ``T^2 (d_in + d_out)`` multiplications and
    the book-keeping sum ``T d_in d_out``; materialising costs ``T d_in d_out``
    and the clip-weighted sum ``d_in d_out``. On one vector per example
    (``T = 1``) the norm is a product of two vector norms: never materialise.
    """
    if backprops.dim() <= 2 or backprops.shape[0] == 0:
        return False
    d_out, d_in = backprops.shape[-1], activations[0].shape[-1]
    steps = backprops.numel() // (backprops.shape[0] * d_out)
    return steps > 1 and d_in * d_out < steps * steps * (d_in + d_out)


# (layer, activations, backprops, clip factors) -> {parameter: clipped sum}
ClippedSumFn = Callable[..., dict[torch.Tensor, torch.Tensor]]


class _BookKeepingGradSampleModule(_GhostGradSampleModule):
    """Ghost clipping's norms, then the clipped sum from what the hooks saw: one backward pass.

    Book-keeping (Bu et al., 2022): the first (and only) backward pass runs
    the same hooks as ghost clipping, which compute every example's gradient
    norm per layer. Instead of discarding what they were computed from and
    backpropagating the reweighted loss a second time, each hook keeps its
    layer's activations and output gradients (linear and embedding layers,
    whose per-sample gradients are never formed) or the per-sample gradients
    it materialised anyway for the norm (convolutions, normalisation
    layers), and :meth:`write_clipped_sum` forms ``sum_i c_i g_i`` from them
    once the clip factors ``c`` are known: one matrix product per linear
    layer, one matrix-vector product per materialised gradient. The same
    sum as ghost clipping's second pass, without its backpropagation through
    every layer's inputs.
    """

    def __init__(self, model: nn.Module, *, clip_norm: float) -> None:
        super().__init__(model, clip_norm=clip_norm)
        self.CLIPPED_SUMS: dict[type, ClippedSumFn] = {
            layer_type: _linear_clipped_sum
            for layer_type, fn in self.NORM_SAMPLERS.items()
            if fn is _linear_norm_sample
        }
        self.CLIPPED_SUMS[nn.Embedding] = _embedding_clipped_sum
        self._kept: list[tuple[ClippedSumFn, nn.Module, list[torch.Tensor], torch.Tensor]] = []
        self._materialised: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture_backprops_hook(
        self,
        module: nn.Module,
        _forward_input: torch.Tensor,
        forward_output: torch.Tensor,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        if not self.hooks_enabled:
            return
        backprops = forward_output[0].detach()
        activations, backprops = self.rearrange_grad_samples(
            module=module,
            backprops=backprops,
            loss_reduction=loss_reduction,
            batch_first=batch_first,
        )
        clipped_sum = self.CLIPPED_SUMS.get(type(module))
        if clipped_sum is _linear_clipped_sum and _materialise_linear(activations, backprops):
            grads = _linear_grad_sample(module, activations, backprops)  # type: ignore[arg-type]
            self._keep_grad_samples(module, grads)
        elif clipped_sum is not None:
            norm_sampler: Any = self.NORM_SAMPLERS[type(module)]
            for param, norm in norm_sampler(module, activations, backprops).items():
                if param.requires_grad:
                    param._norm_sample = norm
                    param._forward_counter -= 1
            self._kept.append((clipped_sum, module, activations, backprops))
        else:
            grad_sampler = self.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient)
            self._keep_grad_samples(module, grad_sampler(module, activations, backprops))
        if not module.activations and hasattr(module, "max_batch_len"):
            del module.max_batch_len

    def _keep_grad_samples(
        self, module: nn.Module, grad_samples: dict[torch.Tensor, torch.Tensor]
    ) -> None:
        # Opacus' accumulation for a layer called several times per batch
        # (its per-sample gradients add up over the calls), norms at the last call.
        for param, grad_sample in grad_samples.items():
            if (
                param.requires_grad
                and not hasattr(param, "_current_grad_sample")
                and grad_sample.shape[0] == module.max_batch_len
            ):
                param._current_grad_sample = grad_sample  # type: ignore[attr-defined]
            else:
                create_or_accumulate_grad_sample(
                    param=param, grad_sample=grad_sample, max_batch_len=module.max_batch_len
                )
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            p._forward_counter -= 1  # type: ignore[attr-defined]
            if p._forward_counter == 0:  # type: ignore[attr-defined]
                grad_sample = p._current_grad_sample  # type: ignore[attr-defined]
                del p._current_grad_sample  # type: ignore[attr-defined]
                flat = grad_sample.reshape(len(grad_sample), -1)
                p._norm_sample = flat.norm(2, dim=-1)  # type: ignore[attr-defined]
                self._materialised.append((p, flat))

    def write_clipped_sum(self, coef: torch.Tensor) -> None:
        """Set every parameter's ``.grad`` to the sum of its clip-scaled per-sample gradients."""
        for param, flat in self._materialised:
            param.grad = (coef.to(flat.dtype) @ flat).view_as(param)
        for clipped_sum, module, activations, backprops in self._kept:
            for param, grad in clipped_sum(module, activations, backprops, coef).items():
                param.grad = grad.view_as(param)
        self.forget()

    def forget(self) -> None:
        """Drop what the hooks kept (after the sum, or when a step is abandoned)."""
        self._kept.clear()
        self._materialised.clear()


class _NoiseStream:
    """Each step's Gaussian noise, one tensor per parameter, drawn one step ahead.

    The draws are exactly Opacus' (``torch.normal(0, std, shape, generator)``
    per parameter, in order, non-secure mode), only made by a helper thread
    while the previous step computes; nothing else touches the generator.
    Below ``_PREFETCH_MIN_NUMEL`` coordinates the hand-over between threads
    costs more than the draw, which then happens in place, as in Opacus.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], std: float, generator: torch.Generator
    ) -> None:
        self._like = [(p.shape, p.dtype, p.device) for p in params]
        self._std = std
        self._generator = generator
        self._executor: ThreadPoolExecutor | None = None
        self._next: Future[list[torch.Tensor]] | None = None
        if std and sum(p.numel() for p in params) >= _PREFETCH_MIN_NUMEL:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dp-noise")
            self._next = self._executor.submit(self._draw)

    def _draw(self) -> list[torch.Tensor]:
        if self._std == 0:
            return [
                torch.zeros(shape, dtype=dtype, device=device)
                for shape, dtype, device in self._like
            ]
        return [
            torch.normal(
                mean=0.0,
                std=self._std,
                size=shape,
                generator=self._generator,
                dtype=dtype,
                device=device,
            )
            for shape, dtype, device in self._like
        ]

    def take(self) -> list[torch.Tensor]:
        """This step's noise; starts drawing the next step's."""
        if self._executor is None or self._next is None:
            return self._draw()
        noise = self._next.result()
        self._next = self._executor.submit(self._draw)
        return noise

    def close(self) -> None:
        if self._executor is not None and self._next is not None:
            self._next.cancel()
            self._executor.shutdown(wait=True)


# About 1 ms of drawing on a current CPU core (torch.normal: ~4 ns per value).
_PREFETCH_MIN_NUMEL: Final = 250_000


class _StreamedNoise:
    """``DPOptimizer.add_noise`` with the noise taken from a :class:`_NoiseStream`."""

    params: list[nn.Parameter]
    noise_stream: _NoiseStream

    def add_noise(self) -> None:
        for p, noise in zip(self.params, self.noise_stream.take(), strict=True):
            _check_processed_flag(p.summed_grad)  # type: ignore[attr-defined]
            p.grad = noise.add_(p.summed_grad).view_as(p)  # type: ignore[attr-defined]
            _mark_as_processed(p.summed_grad)  # type: ignore[attr-defined]


class _DPOptimizer(_StreamedNoise, DPOptimizer):  # type: ignore[misc]
    """Opacus' ``DPOptimizer`` (clip per sample, sum, noise, divide) with streamed noise."""

    def clip_and_accumulate(self) -> None:
        # Opacus' computation (same norms, same min(1, C / (norm + 1e-6)) factors,
        # same sum), with the per-sample gradients listed once and each
        # weighted sum a matrix-vector product instead of a parsed einsum.
        grad_samples: list[torch.Tensor] = self.grad_samples
        batch = len(grad_samples[0])
        if batch == 0:
            factor = grad_samples[0].new_zeros(0)
        else:
            norms = torch.stack([g.reshape(batch, -1).norm(2, dim=-1) for g in grad_samples], dim=1)
            factor = (self.max_grad_norm / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
        for p, grad_sample in zip(self.params, grad_samples, strict=True):
            _check_processed_flag(p.grad_sample)  # type: ignore[attr-defined]
            flat = grad_sample.reshape(batch, p.numel()).to(p.dtype)
            grad = (factor.to(p.dtype) @ flat).view_as(p)
            if p.summed_grad is None:  # type: ignore[attr-defined]
                p.summed_grad = grad  # type: ignore[attr-defined]
            else:
                p.summed_grad += grad  # type: ignore[attr-defined]
            _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]


class _GhostDPOptimizer(_StreamedNoise, DPOptimizerFastGradientClipping):  # type: ignore[misc]
    """Opacus' ghost-clipping optimizer (noise, divide) with streamed noise and no grad copies."""

    def accumulate(self) -> None:
        # Opacus deep-copies p.grad here; add_noise replaces p.grad right after,
        # so the gradient tensor itself can serve as the sum.
        for p in self.params:
            if p.summed_grad is None:  # type: ignore[attr-defined]
                p.summed_grad = p.grad  # type: ignore[attr-defined]
            else:
                p.summed_grad.add_(p.grad)  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = False) -> None:
        # Ghost clipping calls zero_grad() between its two backward passes;
        # dropping the first pass' gradients beats zeroing them for accumulation.
        super().zero_grad(set_to_none=True)


def _make_optimizer(
    ghost: bool, params: list[nn.Parameter], noise_stream: _NoiseStream, **kwargs: Any
) -> DPOptimizer:
    cls = _GhostDPOptimizer if ghost else _DPOptimizer
    optimizer = cls(**kwargs)
    optimizer.noise_stream = noise_stream
    return optimizer


# --- the step ---------------------------------------------------------------------------------


def _per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per example ``(B,)`` and per target (flattened, for the statistics).

    For ``(B, T, C)`` logits an example is the whole sequence and its loss the
    mean over its ``T`` positions, so clipping bounds each sequence's influence
    (a character-level clip would let one sequence contribute ``T`` times).
    Averaging these over the batch gives the same loss as the flattened mean
    of :func:`confide.client.training.train`.
    """
    if logits.dim() == 3:
        batch, steps, classes = logits.shape
        per_target = F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1), reduction="none")
        return per_target.view(batch, steps).mean(dim=1), per_target
    per_target = F.cross_entropy(logits, y, reduction="none")
    return per_target, per_target


@dataclass
class StepStats:
    """Per-target loss sum, correct predictions and targets of one batch (before its update)."""

    loss_sum: float = 0.0
    correct: int = 0
    targets: int = 0


def _silence_known_warnings() -> None:
    """Ignore the two harmless warnings DP steps trigger on every round, by exact message.

    Installed when a stepper is made (idempotent: ``filterwarnings`` drops an
    identical entry before inserting), not around each step: a
    ``catch_warnings`` per step is not thread-safe (sites may train in
    threads), and every change to the filters makes Python forget which
    warnings it has already shown, so they would come back every round.
    """
    # A layer fed only tensors that need no gradient (data, token ids, the
    # LSTM's detached states) has its full backward hook fire on the output
    # gradient, which is exactly what Opacus uses. torch attributes the
    # warning to a caller a fixed number of frames up, which depends on the
    # call path, so it is matched by message alone.
    warnings.filterwarnings(
        "ignore",
        message="Full backward hook is firing when gradients are computed with respect "
        "to module outputs since no inputs require gradients",
        category=UserWarning,
    )
    # functorch mode asks for autocast to the dtype of integer token ids, and
    # torch declines: the layer simply runs in float32.
    warnings.filterwarnings(
        "ignore",
        message="In CPU autocast, but the target dtype is not supported",
        category=UserWarning,
        module=r"opacus\.grad_sample\.functorch",
    )


class DpSgdStepper:
    """One DP-SGD step at a time on ``model``: the engine of :func:`train_private`.

    Wraps ``model`` with Opacus (a ``GradSampleModule`` or its ghost-clipping
    variant, and a ``DPOptimizer`` around SGD) until :meth:`close`, which
    removes every hook and attribute Opacus added. Use it as a context
    manager. ``expected_batch_size`` is qN, the divisor of the noisy sum;
    ``example`` (any input batch) lets ``grad_sample_mode="auto"`` choose.
    Arguments are not validated here (:func:`train_private` does): tests use
    ``noise_multiplier=0`` to see the clipped sum alone.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        noise_multiplier: float,
        clip_norm: float,
        expected_batch_size: float,
        lr: float,
        momentum: float = 0.0,
        grad_sample_mode: str = "auto",
        example: torch.Tensor | None = None,
        noise_generator: torch.Generator | None = None,
    ) -> None:
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(
                "grad_sample_mode",
                f"unknown mode '{grad_sample_mode}'",
                f"use one of: {', '.join(GRAD_SAMPLE_MODES)}",
            )
        _check_dp_compatible(model)
        _silence_known_warnings()
        self.model = model
        if grad_sample_mode == "auto":
            if example is None:
                raise ConfigError(
                    "example",
                    'grad_sample_mode="auto" needs an example input to choose the mode',
                    "pass example=<one input batch>, or name the mode",
                )
            grad_sample_mode = choose_grad_sample_mode(model, example)
        self.grad_sample_mode = grad_sample_mode
        self._was_training = model.training
        self._had_activations = {id(m) for m in model.modules() if hasattr(m, "activations")}
        model.train()
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._bk = self.grad_sample_mode == "bk"
        # Book-keeping is ghost clipping's module and optimizer with the second pass replaced.
        self._ghost = self.grad_sample_mode in ("ghost", "bk")
        self._module: AbstractGradSampleModule
        self._bk_module: _BookKeepingGradSampleModule | None = None
        if self._bk:
            self._module = self._bk_module = _BookKeepingGradSampleModule(
                model, clip_norm=clip_norm
            )
        elif self._ghost:
            self._module = _GhostGradSampleModule(model, clip_norm=clip_norm)
        else:
            self._module = _GradSampleModule(model, functorch=self.grad_sample_mode == "functorch")
        if noise_generator is None:  # its own stream: the helper thread must not share torch's
            seed = int(torch.randint(0, 2**62, (1,)))
            noise_generator = torch.Generator().manual_seed(seed)
        self._noise = _NoiseStream(self._params, noise_multiplier * clip_norm, noise_generator)
        self._optimizer = _make_optimizer(
            self._ghost,
            self._params,
            self._noise,
            optimizer=torch.optim.SGD(self._params, lr=lr, momentum=momentum),
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip_norm,
            expected_batch_size=expected_batch_size,  # qN itself, not Opacus' int(qN)
            loss_reduction="mean",
            generator=noise_generator,
        )
        self._roots: list[torch.Tensor] = []
        self._root_hooks = [
            m.register_forward_hook(self._record_root)
            for m in model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self._closed = False

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One DP-SGD step on the (Poisson) batch ``x, y``; an empty batch is a noise-only step."""
        optimizer = self._optimizer
        optimizer.zero_grad(set_to_none=True)
        if len(x) == 0:
            self._zero_gradients()
            optimizer.step()
            return StepStats()
        self._roots.clear()
        logits = self._module(x)
        per_sample, per_target = _per_sample_loss(logits, y)
        if self._bk_module is not None:
            # One pass: the hooks compute the norms and keep what the clipped sum needs.
            module = self._bk_module
            try:
                self._backprop_to_hooks(per_sample.mean(), retain_graph=False)
                module.write_clipped_sum(module.get_clipping_coef())
            finally:
                module.forget()
        elif self._ghost:
            # Opacus' two passes (DPTensorFastGradientClipping.backward): the
            # hooks compute per-sample norms in the first, then the loss
            # reweighted by each example's clip factor is backpropagated
            # with the hooks off, which sums the clipped gradients into .grad.
            self._backprop_to_hooks(per_sample.mean(), retain_graph=True)
            coef: torch.Tensor = self._module.get_clipping_coef()
            self._module.disable_hooks()
            try:
                torch.autograd.backward((coef * per_sample).sum())
            finally:
                self._module.enable_hooks()
        else:
            self._backprop_to_hooks(per_sample.mean(), retain_graph=False)
        optimizer.step()
        with torch.no_grad():
            flat = logits.reshape(-1, logits.shape[-1])
            correct = int((flat.argmax(dim=-1) == y.reshape(-1)).sum())
        return StepStats(float(per_target.detach().sum()), correct, per_target.numel())

    def _backprop_to_hooks(self, loss: torch.Tensor, *, retain_graph: bool) -> None:
        """Backpropagate only as far as Opacus' hooks need: to every layer's output.

        The per-sample rules need each layer's output gradient; the batch
        gradients ``.grad`` that a full ``backward()`` would also compute are
        thrown away by the DP optimizer (hooks) or recomputed by the second
        pass (ghost). Asking autograd for the gradients of the lowest layers'
        outputs runs every hook and skips all weight-gradient products.
        """
        if self._roots:
            torch.autograd.grad(loss, self._roots, retain_graph=retain_graph, allow_unused=True)
        else:  # the input itself requires grad: nothing is below the hooks
            torch.autograd.backward(loss, retain_graph=retain_graph)

    def _record_root(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        # A trainable layer fed only by tensors that need no gradient (data,
        # token ids, detached states) sits at the bottom of the graph.
        if not (module.training and torch.is_grad_enabled()):
            return
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return
        outputs = output if isinstance(output, tuple) else (output,)
        self._roots.extend(t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad)

    def _zero_gradients(self) -> None:
        # What an empty Poisson batch contributes: nothing, so the step adds noise only.
        for p in self._params:
            if self._ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]

    def close(self) -> None:
        """Remove Opacus' hooks and attributes; the model is left as it was built, trained."""
        if self._closed:
            return
        self._closed = True
        for handle in self._root_hooks:
            handle.remove()
        self._roots.clear()
        self._noise.close()
        self._module._close()
        for p in self.model.parameters():
            p.grad = None
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        for m in self.model.modules():
            if id(m) not in self._had_activations and hasattr(m, "activations"):
                del m.activations
            if hasattr(m, "max_batch_len"):
                del m.max_batch_len
        self.model.train(self._was_training)

    def __enter__(self) -> DpSgdStepper:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_dp_compatible(model: nn.Module) -> None:
    was_training = model.training
    model.train()
    try:
        errors = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(was_training)
    if errors:
        raise ConfigError(
            "model",
            f"not trainable with per-sample clipping: {'; '.join(str(e) for e in errors)}",
            "build the model with build_model(name, dp=True)",
        )


# --- the entry point --------------------------------------------------------------------------


def _validate(
    model: nn.Module,
    data: ArrayDataset,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    clip_norm: float,
    lr: float,
    momentum: float,
) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(
            "noise_multiplier",
            f"must be a positive number, got {noise_multiplier}",
            "set noise_multiplier > 0 (e.g. 1.0); without noise there is no privacy guarantee",
        )
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ConfigError(
            "sample_rate",
            f"must be in (0, 1], got {sample_rate}",
            "set sample_rate to batch size / data set size, e.g. 0.01",
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError("steps", f"must be a positive integer, got {steps!r}", "set steps >= 1")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(
            "clip_norm",
            f"must be a positive number, got {clip_norm}",
            "set clip_norm > 0 (e.g. 1.0)",
        )
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError("lr", f"must be a positive number, got {lr}", "set lr > 0 (e.g. 0.1)")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise ConfigError(
            "momentum", f"must be in [0, 1), got {momentum}", "set momentum to e.g. 0.0 or 0.9"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "model",
            "has no trainable parameters",
            "pass a model from build_model(name, dp=True)",
        )
    if len(data) == 0:
        raise ConfigError(
            "data",
            "the training set is empty",
            "give the site at least one training example, or leave it out of the round",
        )


def _seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for batch sampling, noise and the model's own randomness (dropout)."""
    sampling, noise, forward = np.random.SeedSequence(seed % (1 << 128)).generate_state(3)
    return int(sampling), int(noise), int(forward)


def train_private(
    model: nn.Module,
    data: ArrayDataset,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    clip_norm: float,
    lr: float,
    momentum: float = 0.0,
    seed: int = 0,
    grad_sample_mode: str = "auto",
) -> PrivateTrainResult:
    """Train ``model`` in place with DP-SGD: ``steps`` Poisson-sampled, clipped, noised steps.

    ``model`` must come from ``build_model(name, dp=True)`` (or pass Opacus'
    validator); afterwards ``get_weights(model)`` returns the trained weights
    and the model carries no Opacus hooks. Sampling, noise and dropout are
    drawn from ``seed`` alone, so the same call gives the same weights
    (torch's global RNG is left untouched). The noise comes from torch's
    ordinary PRNG, not a cryptographically secure one, which is what makes
    runs reproducible.

    Raises :class:`~confide.errors.ConfigError` naming the bad argument.
    """
    _validate(model, data, noise_multiplier, sample_rate, steps, clip_norm, lr, momentum)
    start = time.perf_counter()
    n = len(data)
    x_all, y_all = data.to_torch().tensors
    device = next(model.parameters()).device
    sampling_seed, noise_seed, forward_seed = _seeds(seed)
    sampling_gen = torch.Generator().manual_seed(sampling_seed)
    noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
    totals = StepStats()
    examples_seen = 0
    done = 0
    with (
        torch.random.fork_rng(devices=[]),
        DpSgdStepper(
            model,
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            expected_batch_size=sample_rate * n,
            lr=lr,
            momentum=momentum,
            grad_sample_mode=grad_sample_mode,
            example=x_all[:1].to(device),
            noise_generator=noise_gen,
        ) as stepper,
    ):
        torch.manual_seed(forward_seed)
        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=sample_rate, generator=sampling_gen, steps=steps
        )
        for indices in sampler:
            idx = torch.as_tensor(indices, dtype=torch.long)
            stats = stepper.step(x_all[idx].to(device), y_all[idx].to(device))
            totals.loss_sum += stats.loss_sum
            totals.correct += stats.correct
            totals.targets += stats.targets
            examples_seen += len(indices)
            done += 1
        mode = stepper.grad_sample_mode
    seen = totals.targets
    return PrivateTrainResult(
        loss=totals.loss_sum / seen if seen else math.nan,
        accuracy=totals.correct / seen if seen else math.nan,
        num_examples=n,
        steps=done,
        seconds=time.perf_counter() - start,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        clip_norm=clip_norm,
        grad_sample_mode=mode,
        examples_seen=examples_seen,
    )
