"""The built-in ClientApps are plain Flower apps: they run unchanged under Flower's runtimes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from confide.client.apps import make_client_app, make_numpy_client_app, mnist_cnn
from confide.client.models import build_model, get_weights
from confide.sims.config import SimRunConfig
from confide.sims.engine import run_inprocess


@pytest.mark.slow
def test_builtin_clientapp_runs_unchanged_under_flower_run_simulation() -> None:
    outcome: dict[str, object] = {}

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        model = build_model("cnn")
        initial = ArrayRecord(model.state_dict())
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=3,
            min_evaluate_nodes=3,
            min_available_nodes=3,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=2,
            train_config=ConfigRecord({"max-steps": 20, "lr": 0.05}),
        )
        outcome["initial"] = initial.to_numpy_ndarrays()
        outcome["result"] = result

    run_simulation(
        server_app=server,
        client_app=mnist_cnn,  # the object a user would name as confide.client.apps:mnist_cnn
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    result = outcome["result"]
    final = result.arrays.to_numpy_ndarrays()  # type: ignore[attr-defined]
    initial = outcome["initial"]
    assert len(final) == len(initial)  # type: ignore[arg-type]
    assert any(not np.allclose(a, b) for a, b in zip(final, initial, strict=True))  # type: ignore[call-overload]
    train = result.train_metrics_clientapp  # type: ignore[attr-defined]
    evaluate = result.evaluate_metrics_clientapp  # type: ignore[attr-defined]
    assert sorted(train) == [1, 2] and sorted(evaluate) == [1, 2]
    # Flower aggregated our metrics, weighted by our "num-examples": the model learned.
    assert float(evaluate[2]["eval_accuracy"]) > 0.5
    assert float(train[2]["train_loss"]) < float(train[1]["train_loss"])


@pytest.mark.slow
def test_numpy_client_flavour_trains_exactly_like_the_message_api_app(tmp_path: Path) -> None:
    cfg = SimRunConfig(
        task="credit-lstm",
        sites=2,
        rounds=1,
        max_samples_per_site=200,
        out=tmp_path / "a",
        central_eval=False,
    )
    a = run_inprocess(cfg, app=make_client_app("credit-lstm"), show_progress=False)
    b = run_inprocess(
        cfg.model_copy(update={"out": tmp_path / "b"}),
        app=make_numpy_client_app("credit-lstm"),
        show_progress=False,
    )
    for x, y in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.history.rounds[-1].eval_accuracy == b.history.rounds[-1].eval_accuracy
    assert len(get_weights(build_model("seq-lstm"))) == len(a.weights)
