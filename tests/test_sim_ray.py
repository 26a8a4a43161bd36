"""The Ray engine: Flower's simulation engine with Confide's round driver, same results."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from confide.cli import main
from confide.errors import ConfigError
from confide.privacy.dp import PrivacyLedger
from confide.sims.config import SimRunConfig
from confide.sims.engine import SimResult, instruction, run_simulation
from confide.sims.ray_engine import GridLink, RayNotInstalled
from confide.sims.site import SimSiteApp, stamped_partition

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "apps"


def _both(values: dict[str, Any], tmp_path: Path) -> tuple[SimResult, SimResult]:
    runs = []
    for engine in ("inprocess", "ray"):
        cfg = SimRunConfig.build({**values, "engine": engine, "out": tmp_path / engine})
        runs.append(run_simulation(cfg, show_progress=False))
    return runs[0], runs[1]


def _assert_same_weights(a: SimResult, b: SimResult) -> None:
    # Exact: both engines run the same driver on the same seeded choices, and the sites
    # train with seeded shuffles, seeded DP-SGD noise (dp-noise-seed) and seeded SecAgg
    # rounding. (The in-process sites use this process's torch threads, Ray's actors one;
    # these small models give bit-identical results either way.)
    assert len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa, wb)


@pytest.mark.slow
def test_ray_and_inprocess_end_with_the_same_model_under_secagg_and_dp(tmp_path: Path) -> None:
    values = {
        "task": "credit-lstm",
        "sites": 4,
        "min_sites": 3,
        "rounds": 2,
        "seed": 1,
        "max_samples_per_site": 120,
        "max_test_samples": 300,
        "secure_aggregation": "secagg+",
        "dp": {
            "delta": 1e-5,
            "example": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps_per_round": 3},
        },
    }
    inproc, ray = _both(values, tmp_path)
    _assert_same_weights(inproc, ray)
    assert ray.history.meta["engine"] == "ray" and inproc.history.meta["engine"] == "inprocess"
    for ra, rb in zip(inproc.history.rounds, ray.history.rounds, strict=True):
        assert (ra.test_loss, ra.eval_loss, ra.sites_selected) == (
            rb.test_loss,
            rb.eval_loss,
            rb.sites_selected,
        )
        assert not rb.failures
    last = ray.history.rounds[-1]
    assert last.secure_aggregation is not None and last.secure_aggregation["survivors"] == 4
    assert last.dp is not None and last.dp["epsilon_max_site"] > 0
    with (
        PrivacyLedger(inproc.history.meta["dp"]["ledger"]) as la,
        PrivacyLedger(ray.history.meta["dp"]["ledger"]) as lb,
    ):  # the site agent's checks ran in the driver under Ray too
        assert la.sites() == lb.sites() == [f"site-000{i}" for i in range(4)]
        assert [e.steps for e in la.events(site="site-0001")] == [
            e.steps for e in lb.events(site="site-0001")
        ]


@pytest.mark.slow
def test_a_users_numpy_client_app_runs_the_same_under_both_engines(tmp_path: Path) -> None:
    values = {
        "app": "logreg:app",  # a NumPyClient in ClientApp(client_fn=...)
        "app_dir": EXAMPLES,
        "initial": "logreg:initial",
        "sites": 8,
        "fraction": 0.5,
        "rounds": 2,
        "seed": 3,
    }
    inproc, ray = _both(values, tmp_path)
    _assert_same_weights(inproc, ray)
    assert not any(np.array_equal(w, np.zeros_like(w)) for w in ray.weights)  # it trained
    last = ray.history.rounds[-1]
    assert last.sites_selected == 4 and last.sites_succeeded == 4 and not last.failures
    assert last.eval_accuracy is not None and last.eval_accuracy > 0.7
    assert last.test_accuracy is None  # no built-in task: no central test set
    assert ray.model_path.name == "model.npz"
    saved = np.load(ray.model_path)
    np.testing.assert_array_equal(saved["0"], ray.weights[0])


def test_ray_engine_without_ray_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    cfg = SimRunConfig(task="credit-lstm", engine="ray", out=tmp_path)
    with pytest.raises(RayNotInstalled, match=r"pip install 'confide\[ray\]'") as err:
        run_simulation(cfg, show_progress=False)
    assert err.value.field == "engine"
    code = main(["sim", "run", "--task", "credit-lstm", "--engine", "ray", "--out", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("confide: error: engine: ray is not installed")


def test_an_app_without_a_model_or_initial_is_refused_naming_the_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ConfigError) as err:
        SimRunConfig.build({"app": "logreg:app", "app_dir": EXAMPLES})
    assert err.value.field == "initial" and "--model" in err.value.fix
    code = main(["sim", "run", "--app", "logreg:app", "--app-dir", str(EXAMPLES)])
    out = capsys.readouterr().err
    assert code == 2 and "confide: error: initial:" in out and "--initial" in out
    assert SimRunConfig.build({"app": "logreg:app", "model": "cnn-small"}).model_name == "cnn-small"


def test_the_site_wrapper_gives_the_app_the_run_config_and_keeps_the_nodes_state() -> None:
    seen: dict[str, Any] = {}

    from flwr.clientapp import ClientApp

    inner = ClientApp()

    @inner.train()
    def _train(msg: Message, context: Context) -> Message:
        seen.update(context.run_config)
        context.state.config_records["count"] = ConfigRecord(
            {"n": int(context.state.config_records.get("count", {"n": 0})["n"]) + 1}
        )
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk full")
        return Message(RecordDict({"arrays": msg.content.array_records["arrays"]}), reply_to=msg)

    app = SimSiteApp(inner, {"seed": 7, "partition": "iid"})
    node = Context(5, 42, {"partition-id": 3, "num-partitions": 4}, RecordDict(), {"seed": 1})
    content = RecordDict({"arrays": ArrayRecord([np.ones(2, np.float32)])})
    for _ in range(2):
        reply = app(instruction(content, 42, MessageType.TRAIN, 1, str(uuid.uuid4())), node)
    assert stamped_partition(reply) == 3
    assert seen == {"seed": 1, "partition": "iid"}  # the node's own values win
    assert node.run_config == {"seed": 1}  # Flower forbids changing it; it is not changed
    assert node.state.config_records["count"]["n"] == 2  # state outlives calls
    bad = Context(5, 43, {"partition-id": 1, "num-partitions": 4}, RecordDict(), {})
    reply = app(instruction(content, 43, MessageType.TRAIN, 1, "m"), bad)
    assert reply.has_error() and reply.error.reason == "RuntimeError: disk full"


class _UnorderedGrid:
    """A Grid whose node ids come in no useful order and that keeps no link state."""

    def __init__(self, app: SimSiteApp, num: int) -> None:
        rng = np.random.default_rng(0)
        ids = [int(i) for i in rng.choice(2**40, size=num, replace=False) + 1]
        self.nodes = {
            node: Context(1, node, {"partition-id": p, "num-partitions": num}, RecordDict(), {})
            for p, node in enumerate(ids)
        }
        self.app = app
        self.outbox: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return set(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(msg.metadata.message_id)
            self.outbox[msg.metadata.message_id] = self.app(
                msg, self.nodes[msg.metadata.dst_node_id]
            )
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.outbox.pop(i) for i in message_ids if i in self.outbox]


def test_grid_link_asks_the_nodes_for_their_partitions_when_the_grid_keeps_no_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from flwr.clientapp import ClientApp

    for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, key, value)  # what Flower's runtime sets
    echo = ClientApp()

    @echo.train()
    def _train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)

    grid = _UnorderedGrid(SimSiteApp(echo, {}), 50)
    link = GridLink(grid, 50, abort=threading.Event())
    partitions = {ctx.node_config["partition-id"]: node for node, ctx in grid.nodes.items()}
    assert link.node_of == [partitions[p] for p in range(50)]
    replies = link.exchange([3, 17, 49], MessageType.TRAIN, RecordDict(), 1, lambda: None)
    assert sorted(replies) == [3, 17, 49]
    for site, reply in replies.items():
        assert isinstance(reply, Message) and stamped_partition(reply) == site


def test_a_users_app_from_the_cli_at_a_thousand_sites_touches_only_the_selected(
    tmp_path: Path,
) -> None:
    from confide.sims.engine import InProcessEngine

    argv = ["--app", "logreg:message_app", "--app-dir", str(EXAMPLES)]
    argv += ["--initial", "logreg:initial", "--sites", "1000", "--fraction", "0.01"]
    code = main(["sim", "run", *argv, "--rounds", "2", "--quiet", "--out", str(tmp_path / "c")])
    assert code == 0 and (tmp_path / "c" / "model.npz").is_file()
    cfg = SimRunConfig.build(
        {
            "app": "logreg:message_app",
            "app_dir": EXAMPLES,
            "initial": "logreg:initial",
            "sites": 1000,
            "fraction": 0.01,
            "rounds": 2,
            "out": tmp_path / "e",
        }
    )
    engine = InProcessEngine(cfg, show_progress=False)
    result = engine.run()
    assert [r.sites_succeeded for r in result.history.rounds[1:]] == [10, 10]
    assert len(engine.link.contexts) <= 40  # 2 rounds x (10 trained + 10 evaluated)
    assert result.history.rounds[-1].eval_accuracy is not None
