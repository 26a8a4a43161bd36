"""Tests for the model zoo: shapes, Opacus compatibility, DP/non-DP parity, weight exchange."""

from __future__ import annotations

import gzip
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from confide.client.models import (
    MODELS,
    CharLSTM,
    McMahanCNN,
    SequenceClassifier,
    build_model,
    count_parameters,
    get_weights,
    set_weights,
)
from confide.errors import ConfigError

VOCAB = 97
SEQ_LEN = 10  # DPLSTM unrolls in Python; a short sequence keeps the DP tests fast
# Real text, so character batches carry learnable structure (ids = ASCII - 32, 97-char vocab).
TEXT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
TEXT_IDS = torch.tensor([ord(c) - 32 for c in TEXT])

# Reduced sizes where the model allows it, so every test stays quick; the
# full-size defaults are covered by the parameter-count and shape tests.
SMALL_KWARGS: dict[str, dict[str, Any]] = {
    "cnn": {},
    "cnn-small": {},
    "char-lstm": {},
    "char-transformer": {"d_model": 32, "n_heads": 2, "max_len": 16},
    "seq-lstm": {},
    "seq-transformer": {"d_model": 32, "n_heads": 2},
}

EXPECTED_PARAMETERS = {
    "cnn": 1_663_370,
    "cnn-small": 54_362,
    "char-lstm": 824_425,
    "char-transformer": 438_113,
    "seq-lstm": 19_074,
    "seq-transformer": 101_186,
}

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def make_batch(name: str, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random input batch and matching targets for the registered model ``name``."""
    gen = torch.Generator().manual_seed(seed)
    kind = MODELS[name].input_kind
    if kind == "image":
        return torch.randn(batch_size, 1, 28, 28, generator=gen), torch.randint(
            0, 10, (batch_size,), generator=gen
        )
    if kind == "chars":
        starts = torch.randint(0, len(TEXT_IDS) - SEQ_LEN - 1, (batch_size,), generator=gen)
        windows = torch.stack([TEXT_IDS[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]
    series = torch.randn(batch_size, 6, 8, generator=gen)
    # The label depends on the series, so a model can learn it rather than memorise noise.
    return series, (series[:, :, 0].mean(dim=1) > 0).long()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build(name: str, *, dp: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, dp=dp, **SMALL_KWARGS[name])


# --- sizes and shapes ---------------------------------------------------------------------------


def test_mcmahan_cnn_has_the_papers_parameter_count() -> None:
    assert count_parameters(McMahanCNN()) == 1_663_370


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dp", [False, True])
def test_default_model_has_pinned_parameter_count(name: str, dp: bool) -> None:
    assert count_parameters(build_model(name, dp=dp)) == EXPECTED_PARAMETERS[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape(name: str) -> None:
    model = build_model(name)
    x, _ = make_batch(name, 3)
    out = model(x)
    expected = {"image": (3, 10), "chars": (3, SEQ_LEN, VOCAB), "sequence": (3, 2)}
    assert tuple(out.shape) == expected[MODELS[name].input_kind]
    assert out.dtype == torch.float32


def test_char_transformer_rejects_sequences_longer_than_max_len() -> None:
    model = build_model("char-transformer", d_model=32, n_heads=2, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_char_transformer_is_causal() -> None:
    model = build("char-transformer").eval()
    tokens = torch.randint(0, VOCAB, (1, 12))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % VOCAB
    # Positions before the edit must not see it.
    torch.testing.assert_close(model(tokens)[:, :7], model(changed)[:, :7])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_layers": 5}, "n_layers"),
        ({"n_layers": 1}, "n_layers"),
        ({"d_model": 30, "n_heads": 4}, "d_model"),
    ],
)
def test_char_transformer_rejects_bad_dimensions(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_model("char-transformer", **kwargs)
    assert err.value.field == field


# --- registry -----------------------------------------------------------------------------------


def test_unknown_model_error_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("nope")
    assert err.value.field == "model"
    assert "'nope'" in str(err.value)
    for name in MODELS:
        assert name in err.value.fix


def test_unknown_model_argument_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="hidden_units"):
        build_model("seq-lstm", hidden_units=3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_construction_is_deterministic_under_manual_seed(name: str) -> None:
    first, second = get_weights(build(name, seed=3)), get_weights(build(name, seed=3))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(first, get_weights(build(name, seed=4)), strict=True)
    )


# --- Opacus compatibility -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dp_model_passes_opacus_validator(name: str) -> None:
    model = build(name, dp=True)
    assert ModuleValidator.validate(model, strict=False) == []
    ModuleValidator.validate(model, strict=True)


@pytest.mark.parametrize("name", [n for n in sorted(MODELS) if "lstm" not in n])
def test_non_lstm_model_passes_opacus_validator_without_dp(name: str) -> None:
    assert ModuleValidator.validate(build(name), strict=False) == []


@pytest.mark.parametrize("name", ["char-lstm", "seq-lstm"])
def test_validator_rejects_the_fused_lstm_of_non_dp_mode(name: str) -> None:
    # Guards the test above: if dp=True ever fell back to nn.LSTM, this is what it would report.
    errors = ModuleValidator.validate(build(name, dp=False), strict=False)
    assert errors
    assert any("LSTM" in str(e) for e in errors)


def _dp_step(model: nn.Module, name: str, batch_size: int = 4) -> tuple[nn.Module, float]:
    """One DP-SGD step through Opacus; returns the wrapped model and the loss before the step."""
    x, y = make_batch(name, 2 * batch_size)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        # Opacus warns about the secure RNG and full-backward-hook internals; not under test here.
        warnings.simplefilter("ignore")
        private_model, private_opt, private_loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
        xb, yb = next(iter(private_loader))
        private_opt.zero_grad()
        loss = loss_fn(private_model(xb), yb)
        loss.backward()
        for param in model.parameters():
            # Every parameter must get a per-sample gradient, or it would escape clipping.
            assert param.grad_sample is not None
            assert param.grad_sample.shape == (batch_size, *param.shape)
        private_opt.step()
    return private_model, loss.item()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_opacus_make_private_takes_a_step(name: str) -> None:
    model = build(name, dp=True)
    before = [w.copy() for w in get_weights(model)]
    private_model, loss = _dp_step(model, name)
    assert np.isfinite(loss)
    after = get_weights(private_model)
    assert len(after) == len(before)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_opacus_ghost_clipping_takes_a_step(name: str) -> None:
    # Ghost clipping has its own per-layer norm code (its embedding norm needs
    # contiguous ids, which the character models must provide themselves).
    model = build(name, dp=True)
    x, y = make_batch(name, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private_model, private_opt, criterion, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="ghost",
        )
        before = [w.copy() for w in get_weights(model)]
        private_opt.zero_grad()
        logits = private_model(x)
        flat = (logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = criterion(*flat, shape=logits.shape) if logits.dim() == 3 else criterion(*flat)
        loss.backward()
        private_opt.step()
    assert any(not np.array_equal(a, b) for a, b in zip(before, get_weights(model), strict=True))


# --- DP and non-DP LSTMs are the same model -----------------------------------------------------


@pytest.mark.parametrize("name", ["char-lstm", "seq-lstm"])
def test_dp_and_fused_lstm_have_identical_state_dicts(name: str) -> None:
    fused, private = build(name, dp=False).state_dict(), build(name, dp=True).state_dict()
    assert list(fused) == list(private)  # same keys in the same order
    assert [v.shape for v in fused.values()] == [v.shape for v in private.values()]
    # Same seed, same weights: the DPLSTM copies the nn.LSTM's initialisation.
    for key in fused:
        torch.testing.assert_close(fused[key], private[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["char-lstm", "seq-lstm"])
def test_weights_move_between_dp_and_fused_lstm_with_equal_outputs(name: str) -> None:
    fused, private = build(name, dp=False, seed=1), build(name, dp=True, seed=2)
    x, _ = make_batch(name, 3)
    # Trained-in-DP weights into the fused model via load_state_dict (strict) ...
    fused.load_state_dict(private.state_dict())
    torch.testing.assert_close(fused(x), private(x), rtol=1e-5, atol=1e-6)
    # ... and fused weights into the DP model via the array exchange.
    reference = build(name, dp=False, seed=5)
    set_weights(private, get_weights(reference))
    torch.testing.assert_close(private(x), reference(x), rtol=1e-5, atol=1e-6)


def test_lstm_state_dict_has_no_internal_dplstm_names() -> None:
    keys = list(CharLSTM(dp=True).state_dict())
    assert not [k for k in keys if ".l0." in k or ".ih." in k or ".hh." in k]
    assert len(keys) == len(list(CharLSTM(dp=True).parameters()))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dp_model_survives_pickling(name: str) -> None:
    # Ray and multiprocessing pickle whole modules; the LSTM state hooks must come along.
    model = build(name, dp=True)
    clone = pickle.loads(pickle.dumps(model))
    assert list(clone.state_dict()) == list(model.state_dict())
    x, _ = make_batch(name, 2)
    torch.testing.assert_close(clone(x), model(x))


def test_dp_lstm_weights_survive_opacus_wrapping() -> None:
    torch.manual_seed(0)
    model = SequenceClassifier(dp=True)
    private_model, _ = _dp_step(model, "seq-lstm")
    # GradSampleModule prefixes keys; the arrays themselves line up with a plain model.
    plain = SequenceClassifier(dp=False)
    set_weights(plain, get_weights(private_model))
    x, _ = make_batch("seq-lstm", 3)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)


# --- weight exchange ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_get_set_weights_round_trip(name: str) -> None:
    source, target = build(name, seed=1), build(name, seed=2)
    weights = get_weights(source)
    assert all(w.dtype == np.float32 for w in weights)
    assert [w.shape for w in weights] == [tuple(v.shape) for v in source.state_dict().values()]
    set_weights(target, weights)
    for a, b in zip(get_weights(target), weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_get_weights_returns_copies() -> None:
    model = build("cnn-small")
    weights = get_weights(model)
    weights[0][...] = 123.0
    assert not np.any(get_weights(model)[0] == 123.0)


def test_set_weights_with_wrong_shape_names_the_parameter_and_leaves_model_intact() -> None:
    model = build("seq-lstm")
    original = get_weights(model)
    bad = [w + 1.0 for w in original]
    bad[-2] = np.zeros((3, 64), dtype=np.float32)
    with pytest.raises(ConfigError) as err:
        set_weights(model, bad)
    message = str(err.value)
    assert "head.weight" in message
    assert "(2, 64)" in message and "(3, 64)" in message
    for a, b in zip(get_weights(model), original, strict=True):
        np.testing.assert_array_equal(a, b)


def test_set_weights_with_wrong_count_raises() -> None:
    model = build("cnn-small")
    with pytest.raises(ConfigError, match="arrays"):
        set_weights(model, get_weights(model)[:-1])


# --- the models can learn -----------------------------------------------------------------------

LEARNING_RATES = {
    "cnn": 0.05,
    "cnn-small": 0.05,
    "char-lstm": 1.0,
    "char-transformer": 0.1,
    "seq-lstm": 1.0,
    "seq-transformer": 0.1,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_decreases_on_a_fixed_batch(name: str) -> None:
    model = build(name)
    x, y = make_batch(name, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATES[name])
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="reference MNIST copy not present")
def test_small_cnn_exceeds_90_percent_on_mnist_after_one_epoch() -> None:
    n_train, n_test = 5000, 2000

    def images(stem: str, n: int) -> torch.Tensor:
        raw = _read_idx(MNIST_DIR / f"{stem}-images-idx3-ubyte.gz", 16)[: n * 784]
        return (torch.from_numpy(raw.copy()).float().view(n, 1, 28, 28) / 255 - 0.1307) / 0.3081

    def labels(stem: str, n: int) -> torch.Tensor:
        return torch.from_numpy(
            _read_idx(MNIST_DIR / f"{stem}-labels-idx1-ubyte.gz", 8)[:n].copy()
        ).long()

    x_train, y_train = images("train", n_train), labels("train", n_train)
    x_test, y_test = images("t10k", n_test), labels("t10k", n_test)
    torch.manual_seed(0)
    model = build_model("cnn-small")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    order = torch.randperm(n_train)
    for start in range(0, n_train, 10):
        idx = order[start : start + 10]
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    assert accuracy > 0.90
