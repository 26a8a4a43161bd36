"""SecAgg+ through the real coordinator: mutual TLS on loopback, real site agents."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation_helpers import OFFSET, make_federation, offset_app, running_coordinator, wait_for

from confide.errors import ConfigError
from confide.server.config import FederationConfig


def _run(tmp_path: Path, secure: bool, sites: int = 4, rounds: int = 2, **secagg: Any) -> Any:
    names = tuple(f"site-{i + 1}" for i in range(sites))
    fed = make_federation(
        tmp_path, sites=names, rounds=rounds, min_sites=3, deadline=60, expected=sites
    )
    if secure:
        fed.doc["federation"]["secure_aggregation"] = "secagg+"
        fed.doc["secagg"] = {"stage_deadline_seconds": 30, **secagg}
    with running_coordinator(fed) as (coordinator, codes):
        initial = [w.copy() for w in coordinator.weights]
        for i, name in enumerate(names):
            fed.start_agent(fed.agent(name, i, sites, app=offset_app()))
        wait_for(lambda: codes, 180, "the federation to finish")
        for t in fed.threads:
            t.join(timeout=20)
        final = [w.copy() for w in coordinator.weights]
    assert codes == [0], fed.errors
    assert not fed.errors
    history = json.loads((tmp_path / "state" / "history.json").read_text())
    return initial, final, history


@pytest.mark.slow
def test_secagg_over_the_coordinator_ends_with_the_plain_model_within_the_bound(
    tmp_path: Path,
) -> None:
    init_p, plain, _ = _run(tmp_path / "plain", secure=False)
    init_s, secure, history = _run(tmp_path / "secure", secure=True)
    rounds = {r["round"]: r for r in history["rounds"]}
    info = rounds[2]["secure_aggregation"]
    assert info["survivors"] == 4 and info["dropped"] == 0 and info["neighbours"] == 3
    assert rounds[2]["train_examples"] == 100 + 200 + 300 + 400  # the sum, never a site's
    bound = info["error_bound"]
    # Every site adds (p+1)*OFFSET, weighted by 100*(p+1): the mean step per round.
    step = sum((p + 1) * OFFSET * 100 * (p + 1) for p in range(4)) / 1000
    for a, b in zip(init_p, init_s, strict=True):
        np.testing.assert_array_equal(a, b)  # same seed, same initial model
    worst_plain = worst_secure = worst_between = 0.0
    for w0, p, s in zip(init_p, plain, secure, strict=True):
        if w0.dtype.kind != "f":
            continue
        expect = w0.astype(np.float64) + 2 * step
        worst_plain = max(worst_plain, float(np.abs(p - expect).max()))
        worst_secure = max(worst_secure, float(np.abs(s - expect).max()))
        worst_between = max(worst_between, float(np.abs(p.astype(np.float64) - s).max()))
    assert worst_plain < 1e-6  # float32 rounding only
    assert 0 < worst_secure <= 2 * bound + 1e-6  # two rounds of quantization
    assert worst_between <= 2 * bound + 2e-6


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "counted"), [(2, 3), (3, 3), (4, 4)])
def test_a_site_that_dies_in_a_stage_is_recovered(tmp_path: Path, stage: int, counted: int) -> None:
    """Site 4 stops when a stage's task reaches it. Stage 2: it never shared keys, nobody
    masks with it. Stage 3: its pairwise masks are removed via its key shares. Stage 4: its
    masked input is in the sum and the others' shares of its seed unmask it."""
    from confide.client import agent as agent_mod

    names = ("site-1", "site-2", "site-3", "site-4")
    fed = make_federation(tmp_path, sites=names, rounds=1, min_sites=3, deadline=60, expected=4)
    fed.doc["federation"]["secure_aggregation"] = "secagg+"
    fed.doc["secagg"] = {"stage_deadline_seconds": 20}
    fed.doc["evaluation"] = {"fraction": 0.0}

    class DiesAtStage(agent_mod.SiteAgent):
        def _do_secagg(self, task: Any) -> None:
            if dict(task.config)["secagg.stage"].int_value == stage:
                self.stop(1)  # the site goes away in the middle of the protocol
                raise agent_mod._Stopped
            super()._do_secagg(task)

    with running_coordinator(fed) as (coordinator, codes):
        initial = [w.copy() for w in coordinator.weights]
        for i, name in enumerate(names):
            agent = fed.agent(name, i, 4, app=offset_app())
            if name == "site-4":
                agent.__class__ = DiesAtStage
            fed.start_agent(agent)
        wait_for(lambda: codes, 180, "the federation to finish")
        final = [w.copy() for w in coordinator.weights]
    assert codes == [0]
    history = json.loads((tmp_path / "state" / "history.json").read_text())
    last = history["rounds"][-1]
    info = last["secure_aggregation"]
    assert info["survivors"] == counted and info["dropped"] == (1 if stage == 3 else 0)
    assert (counted == 3) == any("site-4" in f for f in last["failures"])
    weights = [100 * (p + 1) for p in range(counted)]
    step = sum((p + 1) * OFFSET * w for p, w in enumerate(weights)) / sum(weights)
    for w0, w in zip(initial, final, strict=True):
        if w0.dtype.kind == "f":
            err = np.abs(w.astype(np.float64) - (w0.astype(np.float64) + step)).max()
            assert err <= info["error_bound"] + 1e-6


def test_secagg_config_needs_three_sites(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, rounds=1, min_sites=2)
    fed.doc["federation"]["secure_aggregation"] = "secagg+"
    with pytest.raises(ConfigError, match=r"selection\.min_sites.*Fix"):
        FederationConfig.load(fed.toml)
    fed.doc["selection"]["min_sites"] = 3
    fed.doc["secagg"] = {"threshold": 0.3}
    with pytest.raises(ConfigError, match=r"secagg\.threshold"):
        FederationConfig.load(fed.toml)


def test_the_coordinator_rejects_malformed_secagg_messages(tmp_path: Path) -> None:
    """Checked before they reach the protocol: the site gets the reason, the round goes on."""
    from confide.server.coordinator import Coordinator
    from confide.server.rounds import Kind, Rejected, TaskSpec
    from confide.wire import Payload

    fed = make_federation(tmp_path, rounds=1, min_sites=3, sites=("a", "b", "c"))
    fed.doc["federation"]["secure_aggregation"] = "secagg+"
    coordinator = Coordinator(fed.config())
    try:
        config = {"secagg.stage": 3, "secagg.dim": 10, "secagg.site": 2}
        task = TaskSpec("t1", "b", Kind.SECAGG, 1, "", config, time.time() + 60)
        ok = {"secagg.site": 2, "secagg.bad": b""}
        coordinator.validate(task, Payload("t1", ["m"], [np.zeros(11, np.uint32)], ok))
        for arrays, metrics, reason in [
            ([np.zeros(11, np.float32)], ok, "uint32"),
            ([np.zeros(10, np.uint32)], ok, r"shape \(10 \+ 1,\)"),
            ([], ok, "exactly one array"),
            ([np.zeros(11, np.uint32)], {**ok, "secagg.site": 3}, "names site 3"),
            ([np.zeros(11, np.uint32)], {"secagg.site": 2}, "secagg.bad"),
        ]:
            with pytest.raises(Rejected, match=reason):
                coordinator.validate(task, Payload("t1", ["m"] * len(arrays), arrays, metrics))
        train = TaskSpec("t0", "b", Kind.TRAIN, 1, "m", {"secagg.site": 2}, time.time() + 60)
        with pytest.raises(Rejected, match="keys"):
            coordinator.validate(train, Payload("t0", [], [], {"secagg.keys": b"short"}))
        with pytest.raises(Rejected, match="carries no arrays"):
            coordinator.validate(
                train, Payload("t0", ["w"], [np.zeros(3, np.float32)], {"num-examples": 5})
            )
    finally:
        coordinator.store.close()
