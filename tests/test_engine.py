"""The in-process engine on real data: tasks learn, runs repeat exactly, failures are kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from confide.client.apps import make_client_app
from confide.server.history import History
from confide.sims.config import SimRunConfig
from confide.sims.engine import RoundFailed, run_inprocess

SMALL = {
    "mnist-cnn": {"max_samples_per_site": 300, "max_test_samples": 1000},
    "shakespeare-lstm": {"max_samples_per_site": 60, "max_test_samples": 200},
    "shakespeare-transformer": {"max_samples_per_site": 60, "max_test_samples": 200},
    "credit-lstm": {"max_samples_per_site": 600},
    "credit-transformer": {"max_samples_per_site": 600},
}


def _cfg(task: str, tmp_path: Path, **extra: object) -> SimRunConfig:
    values: dict[str, object] = {
        "task": task,
        "sites": 3,
        "rounds": 2,
        "seed": 1,
        "out": tmp_path / task,
        **SMALL[task],
    }
    values.update(extra)
    return SimRunConfig(**values)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("task", list(SMALL))
def test_two_rounds_raise_accuracy_over_round_zero(task: str, tmp_path: Path) -> None:
    result = run_inprocess(_cfg(task, tmp_path), show_progress=False)
    rounds = result.history.rounds
    assert [r.round for r in rounds] == [0, 1, 2]
    before, after = rounds[0].test_accuracy, rounds[-1].test_accuracy
    assert before is not None and after is not None
    assert after > before + 0.05, f"{task}: {before:.3f} -> {after:.3f}"
    assert rounds[-1].sites_succeeded == 3 and not rounds[-1].failures
    assert rounds[-1].eval_accuracy is not None and rounds[-1].train_examples > 0
    saved = History.load(result.history_path)
    assert saved.rounds[-1].test_accuracy == pytest.approx(after)
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.model_path.stat().st_size > 0


@pytest.mark.slow
def test_same_seed_same_history_and_fedadam_runs(tmp_path: Path) -> None:
    a = run_inprocess(_cfg("credit-lstm", tmp_path / "a", rounds=1), show_progress=False)
    b = run_inprocess(_cfg("credit-lstm", tmp_path / "b", rounds=1), show_progress=False)
    assert a.history.rounds[-1].test_loss == b.history.rounds[-1].test_loss
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa, wb)
    c = run_inprocess(
        _cfg("credit-lstm", tmp_path / "c", rounds=1, strategy="fedadam", server_lr=0.05),
        show_progress=False,
    )
    assert c.history.strategy == "fedadam"
    assert any(not np.array_equal(x, y) for x, y in zip(a.weights, c.weights, strict=True))


def _flaky(inner: ClientApp, bad_node: int) -> ClientApp:
    def call(message: Message, context: Context) -> Message:
        if context.node_id == bad_node:
            raise RuntimeError("disk full")
        return inner(message, context)

    app = ClientApp()
    app._call = call  # a ClientApp that defers to another one, as a mod would
    return app


@pytest.mark.slow
def test_a_failing_site_is_recorded_and_the_round_carries_on(tmp_path: Path) -> None:
    cfg = _cfg("credit-lstm", tmp_path, rounds=1, max_samples_per_site=200)
    result = run_inprocess(cfg, app=_flaky(make_client_app("credit-lstm"), 2), show_progress=False)
    last = result.history.rounds[-1]
    assert last.sites_selected == 3 and last.sites_succeeded == 2
    assert any("site 1: RuntimeError: disk full" in f for f in last.failures)
    data = json.loads(result.history_path.read_text())
    assert data["rounds"][-1]["failures"]


def test_a_round_with_no_result_fails_with_a_typed_error(tmp_path: Path) -> None:
    cfg = _cfg("credit-lstm", tmp_path, rounds=1, sites=1, central_eval=False)
    with pytest.raises(RoundFailed, match="disk full"):
        run_inprocess(cfg, app=_flaky(make_client_app("credit-lstm"), 1), show_progress=False)


@pytest.mark.slow
def test_secagg_ends_with_the_plain_model_within_the_quantization_bound(tmp_path: Path) -> None:
    """One FedAvg round: the securely aggregated model is the plain one up to the bound;
    more rounds: the federation learns the same."""
    extra = {"sites": 4, "min_sites": 3, "rounds": 1}
    plain = run_inprocess(_cfg("credit-lstm", tmp_path / "plain", **extra), show_progress=False)
    secure = run_inprocess(
        _cfg("credit-lstm", tmp_path / "secure", secure_aggregation="secagg+", **extra),
        show_progress=False,
    )
    info = secure.history.rounds[-1].secure_aggregation
    assert info is not None and info["survivors"] == 4 and info["dropped"] == 0
    bound = info["error_bound"]
    assert 0 < bound < 1e-3
    worst = max(
        float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        for a, b in zip(secure.weights, plain.weights, strict=True)
    )
    # float32 rounding of the result adds at most one ulp of the weights' magnitude
    assert worst <= bound + 1e-6, (worst, bound)
    assert worst > 0  # it really went through the quantized ring
    assert plain.history.rounds[-1].secure_aggregation is None


@pytest.mark.slow
def test_secagg_federation_learns_like_the_plain_one(tmp_path: Path) -> None:
    extra = {"sites": 5, "min_sites": 3, "rounds": 2, "secagg": {"mode": "full"}}
    plain = run_inprocess(_cfg("credit-lstm", tmp_path / "p", **extra), show_progress=False)
    secure = run_inprocess(
        _cfg("credit-lstm", tmp_path / "s", secure_aggregation="secagg+", **extra),
        show_progress=False,
    )
    a, b = plain.history.rounds[-1].test_accuracy, secure.history.rounds[-1].test_accuracy
    assert a is not None and b is not None and abs(a - b) < 0.01
    assert secure.history.rounds[-1].secure_aggregation["neighbours"] == 4  # full: N-1


def test_secagg_needs_three_sites_per_round(tmp_path: Path) -> None:
    from confide.errors import ConfigError

    with pytest.raises(ConfigError, match=r"min_sites.*at least 3.*Fix"):
        SimRunConfig.build({"task": "credit-lstm", "sites": 2, "secure_aggregation": "secagg+"})
