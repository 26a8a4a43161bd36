"""The built-in ClientApps are plain Flower apps: they run unchanged under Flower's runtimes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from confide.client.apps import credit_lstm, make_client_app, make_numpy_client_app
from confide.client.models import build_model, get_weights
from confide.sims.engine import instruction


@pytest.mark.slow
def test_builtin_clientapp_runs_unchanged_under_flower_run_simulation() -> None:
    outcome: dict[str, object] = {}

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        model = build_model("seq-lstm")
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
            train_config=ConfigRecord({"max-steps": 30, "lr": 0.05}),
        )
        outcome["initial"] = initial.to_numpy_ndarrays()
        outcome["result"] = result

    run_simulation(
        server_app=server,
        client_app=credit_lstm,  # what a user names as confide.client.apps:credit_lstm
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


def test_numpy_client_flavour_answers_flowers_legacy_messages_like_the_message_app() -> None:
    # What Flower's legacy server (NumPyClient strategies) sends: FitIns as a RecordDict.
    weights = get_weights(build_model("seq-lstm"))
    config = {"server-round": 1, "lr": 0.05, "max-steps": 3}
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 1, "num-partitions": 3},
        state=RecordDict(),
        run_config={"max-samples-per-site": 120},
    )
    legacy = fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(weights), dict(config)), keep_input=True
    )
    reply = make_numpy_client_app("credit-lstm")(
        instruction(legacy, 2, MessageType.TRAIN, 1, "legacy"), context
    )
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    legacy_weights = parameters_to_ndarrays(fitres.parameters)

    modern = RecordDict(
        {"arrays": ArrayRecord([w.copy() for w in weights]), "config": ConfigRecord(config)}
    )
    reply2 = make_client_app("credit-lstm")(
        instruction(modern, 2, MessageType.TRAIN, 1, "modern"), context
    )
    modern_weights = reply2.content.array_records["arrays"].to_numpy_ndarrays()
    assert fitres.num_examples == int(reply2.content.metric_records["metrics"]["num-examples"])
    assert fitres.num_examples == 120  # the cap applies to the training part
    for a, b in zip(legacy_weights, modern_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, modern_weights, strict=True))
