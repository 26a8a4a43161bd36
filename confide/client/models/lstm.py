"""Recurrent models (Shakespeare next-character LSTM, credit-history classifier) with a DP twin.

``torch.nn.LSTM`` runs one fused kernel, which Opacus cannot see inside, so
its validator rejects it. ``opacus.layers.DPLSTM`` rebuilds the LSTM from
per-gate linear layers called once per time step, and Opacus then
materialises and sums a per-sample gradient at every step: 12-17x slower
than plain SGD on the Shakespeare model. Each model here takes ``dp``; with
``dp=True`` it gets :class:`PerSampleLSTM`, an LSTM whose per-sample
gradients Opacus computes in one shot per sequence with its own ``nn.Linear``
rules, and whose recurrence runs without a per-step autograd graph.

Both modes expose *the same* ``state_dict`` (same keys, same order, same
shapes, same initial values for the same seed) so weights move freely
between a private and a non-private site and federated aggregation sees
identical arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from torch import nn

from confide.errors import ConfigError

__all__ = ["CharLSTM", "PerSampleLSTM", "SequenceClassifier"]


def _check_positive(field: str, value: int) -> None:
    if value < 1:
        raise ConfigError(field, f"must be a positive integer, got {value}", f"set {field} >= 1")


# --- the recurrence, with a hand-written backward -------------------------------------------------
#
# An LSTM layer's weight gradients are sums over time of outer products,
#   dW_ih = sum_t dz_t x_t^T,   dW_hh = sum_t dz_t h_{t-1}^T,   db = sum_t dz_t,
# where dz_t is the gradient of the gate pre-activations
# z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh.
# So one sample's gradient is that of two linear layers applied to the whole
# sequence at once (inputs x and previous hidden states h_{t-1}, output
# gradient dz): exactly what Opacus' nn.Linear rules compute, in one batched
# product per layer instead of one per step. The recurrence itself needs no
# autograd graph: it runs under no_grad and the backward below walks it in
# reverse with five small operations per step.


@dataclass
class _Tape:
    """What one layer's forward keeps for its backward, time-major ``(T, B, ...)``."""

    gates: torch.Tensor  # sigmoid of the pre-activations (i, f, -, o); slot g is unused
    cell_input: torch.Tensor  # g = tanh(pre-activation of g)
    cells: torch.Tensor  # c_0 (zeros) .. c_T, shape (T + 1, B, H)
    tanh_cells: torch.Tensor  # tanh(c_1) .. tanh(c_T)
    weight_hh: torch.Tensor  # detached W_hh, for the gradient that flows back through h


def _recurrence_forward(
    projected: torch.Tensor, weight_hh: torch.Tensor, bias_hh: torch.Tensor
) -> tuple[torch.Tensor, _Tape]:
    """Run one layer over the sequence without autograd; ``projected`` is ``W_ih x + b_ih``.

    Returns the hidden states ``h_0 (zeros) .. h_T`` time-major, shape ``(T + 1, B, H)``,
    and the tape for :func:`_recurrence_backward`.
    """
    batch, steps, four_h = projected.shape
    hidden = four_h // 4
    gates = (projected + bias_hh).transpose(0, 1).contiguous()
    cell_input = projected.new_empty(steps, batch, hidden)
    cells = projected.new_empty(steps + 1, batch, hidden)
    tanh_cells = projected.new_empty(steps, batch, hidden)
    hiddens = projected.new_empty(steps + 1, batch, hidden)
    cells[0].zero_()
    hiddens[0].zero_()
    weight_t = weight_hh.t()
    # Per-step views made once (unbind), not indexed inside the loop: the
    # loop is a handful of small kernels per step, so Python indexing shows.
    z_t = gates.unbind(0)
    i_t, f_t, g_pre_t, o_t = (
        gates[:, :, k * hidden : (k + 1) * hidden].unbind(0) for k in range(4)
    )
    g_t, c_t, tc_t, h_t = (x.unbind(0) for x in (cell_input, cells, tanh_cells, hiddens))
    for t in range(steps):
        if t:  # h_0 = 0 contributes nothing
            z_t[t].addmm_(h_t[t], weight_t)
        torch.tanh(g_pre_t[t], out=g_t[t])
        z_t[t].sigmoid_()
        torch.mul(f_t[t], c_t[t], out=c_t[t + 1])
        c_t[t + 1].addcmul_(i_t[t], g_t[t])
        torch.tanh(c_t[t + 1], out=tc_t[t])
        torch.mul(o_t[t], tc_t[t], out=h_t[t + 1])
    return hiddens, _Tape(gates, cell_input, cells, tanh_cells, weight_hh)


def _recurrence_backward(
    tape: _Tape, grad_out: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor
) -> torch.Tensor:
    """Gradient of the gate pre-activations ``dz``, batch-first ``(B, T, 4H)``.

    ``grad_out`` is the gradient of the layer's output sequence ``(B, T, H)``,
    ``grad_h_n`` and ``grad_c_n`` those of its final states ``(B, H)``.
    """
    steps, batch, four_h = tape.gates.shape
    hidden = four_h // 4
    s = tape.gates.view(steps, batch, 4, hidden)
    s_i, s_f, s_o = s[:, :, 0], s[:, :, 1], s[:, :, 3]
    g, tanh_c = tape.cell_input, tape.tanh_cells
    # Everything that does not depend on the backward recurrence, for all steps at once:
    # dz_i = dc g s_i(1-s_i), dz_f = dc c_{t-1} s_f(1-s_f), dz_g = dc s_i (1-g^2),
    # dz_o = dh tanh(c) s_o(1-s_o), and dc_t gains dh_t s_o (1 - tanh(c)^2).
    slope = torch.addcmul(s, s, s, value=-1.0)
    coef = torch.empty_like(s)
    torch.mul(slope[:, :, 0], g, out=coef[:, :, 0])
    torch.mul(slope[:, :, 1], tape.cells[:-1], out=coef[:, :, 1])
    torch.addcmul(s_i, s_i * g, g, value=-1.0, out=coef[:, :, 2])
    torch.mul(slope[:, :, 3], tanh_c, out=coef[:, :, 3])
    through_h = torch.addcmul(s_o, s_o * tanh_c, tanh_c, value=-1.0)
    gate_coef, out_coef = coef[:, :, :3], coef[:, :, 3]

    dz = torch.empty_like(s)
    dz_flat = dz.view(steps, batch, four_h)
    grad_out_t = grad_out.transpose(0, 1).unbind(0)
    dz_t, dz_flat_t = dz[:, :, :3].unbind(0), dz_flat.unbind(0)
    dz_o_t, f_t, through_h_t = dz[:, :, 3].unbind(0), s_f.unbind(0), through_h.unbind(0)
    gate_coef_t, out_coef_t = gate_coef.unbind(0), out_coef.unbind(0)
    dh = grad_out_t[-1] + grad_h_n
    dc = grad_c_n.clone()
    for t in range(steps - 1, -1, -1):
        if t < steps - 1:
            dh = torch.addmm(grad_out_t[t], dz_flat_t[t + 1], tape.weight_hh)
            dc.mul_(f_t[t + 1])
        dc.addcmul_(dh, through_h_t[t])
        torch.mul(gate_coef_t[t], dc.unsqueeze(1), out=dz_t[t])
        torch.mul(out_coef_t[t], dh, out=dz_o_t[t])
    return dz_flat.transpose(0, 1).contiguous()


class _LayerOutputs(torch.autograd.Function):
    """Attach a layer's precomputed outputs to the graph: their gradients flow to ``dz``.

    Inputs are the input projection ``W_ih x + b_ih`` and the placeholder of
    :class:`_RecurrentWeights`; both receive ``dz`` (the first because it
    enters the gates additively, the second to give ``W_hh`` and ``b_hh``
    their gradient).
    """

    @staticmethod
    def forward(
        ctx: Any,
        projected: torch.Tensor,
        recurrent: torch.Tensor,
        hiddens: torch.Tensor,
        tape: _Tape,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        del projected, recurrent
        ctx.tape = tape
        out = hiddens[1:].transpose(0, 1).contiguous()
        return out, hiddens[-1].clone(), tape.cells[-1].clone()

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        # The tape stays on ctx (not consumed): ghost clipping runs backward twice.
        dz = _recurrence_backward(ctx.tape, grad_out, grad_h_n, grad_c_n)
        return dz, dz, None, None


class _RecurrentWeightsFunction(torch.autograd.Function):
    """Value: a zero placeholder. Backward: ``W_hh`` and ``b_hh`` gradients from ``dz``.

    Written in the ``setup_context`` style with a generated vmap rule so that
    ``torch.func`` (Opacus' ``functorch`` mode) can differentiate through it too.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(previous: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return weight.new_zeros(()).expand(*previous.shape[:-1], weight.shape[0])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, dz: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        (previous,) = ctx.saved_tensors
        flat_dz = dz.reshape(-1, dz.shape[-1])
        grad_weight = flat_dz.t() @ previous.reshape(-1, previous.shape[-1])
        return None, grad_weight, flat_dz.sum(0)


class _RecurrentWeights(nn.Module):
    """An LSTM layer's ``W_hh`` and ``b_hh``, seen by Opacus as a linear layer on ``h_{t-1}``.

    Called once per sequence with the previous hidden states ``(B, T, H)``
    (detached: the recurrence itself carries the gradient through ``h``), it
    returns a zero placeholder whose gradient is ``dz``. Opacus' hooks
    therefore capture exactly what its ``nn.Linear`` rules need (activations
    ``h_{t-1}``, backprops ``dz``), and those rules are registered for it
    below, for both per-sample gradients and ghost-clipping norms.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))

    def forward(self, previous: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _RecurrentWeightsFunction.apply(  # type: ignore[no-untyped-call]
            previous, self.weight, self.bias
        )
        return out


register_grad_sampler(_RecurrentWeights)(compute_linear_grad_sample)
register_norm_sampler(_RecurrentWeights)(compute_linear_norm_sample)


def _public_names(num_layers: int) -> list[tuple[str, str]]:
    """``(nn.LSTM name, PerSampleLSTM name)`` in ``nn.LSTM``'s ``state_dict`` order."""
    return [
        pair
        for k in range(num_layers)
        for pair in (
            (f"weight_ih_l{k}", f"ih_l{k}.weight"),
            (f"weight_hh_l{k}", f"hh_l{k}.weight"),
            (f"bias_ih_l{k}", f"ih_l{k}.bias"),
            (f"bias_hh_l{k}", f"hh_l{k}.bias"),
        )
    ]


class _SaveAsLSTM:
    """``state_dict`` post-hook: write a :class:`PerSampleLSTM`'s entries as ``nn.LSTM`` would.

    A module-level class rather than a closure so models stay picklable
    (Ray, multiprocessing and ``torch.save(model)`` pickle whole modules).
    """

    def __init__(self, num_layers: int) -> None:
        self.names = _public_names(num_layers)

    def __call__(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        # The module's own entries were written last, so re-adding them renamed
        # and reordered keeps them where they stood in the caller's dict.
        own = {internal: state_dict.pop(prefix + internal, None) for _, internal in self.names}
        for public, internal in self.names:
            if own[internal] is not None:
                state_dict[prefix + public] = own[internal]


class _LoadAsLSTM:
    """``load_state_dict`` pre-hook: read ``nn.LSTM``-named entries into :class:`PerSampleLSTM`."""

    def __init__(self, num_layers: int) -> None:
        self.names = _public_names(num_layers)

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
        # torch hands each module its own filtered copy of the dict, so renaming
        # in place is safe; popping the public name keeps strict loading strict.
        for public, internal in self.names:
            if prefix + public in state_dict:
                state_dict[prefix + internal] = state_dict.pop(prefix + public)


class PerSampleLSTM(nn.Module):
    """A batch-first LSTM whose per-sample gradients Opacus computes fast (no initial state input).

    Same mathematics and ``state_dict`` as ``nn.LSTM(input_size, hidden_size,
    num_layers, batch_first=True)``; each layer's ``W_ih x + b_ih`` is an
    ``nn.Linear`` over the whole sequence and its ``W_hh, b_hh`` a
    :class:`_RecurrentWeights`, so Opacus (hooks or ghost clipping) treats the
    layer as two linear layers called once per batch.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        for k in range(num_layers):
            self.add_module(
                f"ih_l{k}", nn.Linear(input_size if k == 0 else hidden_size, 4 * hidden_size)
            )
            self.add_module(f"hh_l{k}", _RecurrentWeights(hidden_size))
        # torch leaves these two registration methods unannotated.
        self.register_state_dict_post_hook(_SaveAsLSTM(num_layers))  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(_LoadAsLSTM(num_layers))  # type: ignore[no-untyped-call]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``(output (B, T, H), (h_n, c_n) each (num_layers, B, H))``, as ``nn.LSTM`` returns."""
        h_n, c_n = [], []
        for k in range(self.num_layers):
            ih: nn.Linear = getattr(self, f"ih_l{k}")
            hh: _RecurrentWeights = getattr(self, f"hh_l{k}")
            projected = ih(x)
            with torch.no_grad():
                hiddens, tape = _recurrence_forward(
                    projected.detach(), hh.weight.detach(), hh.bias.detach()
                )
            if torch.is_grad_enabled() and (projected.requires_grad or hh.weight.requires_grad):
                recurrent = hh(hiddens[:-1].transpose(0, 1))
                x, h, c = _LayerOutputs.apply(  # type: ignore[no-untyped-call]
                    projected, recurrent, hiddens, tape
                )
            else:
                x, h, c = hiddens[1:].transpose(0, 1).contiguous(), hiddens[-1], tape.cells[-1]
            h_n.append(h)
            c_n.append(c)
        return x, (torch.stack(h_n), torch.stack(c_n))


def _add_lstm(
    owner: nn.Module, attr: str, input_size: int, hidden_size: int, num_layers: int, *, dp: bool
) -> None:
    """Set ``owner.<attr>`` to a batch-first LSTM whose state is ``nn.LSTM``'s in both modes.

    ``dp=False`` gives the fused ``nn.LSTM``; ``dp=True`` a :class:`PerSampleLSTM`
    holding the very weights that ``nn.LSTM`` would have been initialised with.
    """
    reference = nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)
    if not dp:
        setattr(owner, attr, reference)
        return
    # A side RNG stream for the DP layer's own (discarded) initialisation keeps
    # every later layer's draw identical to the non-DP build.
    with torch.random.fork_rng(devices=[]):
        private = PerSampleLSTM(input_size, hidden_size, num_layers)
    private.load_state_dict(reference.state_dict())
    setattr(owner, attr, private)


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
