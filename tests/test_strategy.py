"""FedAvg and FedAdam against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.errors import ConfigError
from confide.server.strategy import (
    AggregationError,
    FedAdam,
    FedAvg,
    SiteResult,
    WeightAverage,
    make_strategy,
    select_sites,
    weighted_mean,
    weighted_metrics,
)


def _site(values: list[list[float]], n: int) -> SiteResult:
    return SiteResult([np.asarray(v, dtype=np.float32) for v in values], n)


def test_fedavg_equals_hand_computed_weighted_mean() -> None:
    a = _site([[1.0, 2.0], [10.0]], 1)
    b = _site([[3.0, 6.0], [20.0]], 3)
    glob = [np.zeros(2, np.float32), np.zeros(1, np.float32)]
    out = FedAvg().aggregate(glob, [a, b])
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5.0, (1*10 + 3*20)/4 = 17.5
    np.testing.assert_allclose(out[0], [2.5, 5.0])
    np.testing.assert_allclose(out[1], [17.5])
    assert out[0].dtype == np.float32


def test_weighted_mean_of_large_arrays_in_blocks_is_exactly_the_float64_mean() -> None:
    rng = np.random.default_rng(3)
    shapes = [(700, 1000), (3,), (), (0, 4), (2 * 131072 + 5,)]  # several blocks, and edges
    sites = [
        SiteResult([rng.standard_normal(s).astype(np.float32) for s in shapes], int(n))
        for n in rng.integers(1, 500, size=9)
    ]
    got = weighted_mean(sites)
    total = sum(r.num_examples for r in sites)
    for j, shape in enumerate(shapes):
        acc = np.zeros(shape, dtype=np.float64)
        for r in sites:
            acc += r.weights[j].astype(np.float64) * (r.num_examples / total)
        assert got[j].shape == shape and got[j].dtype == np.float32
        assert np.array_equal(got[j], acc.astype(np.float32))  # bit for bit, not close


def test_fedavg_server_lr_moves_part_of_the_way() -> None:
    glob = [np.array([0.0, 0.0], np.float32)]
    out = FedAvg(server_lr=0.5).aggregate(glob, [_site([[2.0, 4.0]], 5)])
    np.testing.assert_allclose(out[0], [1.0, 2.0])


def test_weighted_mean_keeps_integer_arrays_of_first_site() -> None:
    a = SiteResult([np.array([1.0]), np.array([7], np.int64)], 1)
    b = SiteResult([np.array([3.0]), np.array([9], np.int64)], 1)
    out = weighted_mean([a, b])
    assert out[1].tolist() == [7]
    np.testing.assert_allclose(out[0], [2.0])


def test_fedadam_first_step_matches_the_paper_update() -> None:
    glob = [np.array([1.0, -1.0], np.float64)]
    site = SiteResult([np.array([1.5, -2.0])], 10)
    opt = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    out = opt.aggregate(glob, [site])
    delta = np.array([0.5, -1.0])
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta**2
    expected = glob[0] + 0.1 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(out[0], expected, rtol=1e-12)
    # Moments persist: a second identical round moves further in the same direction.
    out2 = opt.aggregate(out, [SiteResult([out[0] + delta], 10)])
    assert np.all(np.sign(out2[0] - out[0]) == np.sign(delta))
    state = opt.state()
    fresh = FedAdam(server_lr=0.1)
    fresh.load_state(state)
    np.testing.assert_array_equal(fresh.state()["m"][0], state["m"][0])


def test_mismatched_shapes_are_rejected_with_the_reason() -> None:
    a = _site([[1.0, 2.0]], 1)
    b = _site([[1.0, 2.0, 3.0]], 1)
    with pytest.raises(AggregationError, match="shape"):
        weighted_mean([a, b])
    with pytest.raises(AggregationError, match="no site results"):
        weighted_mean([])
    with pytest.raises(AggregationError, match="zero training examples"):
        weighted_mean([_site([[1.0]], 0)])


def test_weighted_metrics_weights_by_examples() -> None:
    out = weighted_metrics([(1, {"acc": 0.0}), (3, {"acc": 1.0, "loss": 2.0})])
    assert out == {"acc": 0.75, "loss": 2.0}


def test_select_sites_respects_fraction_and_minimum() -> None:
    rng = np.random.default_rng(0)
    chosen = select_sites(100, 0.1, 1, rng)
    assert len(chosen) == 10 and len(set(chosen)) == 10
    assert all(0 <= c < 100 for c in chosen)
    assert len(select_sites(10, 0.1, 3, rng)) == 3
    assert select_sites(3, 1.0, 1, rng) == [0, 1, 2]


def test_bad_strategy_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        make_strategy("fedsgd")
    with pytest.raises(ConfigError, match="server_lr"):
        FedAvg(server_lr=0)
    with pytest.raises(ConfigError, match="beta1/beta2"):
        FedAdam(beta1=1.5)


def test_weight_average_follows_the_warmed_up_decay_and_keeps_counters() -> None:
    avg = WeightAverage(0.9)
    rounds = [[np.full(3, float(t), np.float32), np.array(t, np.int64)] for t in (1, 2, 3)]
    got = [avg.update(w) for w in rounds]
    np.testing.assert_array_equal(got[0][0], np.full(3, 1.0, np.float32))  # m_1 = w_1
    b1 = 2 / 11  # min(0.9, (1 + 1) / (10 + 1)): the warm-up keeps early rounds light
    m2 = b1 * 1.0 + (1 - b1) * 2.0
    np.testing.assert_allclose(got[1][0], np.full(3, m2), rtol=1e-6)
    b2 = 3 / 12
    np.testing.assert_allclose(got[2][0], np.full(3, b2 * m2 + (1 - b2) * 3.0), rtol=1e-6)
    assert got[2][0].dtype == np.float32
    assert int(got[2][1]) == 3  # integer arrays are the latest model's, not averaged
    with pytest.raises(ConfigError, match="server_ema"):
        WeightAverage(1.0)


def test_a_simulation_serves_the_average_and_trains_from_the_latest(tmp_path: Path) -> None:
    from confide.sims.config import SimRunConfig
    from confide.sims.engine import run_inprocess

    base = {
        "task": "credit-lstm",
        "sites": 2,
        "rounds": 3,
        "max_samples_per_site": 100,
        "central_eval": False,
    }
    plain = run_inprocess(SimRunConfig(**base, out=tmp_path / "a"), show_progress=False)
    averaged = run_inprocess(
        SimRunConfig(**base, server_ema=0.5, out=tmp_path / "b"), show_progress=False
    )
    # The same training (the average never feeds back), a different served model.
    assert [r.train_loss for r in plain.history.rounds] == [
        r.train_loss for r in averaged.history.rounds
    ]
    assert any(
        not np.array_equal(a, b) for a, b in zip(plain.weights, averaged.weights, strict=True)
    )
