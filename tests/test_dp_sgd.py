"""Example-level DP-SGD (confide.privacy.dp.sgd): clipping per example, Poisson sampling, noise.

The clipped sums are checked against an independent reference (the non-private model,
fused nn.LSTM included, one example at a time), the fast paths against plain Opacus.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_sgd_reference import steps_with_plain_opacus, steps_with_stepper
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS
from torch import nn

from confide.client.data import ArrayDataset
from confide.client.models import MODELS, build_model, get_weights, set_weights
from confide.client.training import evaluate
from confide.errors import ConfigError
from confide.privacy.dp import sgd
from confide.privacy.dp.sgd import DpSgdStepper, PrivateTrainResult, train_private

VOCAB = 97
SEQ_LEN = 10
# Reduced sizes where the model allows it, so every test stays quick.
SMALL_KWARGS: dict[str, dict[str, Any]] = {
    "char-transformer": {"d_model": 32, "n_heads": 2, "max_len": 16},
    "seq-transformer": {"d_model": 32, "n_heads": 2},
}


def build(name: str, *, dp: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, dp=dp, **SMALL_KWARGS.get(name, {}))


def make_batch(name: str, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kind = MODELS[name].input_kind
    if kind == "image":
        x = torch.randn(batch_size, 1, 28, 28, generator=gen)
        return x, torch.randint(0, 10, (batch_size,), generator=gen)
    if kind == "chars":
        tokens = torch.randint(0, VOCAB, (batch_size, SEQ_LEN + 1), generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    series = torch.randn(batch_size, 6, 8, generator=gen)
    return series, (series[:, :, 0].mean(dim=1) > 0).long()


def dataset(name: str, n: int, seed: int = 0) -> ArrayDataset:
    x, y = make_batch(name, n, seed)
    return ArrayDataset(x.numpy(), y.numpy())


def parameters_in_state_order(model: nn.Module) -> list[torch.Tensor]:
    """Parameters in state_dict order, which both the fused and the DP LSTM share."""
    return list(model.state_dict(keep_vars=True).values())


def per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # One example's loss: the mean over its positions for sequence models.
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def reference_clipped_sum(
    name: str, weights: list[np.ndarray], x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over examples of min(1, C/|g_i|) g_i, one example at a time, on the non-DP model."""
    model = build(name, dp=False)
    set_weights(model, weights)
    params = parameters_in_state_order(model)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(per_example_loss(model(x[i : i + 1]), y[i : i + 1]), params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (float(norm) + 1e-6))  # Opacus' clip factor
        for t, g in zip(total, grads, strict=True):
            t += factor * g.double()
    return total, torch.stack(norms)


def private_gradient(
    name: str, mode: str, weights: list[np.ndarray], x: torch.Tensor, y: torch.Tensor, clip: float
) -> list[torch.Tensor]:
    """The gradient one DP-SGD step applies, without noise and divided by 1: the clipped sum."""
    model = build(name, dp=True)
    set_weights(model, weights)
    with DpSgdStepper(
        model,
        noise_multiplier=0.0,
        clip_norm=clip,
        expected_batch_size=1.0,
        lr=1.0,
        grad_sample_mode=mode,
        example=x,
    ) as stepper:
        stepper.step(x, y)
        return [p.grad.detach().clone() for p in parameters_in_state_order(model)]


# --- per-example clipping is exact, in every mode and for every model ----------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_clipped_sum_equals_per_example_reference_in_every_mode(name: str) -> None:
    x, y = make_batch(name, 5, seed=1)
    weights = get_weights(build(name, dp=False, seed=2))
    # Clip at the median norm, so some examples are clipped and some are not.
    _, norms = reference_clipped_sum(name, weights, x, y, clip=1.0)
    clip = float(norms.median())
    reference, _ = reference_clipped_sum(name, weights, x, y, clip)
    for mode in ("hooks", "ghost", "bk", "functorch"):
        got = private_gradient(name, mode, weights, x, y, clip)
        for g, r in zip(got, reference, strict=True):
            error = (g.double() - r).norm() / r.norm().clamp(min=1e-12)
            assert error < 1e-4, (mode, float(error))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_steps_match_plain_opacus(name: str, mode: str) -> None:
    # Same batches (one of them empty), same noise generator: the optimised
    # step gives what Opacus' own GradSampleModule and DPOptimizer give
    # (book-keeping: what Opacus' ghost clipping gives, computed in one pass).
    batches = [make_batch(name, b, seed=i) for i, b in enumerate([4, 0, 3])]
    ours = steps_with_stepper(build(name, dp=True), batches, mode)
    theirs = steps_with_plain_opacus(build(name, dp=True), batches, ghost=mode in ("ghost", "bk"))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_empty_step_adds_noise_of_std_sigma_c_over_expected_batch_size() -> None:
    model = build("cnn", dp=True)  # 1.66M coordinates: a tight estimate of the std
    with DpSgdStepper(
        model,
        noise_multiplier=1.5,
        clip_norm=2.0,
        expected_batch_size=12.5,
        lr=1.0,
        grad_sample_mode="ghost",
        noise_generator=torch.Generator().manual_seed(0),
    ) as stepper:
        x, y = make_batch("cnn", 0)
        stepper.step(x, y)
        noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert abs(float(noise.mean())) < 0.01
    assert float(noise.std()) == pytest.approx(1.5 * 2.0 / 12.5, rel=0.01)


def test_noise_is_divided_by_q_times_n_not_the_realised_batch() -> None:
    model = build("cnn-small", dp=True)
    before = get_weights(model)
    # q so small that every batch is empty: the update is noise / (qN) alone.
    result = train_private(
        model,
        dataset("cnn-small", 10),
        noise_multiplier=1.0,
        sample_rate=1e-6,
        steps=1,
        clip_norm=1.0,
        lr=1.0,
    )
    assert result.examples_seen == 0
    change = np.concatenate(
        [(a - b).ravel() for a, b in zip(get_weights(model), before, strict=True)]
    )
    assert float(change.std()) == pytest.approx(1.0 / (1e-6 * 10), rel=0.03)


# --- the mechanism: Poisson sampling at rate q, exactly `steps` steps ---------------------------


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    step = DpSgdStepper.step

    def spy(self: DpSgdStepper, x: torch.Tensor, y: torch.Tensor) -> sgd.StepStats:
        sizes.append(len(x))
        return step(self, x, y)

    monkeypatch.setattr(DpSgdStepper, "step", spy)
    return sizes


def test_poisson_batches_have_mean_size_q_times_n(batch_sizes: list[int]) -> None:
    n, q, steps = 50, 0.1, 200
    result = train_private(
        build("seq-lstm", dp=True),
        dataset("seq-lstm", n),
        noise_multiplier=1.0,
        sample_rate=q,
        steps=steps,
        clip_norm=1.0,
        lr=0.05,
    )
    assert len(batch_sizes) == result.steps == steps
    assert sum(batch_sizes) == result.examples_seen
    # Binomial(N, q) per step: mean qN = 5, variance Nq(1-q) = 4.5.
    assert abs(np.mean(batch_sizes) - q * n) < 5 * np.sqrt(n * q * (1 - q) / steps)
    assert np.var(batch_sizes) == pytest.approx(n * q * (1 - q), rel=0.35)
    assert 0 in batch_sizes or min(batch_sizes) <= 2  # sizes vary: not fixed batches


def test_empty_batches_still_take_a_noisy_step(batch_sizes: list[int]) -> None:
    model = build("char-lstm", dp=True)
    before = get_weights(model)
    result = train_private(
        model,
        dataset("char-lstm", 20),
        noise_multiplier=1.0,
        sample_rate=0.01,
        steps=12,
        clip_norm=1.0,
        lr=0.01,
    )
    assert result.steps == 12 and len(batch_sizes) == 12
    assert batch_sizes.count(0) >= 6  # P(empty) = 0.99^20 = 0.82
    assert all(not np.array_equal(a, b) for a, b in zip(get_weights(model), before, strict=True))


# --- reproducibility, usability afterwards, learning ----------------------------------------------


def run(name: str, seed: int, mode: str = "auto") -> tuple[list[np.ndarray], PrivateTrainResult]:
    model = build(name, dp=True)
    result = train_private(
        model,
        dataset(name, 40),
        noise_multiplier=1.0,
        sample_rate=0.2,
        steps=4,
        clip_norm=1.0,
        lr=0.1,
        momentum=0.9,
        seed=seed,
        grad_sample_mode=mode,
    )
    return get_weights(model), result


@pytest.mark.parametrize("name", ["cnn-small", "char-lstm", "seq-transformer"])
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    first, result = run(name, seed=3)
    again, _ = run(name, seed=3)
    other, _ = run(name, seed=4)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert result.steps == 4 and result.num_examples == 40
    assert (result.noise_multiplier, result.sample_rate, result.clip_norm) == (1.0, 0.2, 1.0)


def test_global_rng_is_left_alone() -> None:
    model, data = build("seq-transformer", dp=True), dataset("seq-transformer", 20)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_private(model, data, **VALID)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_picks_book_keeping_measured_fastest_at_benchmark_shapes(name: str) -> None:
    # Book-keeping chooses per layer between per-sample gradients and ghost
    # norms, so it beats (or ties) hooks and ghost on every registered model.
    kind = MODELS[name].input_kind
    x = {
        "image": torch.zeros(2, 1, 28, 28),
        "chars": torch.zeros(2, 80, dtype=torch.long),
        "sequence": torch.zeros(2, 6, 8),
    }[kind]
    assert sgd.choose_grad_sample_mode(build_model(name, dp=True), x) == "bk"


def test_result_reports_the_mode_that_ran() -> None:
    _, auto = run("seq-lstm", seed=0)
    _, forced = run("seq-lstm", seed=0, mode="hooks")
    assert (auto.grad_sample_mode, forced.grad_sample_mode) == ("bk", "hooks")


def opacus_leftovers(model: nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._backward_hooks or module._forward_pre_hooks:
            found.append(f"hooks on {name or 'model'}")
        attrs = ("activations", "autograd_grad_sample_hooks", "max_batch_len")
        found += [f"{name}.{a}" for a in attrs if hasattr(module, a)]
    for name, p in model.named_parameters():
        attrs = (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad")
        found += [f"{name}.{a}" for a in attrs if hasattr(p, a)]
        if p.grad is not None:
            found.append(f"{name}.grad")
    return found


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "functorch"])
def test_model_is_left_clean_and_trains_again(mode: str) -> None:
    model = build("char-lstm", dp=True)
    data = dataset("char-lstm", 12)
    kwargs: dict[str, Any] = {
        "noise_multiplier": 1.0,
        "sample_rate": 0.5,
        "steps": 2,
        "clip_norm": 1.0,
        "lr": 0.1,
        "grad_sample_mode": mode,
    }
    train_private(model, data, **kwargs)
    assert opacus_leftovers(model) == []
    weights = get_weights(model)
    set_weights(model, weights)
    train_private(model, data, **kwargs)  # hooks do not pile up
    assert opacus_leftovers(model) == []
    plain = build("char-lstm", dp=False)
    plain.load_state_dict(model.state_dict())
    x, _ = make_batch("char-lstm", 2)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)


def test_training_prints_no_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("cnn-small", "seq-lstm", "char-transformer"):
            run(name, seed=0)
    assert [str(w.message) for w in caught] == []


def easy_images(n: int, seed: int) -> ArrayDataset:
    # Class 1 images are bright in the top half, class 0 in the bottom half.
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.5, (n, 1, 28, 28)).astype(np.float32)
    x[y == 1, :, :14] += 1.0
    x[y == 0, :, 14:] += 1.0
    return ArrayDataset(x, y.astype(np.int64))


def test_training_with_moderate_noise_lowers_the_loss() -> None:
    model = build("cnn-small", dp=True)
    data, held_out = easy_images(400, seed=0), easy_images(200, seed=1)
    before = evaluate(model, held_out)
    result = train_private(
        model,
        data,
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=40,
        clip_norm=1.0,
        lr=0.5,
        momentum=0.5,
    )
    after = evaluate(model, held_out)
    assert result.examples_seen > 0 and np.isfinite(result.loss)
    assert after.loss < 0.6 * before.loss
    assert after.accuracy > 0.9


# --- bad arguments --------------------------------------------------------------------------------

VALID: dict[str, Any] = {
    "noise_multiplier": 1.0,
    "sample_rate": 0.1,
    "steps": 3,
    "clip_norm": 1.0,
    "lr": 0.1,
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("noise_multiplier", float("nan")),
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("sample_rate", -0.1),
        ("steps", 0),
        ("steps", 2.5),
        ("clip_norm", 0.0),
        ("clip_norm", -1.0),
        ("lr", 0.0),
        ("momentum", 1.0),
        ("grad_sample_mode", "fast"),
    ],
)
def test_bad_argument_is_a_config_error_naming_the_field(field: str, value: Any) -> None:
    model = build("seq-lstm", dp=True)
    before = get_weights(model)
    with pytest.raises(ConfigError) as err:
        train_private(model, dataset("seq-lstm", 10), **{**VALID, field: value})
    assert err.value.field == field
    assert err.value.fix
    for a, b in zip(get_weights(model), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_empty_dataset_is_a_config_error() -> None:
    empty = ArrayDataset(np.zeros((0, 6, 8), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ConfigError) as err:
        train_private(build("seq-lstm", dp=True), empty, **VALID)
    assert err.value.field == "data"


def test_non_private_lstm_is_a_config_error_that_says_build_with_dp() -> None:
    with pytest.raises(ConfigError) as err:
        train_private(build("seq-lstm", dp=False), dataset("seq-lstm", 10), **VALID)
    assert err.value.field == "model"
    assert "dp=True" in err.value.fix
