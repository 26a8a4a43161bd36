"""The site's privacy guard without a network: plans, admission, release, clipping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide import wire
from confide.client.privacy import PrivacySettings, RoundRefused, SitePrivacy, clip_and_noise
from confide.errors import ConfigError
from confide.privacy.dp import PrivacyLedger, epsilon
from confide.privacy.dp import federated as dpfed
from confide.server.config import FederationConfig

SITE = "hospital-a"


def _config(**extra: Any) -> dict[str, Any]:
    return {
        dpfed.FEDERATION: "fed",
        dpfed.DELTA: 1e-5,
        dpfed.SGD_NOISE: 1.0,
        dpfed.SGD_RATE: 0.02,
        dpfed.SGD_STEPS: 50,
        dpfed.SGD_CLIP: 1.0,
        **extra,
    }


def _guard(tmp_path: Path, epsilon_max: float | None = 5.0, **kw: Any) -> tuple[SitePrivacy, list]:
    audited: list[tuple[str, dict[str, Any]]] = []
    settings = None if epsilon_max is None else PrivacySettings(epsilon_max=epsilon_max, **kw)
    guard = SitePrivacy(tmp_path, SITE, settings, lambda k, p: audited.append((k, p)))
    guard.apply_budget()
    return guard, audited


def _payload(metrics: dict[str, Any], arrays: list[np.ndarray] | None = None) -> wire.Payload:
    arrays = arrays if arrays is not None else [np.zeros(3, np.float32)]
    return wire.Payload("t", [f"a{i}" for i in range(len(arrays))], arrays, metrics, {})


def test_a_round_within_budget_is_admitted_and_recorded_once(tmp_path: Path) -> None:
    guard, audited = _guard(tmp_path)
    plan = guard.plan(_config(), 1)
    assert plan is not None
    guard.admit(plan)
    metrics = {wire.NUM_EXAMPLES: 500, **dpfed.sgd_reply_metrics(plan.sgd, 50, 500)}  # type: ignore[arg-type]
    out, events = guard.release(plan, _payload({}), _payload(metrics))
    assert [e.mechanism for e in events] == ["dp-sgd"]
    # dp.* metrics are consumed at the site; the events travel as config for the mirror.
    assert not any(k.startswith("dp.") for k in out.metrics)
    (sent,) = dpfed.events_from_json(str(out.config[dpfed.EVENTS]))
    assert sent["site"] == SITE and sent["dataset_size"] == 500 and sent["steps"] == 50
    with PrivacyLedger(tmp_path / "ledger.db", site=SITE) as ledger:
        assert [r["uid"] for r in ledger.export()] == [sent["uid"]]
    assert [k for k, _ in audited] == ["budget_set", "dp_event"]


def test_a_round_over_budget_is_refused_before_training(tmp_path: Path) -> None:
    one = epsilon(dpfed.plan_from_config(_config(), 1).planned_events(), 1e-5)  # type: ignore[union-attr]
    guard, audited = _guard(tmp_path, epsilon_max=one * 0.9)
    plan = guard.plan(_config(), 1)
    assert plan is not None
    with pytest.raises(RoundRefused) as info:
        guard.admit(plan)
    assert info.value.code == "BUDGET_EXHAUSTED"
    assert info.value.details["projected"] == pytest.approx(one, rel=1e-6)
    assert audited[-1][0] == "budget_refused"
    with PrivacyLedger(tmp_path / "ledger.db", site=SITE) as ledger:
        assert ledger.events() == []


def test_budget_spans_rounds_and_federations(tmp_path: Path) -> None:
    plan = dpfed.plan_from_config(_config(), 1)
    assert plan is not None
    one = epsilon(plan.planned_events(), 1e-5)
    two = epsilon(plan.planned_events() * 2, 1e-5)
    guard, _ = _guard(tmp_path, epsilon_max=(one + two) / 2)  # one round fits, two do not
    metrics = dpfed.sgd_reply_metrics(plan.sgd, 50, 100)  # type: ignore[arg-type]
    guard.admit(plan)
    guard.release(plan, _payload({}), _payload(metrics))
    other = dpfed.plan_from_config(_config(**{dpfed.FEDERATION: "another"}), 1)
    assert other is not None
    with pytest.raises(RoundRefused, match="would exceed"):
        guard.admit(other)


def test_no_budget_fails_closed(tmp_path: Path) -> None:
    guard, _ = _guard(tmp_path, epsilon_max=None)
    plan = guard.plan(_config(), 1)
    assert plan is not None
    with pytest.raises(RoundRefused, match="no privacy budget") as info:
        guard.admit(plan)
    assert info.value.code == "BUDGET_EXHAUSTED"


def test_a_reply_beyond_the_plan_is_withheld(tmp_path: Path) -> None:
    guard, audited = _guard(tmp_path)
    plan = guard.plan(_config(), 1)
    assert plan is not None
    for cheat in (
        {dpfed.SGD_NOISE: 0.5},
        {dpfed.SGD_STEPS: 51},
        {dpfed.SGD_RATE: 0.05},
        {dpfed.SGD_CLIP: 2.0},
    ):
        metrics = {**dpfed.sgd_reply_metrics(plan.sgd, 50, 100), **cheat}  # type: ignore[arg-type]
        with pytest.raises(RoundRefused) as info:
            guard.release(plan, _payload({}), _payload(metrics))
        assert info.value.code == "DP_NOT_APPLIED"
    with pytest.raises(RoundRefused, match="did not train privately"):
        guard.release(plan, _payload({}), _payload({wire.NUM_EXAMPLES: 10}))
    with PrivacyLedger(tmp_path / "ledger.db", site=SITE) as ledger:
        assert ledger.events() == []
    assert audited[-1][0] == "result_withheld"


def test_require_dp_refuses_a_plain_round_and_malformed_plans_are_refused(tmp_path: Path) -> None:
    guard, _ = _guard(tmp_path)
    with pytest.raises(RoundRefused) as info:
        guard.plan({"lr": 0.1}, 1)
    assert info.value.code == "DP_REQUIRED"
    relaxed, _ = _guard(tmp_path / "b", require_dp=False)
    assert relaxed.plan({"lr": 0.1}, 1) is None
    for bad in ({dpfed.SGD_NOISE: -1.0}, {dpfed.SGD_RATE: 2.0}, {dpfed.DELTA: "x"}):
        with pytest.raises(RoundRefused) as info:
            guard.plan(_config(**bad), 1)
        assert info.value.code == "DP_PLAN_REFUSED"


def test_client_level_clipping_bounds_the_update_and_keeps_integer_arrays() -> None:
    plan = dpfed.ClientPlan(1.0, 0.5, "central", 3, True)
    g = [np.ones((4, 4), np.float32), np.array([7], np.int64)]
    big = [g[0] + 3.0, np.array([9], np.int64)]
    out, within = clip_and_noise(plan, g, big)
    assert not within
    assert np.linalg.norm(out[0] - g[0]) == pytest.approx(0.5, rel=1e-5)
    assert out[1].tolist() == [7]  # counters keep the global value
    small = [g[0] + 0.01, g[1]]
    out, within = clip_and_noise(plan, g, small)
    assert within and np.allclose(out[0], small[0])
    # Distributed mode adds this site's noise share: std z·C/sqrt(min_survivors).
    noisy = dpfed.ClientPlan(1.0, 0.5, "distributed", 4, False)
    g = [np.zeros(200_000, np.float32)]
    out, _ = clip_and_noise(noisy, g, g)
    assert np.std(out[0]) == pytest.approx(0.5 / 2, rel=0.02)


def test_dp_config_errors_name_the_field(tmp_path: Path) -> None:
    doc = tmp_path / "f.toml"
    cases = {
        "[dp.example]\nsample_rate = 0.01\n": "dp.example",
        "[dp.example]\nnoise_multiplier = 1.0\nsample_rate = 2.0\n": "dp.example.sample_rate",
        "[dp]\ndelta = 2.0\n": "dp.delta",
        '[dp.client]\nnoise_multiplier = 1.0\nnoise = "distributed"\nadaptive = true\n': (
            "dp.client"
        ),
        "[dp.example]\nnoise_multiplier = 1.0\nbogus = 1\n": "dp.example.bogus",
    }
    for body, field in cases.items():
        doc.write_text('[federation]\nname = "f"\n' + body)
        with pytest.raises(ConfigError) as info:
            FederationConfig.load(doc)
        assert info.value.field == field, (body, info.value)
