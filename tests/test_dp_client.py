"""Client-level DP (DP-FedAvg): clipping, noise, adaptive clipping, events and solvers."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from scipy.stats import norm as normal_dist

from confide.errors import ConfigError
from confide.privacy.dp.accounting import DpError, DpEvent, epsilon
from confide.privacy.dp.client import (
    Z_MIN,
    AdaptiveClipState,
    ClientDpSettings,
    ClipStateCorrupted,
    InsufficientNoise,
    InvalidUpdate,
    adaptive_update_noise_multiplier,
    bit_noise_share,
    bit_noise_stddev,
    central_noise_stddev,
    clip_update,
    distributed_noise_share,
    noise_multiplier_for,
    noisy_bit_sum,
    noisy_mean,
    privatize_update,
    round_event,
    secure_rng,
    solve_noise_multiplier,
    unclipped_bit,
    update_noise_multiplier,
    update_norm,
)


def settings(**kw: Any) -> ClientDpSettings:
    base: dict[str, Any] = {"noise": "central", "noise_multiplier": 1.0, "clip_norm": 1.0}
    return ClientDpSettings(**{**base, **kw})


def update_with_norm(rng: np.random.Generator, norm: float) -> list[np.ndarray]:
    """A float32 update of two arrays (and an integer counter) with the given L2 norm."""
    a = rng.standard_normal((6, 4))
    b = rng.standard_normal(8)
    s = norm / math.sqrt(float((a**2).sum() + (b**2).sum()))
    return [(a * s).astype(np.float32), np.array(3, dtype=np.int64), (b * s).astype(np.float32)]


# --- clipping ------------------------------------------------------------------------------


def test_update_norm_is_the_global_l2_norm_of_the_float_arrays() -> None:
    rng = np.random.default_rng(0)
    arrays: list[np.ndarray] = [
        rng.standard_normal((30, 20)).astype(np.float32),
        np.arange(5),
        rng.random(7),
    ]
    expected = np.linalg.norm(np.concatenate([arrays[0].ravel(), arrays[2].ravel()]))
    assert update_norm(arrays) == pytest.approx(expected, rel=1e-12)


def test_update_within_clip_is_returned_bit_for_bit() -> None:
    update = update_with_norm(np.random.default_rng(1), 0.7)
    out = clip_update(update, 1.0)
    assert not out.clipped and out.scale == 1.0 and out.unclipped_bit == 1.0
    assert out.norm == pytest.approx(0.7, rel=1e-6)
    for a, b in zip(update, out.arrays, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_update_exactly_at_clip_counts_as_unclipped() -> None:
    update = [np.array([3.0, 4.0])]
    out = clip_update(update, 5.0)
    assert not out.clipped and out.arrays[0].tobytes() == update[0].tobytes()
    assert unclipped_bit(5.0, 5.0) == 1.0 and unclipped_bit(5.000001, 5.0) == 0.0


@pytest.mark.parametrize("clip", [0.01, 1.0, 37.5])
def test_update_above_clip_is_scaled_to_the_clip_norm(clip: float) -> None:
    rng = np.random.default_rng(2)
    update = [
        (rng.standard_normal((64, 32)) * 5).astype(np.float32),
        rng.standard_normal(100).astype(np.float32),
    ]
    norm = update_norm(update)
    out = clip_update(update, clip)
    assert out.clipped and out.unclipped_bit == 0.0
    assert out.norm == pytest.approx(norm, rel=1e-12)
    clipped_norm = update_norm(out.arrays)
    assert clipped_norm <= clip  # never above C: the noise is calibrated to C
    assert clipped_norm == pytest.approx(clip, rel=1e-6)
    assert out.scale == pytest.approx(clip / norm, rel=1e-6)
    for a, b in zip(update, out.arrays, strict=True):
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, a * (clip / norm), rtol=1e-6, atol=0)


def test_mixed_precision_update_is_clipped_within_the_norm() -> None:
    rng = np.random.default_rng(3)
    update: list[np.ndarray] = [
        rng.standard_normal(1000).astype(np.float16),
        rng.standard_normal(1000),  # float64
        rng.standard_normal(1000).astype(np.float32),
    ]
    out = clip_update(update, 2.0)
    assert [a.dtype for a in out.arrays] == [np.float16, np.float64, np.float32]
    assert update_norm(out.arrays) <= 2.0
    assert update_norm(out.arrays) == pytest.approx(2.0, rel=2e-3)  # float16 rounding


def test_integer_arrays_are_untouched_and_not_counted() -> None:
    counter = np.array([12345], dtype=np.int64)
    mask = np.array([1, 0, 1], dtype=np.int32)
    update: list[np.ndarray] = [np.full(4, 10.0, dtype=np.float32), counter, mask]
    assert update_norm(update) == pytest.approx(20.0)
    out = clip_update(update, 1.0)
    assert out.arrays[1] is counter and out.arrays[2] is mask
    assert out.arrays[1].tobytes() == np.array([12345]).tobytes()
    np.testing.assert_allclose(out.arrays[0], np.full(4, 0.5), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_a_typed_error_naming_the_array(bad: float) -> None:
    update = [np.zeros(3, dtype=np.float32), np.array([0.1, bad, 0.2], dtype=np.float32)]
    with pytest.raises(InvalidUpdate) as err:
        clip_update(update, 1.0, names=["fc.weight", "fc.bias"])
    assert isinstance(err.value, DpError) and isinstance(err.value, ValueError)
    assert "fc.bias" in str(err.value) and "Fix:" in str(err.value)
    with pytest.raises(InvalidUpdate, match="array 1"):
        update_norm(update)


# --- noise ---------------------------------------------------------------------------------


def test_secure_rng_is_unpredictable_unless_seeded_for_tests() -> None:
    a, b = secure_rng().standard_normal(8), secure_rng().standard_normal(8)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(
        secure_rng(seed=7).standard_normal(8), secure_rng(seed=7).standard_normal(8)
    )


def summed_share_noise(z: float, c: float, m: int, min_survivors: int, seed: int) -> np.ndarray:
    rng = secure_rng(seed=seed)
    shapes = [(100, 50), (2500,)]
    total = np.zeros(7500)
    for _ in range(m):
        shares = distributed_noise_share(shapes, z, c, min_survivors, rng)
        assert [s.shape for s in shares] == shapes and shares[0].dtype == np.float32
        total += np.concatenate([s.ravel() for s in shares])
    return total


def test_sum_of_distributed_shares_has_std_z_times_c() -> None:
    z, c, m = 1.3, 0.7, 8
    noise = np.concatenate([summed_share_noise(z, c, m, m, seed) for seed in range(20)])
    assert noise.size == 150_000
    assert abs(noise.mean()) < 0.02 * z * c
    assert noise.std() == pytest.approx(z * c, rel=0.03)


def test_more_survivors_than_min_survivors_only_adds_noise() -> None:
    z, c, min_survivors = 1.0, 2.0, 3
    for m in (3, 4, 6):
        noise = np.concatenate([summed_share_noise(z, c, m, min_survivors, s) for s in range(8)])
        expected = z * c * math.sqrt(m / min_survivors)
        assert noise.std() == pytest.approx(expected, rel=0.03)
        assert noise.std() >= 0.97 * z * c  # never less than the accounted noise


def test_central_noisy_mean_without_noise_is_the_plain_mean() -> None:
    rng = np.random.default_rng(4)
    s = settings(clip_norm=0.5)
    updates = [clip_update(update_with_norm(rng, n), 0.5) for n in (0.2, 0.9, 3.0)]
    floats = [[a for a in u.arrays if a.dtype.kind == "f"] for u in updates]
    total = [sum(parts) for parts in zip(*floats, strict=True)]
    mean = noisy_mean(total, 3, s, 0.5, secure_rng(seed=1), add_noise=False)
    for got, parts in zip(mean, zip(*floats, strict=True), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, sum(parts) / 3, rtol=1e-6)


def test_central_noisy_mean_adds_noise_of_std_z_c_to_the_sum() -> None:
    s = settings(noise_multiplier=1.7, clip_norm=0.3)
    total = [np.full((500, 400), 6.0, dtype=np.float32), np.full(50_000, -3.0)]
    m = 12
    out = noisy_mean(total, m, s, 0.3, secure_rng(seed=2), add_noise=True)
    noise = np.concatenate([(o - t / m).ravel() for o, t in zip(out, total, strict=True)])
    assert out[0].dtype == np.float32 and out[1].dtype == np.float64
    assert abs(noise.mean()) < 0.01 * 1.7 * 0.3 / m
    assert noise.std() == pytest.approx(1.7 * 0.3 / m, rel=0.01)
    assert central_noise_stddev(s, 0.3) == pytest.approx(0.51)


def test_distributed_noisy_mean_adds_nothing_and_refuses_too_few_survivors() -> None:
    s = settings(noise="distributed")
    total = [np.arange(6, dtype=np.float32)]
    out = noisy_mean(total, 4, s, 1.0, secure_rng(seed=3), add_noise=True, min_survivors=3)
    np.testing.assert_array_equal(out[0], total[0] / 4)
    with pytest.raises(InsufficientNoise, match="discard the round"):
        noisy_mean(total, 2, s, 1.0, secure_rng(seed=3), add_noise=True, min_survivors=3)
    with pytest.raises(InsufficientNoise, match="min_survivors"):
        noisy_mean(total, 4, s, 1.0, secure_rng(seed=3), add_noise=True)


def test_noisy_mean_refuses_integer_and_non_finite_sums() -> None:
    s = settings()
    with pytest.raises(InvalidUpdate, match="integer arrays"):
        noisy_mean([np.arange(3)], 2, s, 1.0, secure_rng(seed=0), add_noise=True)
    with pytest.raises(InvalidUpdate, match="NaN"):
        noisy_mean([np.array([np.nan])], 2, s, 1.0, secure_rng(seed=0), add_noise=True)


def test_privatize_update_central_sends_the_clipped_update_and_bit() -> None:
    rng = np.random.default_rng(5)
    update = update_with_norm(rng, 4.0)
    out = privatize_update(update, settings(), clip_norm=1.0, rng=secure_rng(seed=0))
    assert out.bit is None and out.clipped and out.norm == pytest.approx(4.0, rel=1e-6)
    assert update_norm(out.arrays) == pytest.approx(1.0, rel=1e-6)
    adaptive = settings(adaptive=True, clip_count_stddev=1.0)
    out = privatize_update(update, adaptive, clip_norm=8.0, rng=secure_rng(seed=0))
    assert out.bit == 1.0 and not out.clipped


def test_privatize_update_distributed_adds_shares_to_update_and_bit() -> None:
    s = settings(noise="distributed", noise_multiplier=0.8, adaptive=True, clip_count_stddev=2.0)
    z_update = update_noise_multiplier(s)
    update = [np.zeros(200_000, dtype=np.float32), np.array(7)]
    bits = []
    rng = secure_rng(seed=6)
    out = None
    for _ in range(400):
        out = privatize_update(update, s, clip_norm=0.5, rng=rng, min_survivors=4)
        assert out.bit is not None
        bits.append(out.bit - 1.0)
    assert out is not None and out.arrays[0].dtype == np.float32 and out.arrays[1] is update[1]
    assert out.arrays[0].std() == pytest.approx(z_update * 0.5 / 2, rel=0.01)
    assert np.std(bits) == pytest.approx(2.0 / 2, rel=0.1)
    with pytest.raises(ConfigError) as err:
        privatize_update(update, s, clip_norm=0.5, rng=rng)
    assert err.value.field == "min_survivors"


# --- adaptive clipping ---------------------------------------------------------------------


def test_adaptive_update_noise_multiplier_matches_hand_computation() -> None:
    # z = 2, σ_b = 1.25: z⁻² − (2σ_b)⁻² = 0.25 − 0.16 = 0.09, so z_Δ = 1 / 0.3.
    assert adaptive_update_noise_multiplier(2.0, 1.25) == pytest.approx(10 / 3, rel=1e-12)
    # Paper default σ_b = m / 20 with m = 100 sites: z_Δ = (1 − 0.01)^(−1/2) for z = 1.
    s = settings(adaptive=True)
    assert bit_noise_stddev(s, 100) == 5.0
    assert update_noise_multiplier(s, 100) == pytest.approx(1.0050378152592121, rel=1e-12)
    assert central_noise_stddev(s, 2.0, expected_clients=100) == pytest.approx(2.0100756305)
    # The two releases together are exactly one Gaussian mechanism of multiplier z.
    z_d = update_noise_multiplier(s, 100)
    assert (z_d**-2 + (2 * 5.0) ** -2) ** -0.5 == pytest.approx(1.0, rel=1e-12)
    assert update_noise_multiplier(settings(adaptive=False), None) == 1.0


def test_impossible_clip_count_noise_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        ClientDpSettings.parse(
            {
                "noise": "central",
                "noise_multiplier": 1.0,
                "clip_norm": 1.0,
                "adaptive": True,
                "clip_count_stddev": 0.5,
            }
        )
    assert err.value.field == "clip_count_stddev" and "noise_multiplier / 2" in err.value.fix
    s = settings(adaptive=True)  # σ_b = 10 / 20 = 0.5: 2σ_b = z
    with pytest.raises(ConfigError) as err:
        update_noise_multiplier(s, 10)
    assert err.value.field == "clip_count_stddev" and "1.2" in err.value.fix
    with pytest.raises(ConfigError) as err:
        update_noise_multiplier(s)  # σ_b depends on the sites per round, not given
    assert err.value.field == "clip_count_stddev"
    # Not adaptive: σ_b plays no part, whatever its value.
    assert settings(clip_count_stddev=0.1).noise_multiplier == 1.0


def test_clip_state_update_is_the_geometric_rule_and_round_trips() -> None:
    state = AdaptiveClipState.start(settings(adaptive=True, clip_norm=2.0, target_quantile=0.5))
    new = state.update(8.0, 10)  # b̄ = 0.8: too many unclipped, so C shrinks
    assert new == pytest.approx(2.0 * math.exp(-0.2 * (0.8 - 0.5)), rel=1e-15)
    assert state.clip_norm == new and state.round == 1
    back = AdaptiveClipState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert back == state
    grown = back.update(-1.5, 10)  # noise can push b̄ below 0; the step stays bounded
    assert grown == pytest.approx(new * math.exp(-0.2 * (-0.15 - 0.5)))
    with pytest.raises(ClipStateCorrupted, match="clip_norm"):
        AdaptiveClipState.from_dict({**state.to_dict(), "clip_norm": -1.0})
    with pytest.raises(ClipStateCorrupted, match="round"):
        AdaptiveClipState.from_dict(
            {"clip_norm": 1.0, "target_quantile": 0.5, "clip_learning_rate": 0.2}
        )
    with pytest.raises(InvalidUpdate):
        state.update(float("nan"), 10)


@pytest.mark.parametrize("noise", ["central", "distributed"])
@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clip_converges_to_the_target_quantile(noise: str, quantile: float) -> None:
    """Norms ~ 3·lognormal(0, 0.5); C starts 10x too small and must find their γ-quantile."""
    m, rounds = 50, 300
    s = settings(noise=noise, adaptive=True, clip_norm=0.3, target_quantile=quantile)
    truth = 3.0 * math.exp(0.5 * normal_dist.ppf(quantile))
    data = np.random.default_rng(10)
    rng = secure_rng(seed=11)
    state = AdaptiveClipState.start(s)
    history = []
    for _ in range(rounds):
        bit_sum = 0.0
        for n in 3.0 * data.lognormal(0.0, 0.5, size=m):
            sent = privatize_update(
                update_with_norm(data, float(n)),
                s,
                clip_norm=state.clip_norm,
                rng=rng,
                expected_clients=m,
                min_survivors=m,
            )
            assert sent.bit is not None
            bit_sum += sent.bit
        noisy = noisy_bit_sum(bit_sum, s, rng, expected_clients=m, add_noise=True)
        history.append(state.update(noisy, m))
    assert state.round == rounds
    assert history[-1] == pytest.approx(truth, rel=0.10)
    assert float(np.exp(np.mean(np.log(history[-100:])))) == pytest.approx(truth, rel=0.05)


def test_central_bit_noise_has_std_sigma_b_and_distributed_adds_none() -> None:
    s = settings(adaptive=True, clip_count_stddev=2.5)
    rng = secure_rng(seed=12)
    draws = [noisy_bit_sum(10.0, s, rng, add_noise=True) - 10.0 for _ in range(20_000)]
    assert np.std(draws) == pytest.approx(2.5, rel=0.03)
    dist = settings(noise="distributed", adaptive=True, clip_count_stddev=2.5)
    assert noisy_bit_sum(10.0, dist, rng, add_noise=True) == 10.0
    shares = [sum(bit_noise_share(2.5, 5, rng) for _ in range(5)) for _ in range(20_000)]
    assert np.std(shares) == pytest.approx(2.5, rel=0.03)


# --- accounting ----------------------------------------------------------------------------


def test_round_event_is_one_unamplified_dp_fedavg_step_at_z() -> None:
    s = settings(noise_multiplier=1.1, adaptive=True, clip_count_stddev=3.0, delta=1e-6)
    ev = round_event(
        s, clip_norm=0.42, dataset_size=900, federation="fed-a", round=7, time=1.7e9, site="s1"
    )
    assert (ev.mechanism, ev.noise_multiplier, ev.sample_rate, ev.steps) == (
        "dp-fedavg",
        1.1,
        1.0,
        1,
    )
    assert (ev.clip_norm, ev.delta, ev.dataset_size) == (0.42, 1e-6, 900)
    assert (ev.federation, ev.round, ev.time, ev.site) == ("fed-a", 7, 1.7e9, "s1")
    gaussian = DpEvent("gaussian", 1.1, 1.0, 1, 0.42, 1e-6, 900, "fed-a", 7, 1.7e9)
    assert epsilon([ev], 1e-6) == epsilon([gaussian], 1e-6)


# Checking ε at the solutions runs the accountants at far-out RDP orders; they warn, harmlessly.
accountant_warnings = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")


def check_solution(z: float, target: float, eps: Any) -> None:
    assert eps(z) <= target
    assert eps(z) >= 0.99 * target
    assert eps(z * (1 - 2e-3)) > target  # the smallest such z, to the 0.1 % tolerance


@accountant_warnings
@pytest.mark.parametrize(("target", "rounds"), [(3.0, 50), (8.0, 1000), (0.5, 1)])
def test_noise_multiplier_for_hits_the_target(target: float, rounds: int) -> None:
    z = noise_multiplier_for(target, 1e-5, rounds)

    def eps(x: float) -> float:
        ev = DpEvent("dp-fedavg", x, 1.0, rounds, 1.0, 1e-5, 1, "-", 0, 0.0)
        return epsilon([ev], 1e-5, "prv")

    check_solution(z, target, eps)


@accountant_warnings
@pytest.mark.parametrize(("target", "q", "steps"), [(3.0, 0.01, 5000), (1.0, 0.004, 20_000)])
def test_solve_noise_multiplier_for_dp_sgd_hits_the_target(
    target: float, q: float, steps: int
) -> None:
    sigma = solve_noise_multiplier(target, 1e-5, q, steps)

    def eps(x: float) -> float:
        return epsilon([DpEvent("dp-sgd", x, q, steps, 1.0, 1e-5, 1, "-", 0, 0.0)], 1e-5)

    check_solution(sigma, target, eps)


def test_unreachable_target_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        noise_multiplier_for(0.01, 1e-5, 100_000, field="dp.client.target_epsilon")
    assert err.value.field == "dp.client.target_epsilon" and "raise the target" in err.value.fix
    with pytest.raises(ConfigError) as err:
        solve_noise_multiplier(-1.0, 1e-5, 0.01, 10)
    assert err.value.field == "target_epsilon"


def test_a_target_met_by_the_least_noise_returns_the_lower_limit() -> None:
    assert noise_multiplier_for(1e4, 1e-5, 1) == Z_MIN


# --- settings ------------------------------------------------------------------------------

VALID = {"noise": "central", "noise_multiplier": 1.0, "clip_norm": 1.0}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise", "local"),
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("noise_multiplier", float("inf")),
        ("clip_norm", 0.0),
        ("clip_norm", float("nan")),
        ("adaptive", "sometimes"),
        ("target_quantile", 0.0),
        ("target_quantile", 1.0),
        ("clip_learning_rate", 0.0),
        ("clip_count_stddev", 0.0),
        ("delta", 0.0),
        ("delta", 1.0),
        ("epsilon", 3.0),  # unknown key
    ],
)
def test_every_settings_error_names_its_field_and_fix(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        ClientDpSettings.parse({**VALID, field: value})
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ") and "Fix: " in str(err.value)
    if field in ClientDpSettings.model_fields:
        extra = ClientDpSettings.model_fields[field].json_schema_extra
        assert isinstance(extra, dict) and err.value.fix == extra["fix"]
    with pytest.raises(ConfigError) as err:
        ClientDpSettings.parse({**VALID, field: value}, section="dp.client")
    assert err.value.field == f"dp.client.{field}"


@pytest.mark.parametrize("field", ["noise", "noise_multiplier", "clip_norm"])
def test_missing_required_setting_names_its_field(field: str) -> None:
    data = dict(VALID)
    del data[field]
    with pytest.raises(ConfigError) as err:
        ClientDpSettings.parse(data)
    assert err.value.field == field


def test_settings_defaults_follow_the_paper() -> None:
    s = ClientDpSettings.parse(VALID)
    assert (s.adaptive, s.target_quantile, s.clip_learning_rate) == (False, 0.5, 0.2)
    assert (s.clip_count_stddev, s.delta) == (None, 1e-5)
    assert bit_noise_stddev(s.model_copy(update={"adaptive": True}), 40) == 2.0
