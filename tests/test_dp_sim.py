"""DP in the in-process engine: the same plan, checks and ledger as a real federation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from confide.privacy.dp import DpEvent, PrivacyLedger, epsilon
from confide.sims.config import SimRunConfig
from confide.sims.engine import BudgetsExhausted, run_inprocess

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, dp: dict[str, Any], **extra: Any) -> SimRunConfig:
    values: dict[str, Any] = {
        "task": "mnist-cnn",
        "model": "cnn-small",
        "sites": 4,
        "rounds": 2,
        "min_sites": 3,
        "max_samples_per_site": 200,
        "max_test_samples": 300,
        "eval_fraction": 0.1,
        "out": tmp_path / "run",
        "dp": dp,
        **extra,
    }
    return SimRunConfig.build(values)


def test_example_level_dp_in_the_simulator_records_every_site(tmp_path: Path) -> None:
    dp = {
        "delta": 1e-5,
        "example": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps_per_round": 3},
    }
    result = run_inprocess(_cfg(tmp_path, dp), show_progress=False)
    meta = result.history.meta["dp"]
    with PrivacyLedger(meta["ledger"]) as ledger:
        assert ledger.sites() == ["site-0000", "site-0001", "site-0002", "site-0003"]
        events = ledger.events(site="site-0002")
    assert [(e.mechanism, e.round, e.steps, e.sample_rate) for e in events] == [
        ("dp-sgd", 1, 3, 0.1),
        ("dp-sgd", 2, 3, 0.1),
    ]
    expected = epsilon(events, 1e-5)
    assert meta["epsilon_max_site"] == pytest.approx(expected)
    assert result.history.rounds[-1].dp["epsilon_max_site"] == pytest.approx(expected)
    assert result.history.rounds[1].dp["epsilon_max_site"] < expected  # it grows per round


def test_sites_over_budget_are_left_out_and_the_run_stops_cleanly(tmp_path: Path) -> None:
    dp = {
        "delta": 1e-5,
        "example": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps_per_round": 3},
    }
    one = epsilon([DpEvent("dp-sgd", 1.0, 0.1, 3, 1.0, 1e-5, 1, "s", 1, 0.0)], 1e-5)
    cfg = _cfg(tmp_path, dp, site_epsilon_max=one * 1.05, rounds=3)
    with pytest.raises(BudgetsExhausted, match="privacy budget"):
        run_inprocess(cfg, show_progress=False)


@pytest.mark.parametrize("secure", ["none", "secagg+"])
def test_client_level_dp_in_the_simulator(tmp_path: Path, secure: str) -> None:
    dp = {
        "delta": 1e-5,
        "client": {
            "noise": "central",
            "noise_multiplier": 1.0,
            "clip_norm": 0.2,
            "adaptive": True,
            "clip_count_stddev": 1.0,
        },
    }
    result = run_inprocess(
        _cfg(tmp_path, dp, secure_aggregation=secure, max_steps=5), show_progress=False
    )
    rounds = result.history.rounds
    clips = [r.dp["client_clip_norm"] for r in rounds[1:]]
    assert clips[0] != pytest.approx(0.2)  # adaptive clipping moved C after round 1
    with PrivacyLedger(result.history.meta["dp"]["ledger"]) as ledger:
        events = ledger.events(site="site-0001")
    assert [(e.mechanism, e.noise_multiplier, e.sample_rate, e.steps) for e in events] == [
        ("dp-fedavg", 1.0, 1.0, 1)
    ] * 2
    assert events[0].clip_norm == pytest.approx(0.2)
    assert events[1].clip_norm == pytest.approx(clips[0])
