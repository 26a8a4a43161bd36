"""Differential privacy across a real federation: the coordinator over loopback mutual TLS,
site agents with their own ledgers and budgets, the built-in apps under Opacus DP-SGD."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation_helpers import Federation, make_federation, running_coordinator
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from confide.client.agent import SiteAgent, validate_site_config
from confide.privacy.audit import AuditKey, AuditLog, trust_store
from confide.privacy.crypto import load_kit
from confide.privacy.dp import DpEvent, PrivacyLedger, epsilon
from confide.server.store import Store

pytestmark = pytest.mark.slow

SIGMA, RATE, STEPS, CLIP = 1.0, 0.05, 4, 1.0


def _dp_federation(tmp_path: Path, *, sites: int = 3, rounds: int = 2, **dp: Any) -> Federation:
    names = tuple(f"site-{i}" for i in range(1, sites + 1))
    fed = make_federation(
        tmp_path, sites=names, rounds=rounds, min_sites=2, expected=sites, max_attempts=1
    )
    fed.doc["evaluation"] = {"fraction": 0.0}
    fed.doc["dp"] = dp or {
        "delta": 1e-5,
        "example": {
            "noise_multiplier": SIGMA,
            "sample_rate": RATE,
            "steps_per_round": STEPS,
            "clip_norm": CLIP,
        },
    }
    return fed


def _site(
    fed: Federation,
    name: str,
    pid: int,
    num: int,
    *,
    epsilon_max: float | None = 50.0,
    app: ClientApp | None = None,
    require_dp: bool = True,
) -> SiteAgent:
    doc = fed.site_doc(pid, num)
    doc["state_dir"] = str(fed.root / f"{name}-state")
    if epsilon_max is not None:
        doc["privacy"] = {"epsilon_max": epsilon_max, "delta": 1e-5, "require_dp": require_dp}
    return SiteAgent(load_kit(fed.kit(name)), validate_site_config(doc), app=app)


def _wait(fed: Federation, codes: list[int], timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not codes and time.monotonic() < end:
        time.sleep(0.2)
    assert codes, "the federation did not finish in time"
    for t in fed.threads:
        t.join(timeout=30)
    assert not fed.errors, fed.errors


def _rounds(fed: Federation) -> list[Any]:
    with Store(fed.root / "state") as store:
        return store.rounds()


def test_example_level_dp_is_recorded_at_every_site_and_mirrored(tmp_path: Path) -> None:
    fed = _dp_federation(tmp_path)
    agents = [_site(fed, f"site-{i}", i - 1, 3) for i in (1, 2, 3)]
    with running_coordinator(fed) as (_coordinator, codes):
        for a in agents:
            fed.start_agent(a)
        _wait(fed, codes)
    assert codes == [0]

    mirror = PrivacyLedger(fed.root / "state" / "ledger.db")
    for i in (1, 2, 3):
        site = f"site-{i}"
        with PrivacyLedger(fed.root / f"{site}-state" / "ledger.db", site=site) as ledger:
            events = ledger.events()
            # One DP-SGD event per round with exactly the plan's σ, q, steps, C.
            assert [(e.mechanism, e.round) for e in events] == [("dp-sgd", 1), ("dp-sgd", 2)]
            assert {(e.noise_multiplier, e.sample_rate, e.steps, e.clip_norm) for e in events} == {
                (SIGMA, RATE, STEPS, CLIP)
            }
            assert all(e.dataset_size == 300 and e.federation == "testfed" for e in events)
            # The coordinator's mirror holds the same events, byte for byte (same uids).
            assert [r["uid"] for r in ledger.export()] == [r["uid"] for r in mirror.export(site)]
            spent = ledger.spent()
            assert spent == pytest.approx(epsilon(events, 1e-5))
            # Two rounds compose: more than one round's ε, less than twice it.
            one = epsilon(events[:1], 1e-5)
            assert one < spent < 2 * one
        # The site's signed audit log holds its DP events and verifies.
        key = AuditKey.load(fed.root / f"{site}-state" / "audit.key")
        with AuditLog(fed.root / f"{site}-state" / "audit.db") as log:
            report = log.verify(trust_store(key.public_key_pem))
            assert report.ok, report.summary()
            kinds = [e.kind for e in log.entries()]
        assert kinds.count("dp_event") == 2 and "budget_set" in kinds
    mirror.close()

    history = json.loads((fed.root / "state" / "history.json").read_text())
    dp = history["rounds"][-1]["dp"]
    assert set(dp["epsilon"]) == {"site-1", "site-2", "site-3"}
    assert dp["epsilon_max_site"] == pytest.approx(max(dp["epsilon"].values()))
    key = AuditKey.load(fed.root / "state" / "audit.key")
    with AuditLog(fed.root / "state" / "audit.db") as log:
        assert log.verify(trust_store(key.public_key_pem)).ok
        kinds = [e.kind for e in log.entries()]
    assert kinds[0] == "dp_plan" and kinds.count("dp_events_mirrored") == 6


def test_target_epsilon_is_solved_for_the_whole_federation(tmp_path: Path) -> None:
    from confide.privacy.dp.federated import DpSettings

    settings = DpSettings.model_validate(
        {"delta": 1e-5, "example": {"target_epsilon": 3.0, "sample_rate": 0.02, "local_epochs": 1}}
    )
    plan = settings.resolve(rounds=10)
    assert settings.example is not None and settings.example.steps == 50
    worst = plan.worst_case_epsilon()
    # Every round spent by a site selected in all 10 rounds lands at, not over, the target.
    assert 2.97 <= worst <= 3.0
    sigma = plan.sgd_noise_multiplier
    assert sigma is not None
    looser = DpEvent("dp-sgd", sigma * 0.99, 0.02, 500, 1.0, 1e-5, 1, "f", 0, 0.0)
    assert epsilon([looser], 1e-5) > 3.0


def test_the_coordinator_leaves_out_a_site_without_budget(tmp_path: Path) -> None:
    fed = _dp_federation(tmp_path, rounds=1)
    one_round = epsilon(
        [DpEvent("dp-sgd", SIGMA, RATE, STEPS, CLIP, 1e-5, 1, "testfed", 1, 0.0)], 1e-5
    )
    agents = [
        _site(fed, "site-1", 0, 3),
        _site(fed, "site-2", 1, 3),
        _site(fed, "site-3", 2, 3, epsilon_max=one_round * 0.5),  # cannot afford a round
    ]
    with running_coordinator(fed) as (_coordinator, codes):
        for a in agents:
            fed.start_agent(a)
        _wait(fed, codes)
    assert codes == [0]
    (row,) = [r for r in _rounds(fed) if r.round == 1]
    assert row.selected == ["site-1", "site-2"]  # site-3 was never asked
    with PrivacyLedger(fed.root / "site-3-state" / "ledger.db", site="site-3") as ledger:
        assert ledger.events() == []
    with AuditLog(fed.root / "state" / "audit.db") as log:
        started = [e.payload for e in log.entries() if e.kind == "round_started"]
    assert started[0]["left_out"] == {"site-3": "BudgetExceeded"}


def test_a_site_refuses_a_round_over_its_budget_even_when_selected(tmp_path: Path) -> None:
    """The site's own check is what protects it: a coordinator that selects it anyway
    (here: its eligibility check is switched off) gets a typed refusal, recorded in the
    round, and the site's ledger is untouched."""
    fed = _dp_federation(tmp_path, rounds=1)
    one_round = epsilon(
        [DpEvent("dp-sgd", SIGMA, RATE, STEPS, CLIP, 1e-5, 1, "testfed", 1, 0.0)], 1e-5
    )
    agents = [
        _site(fed, "site-1", 0, 3),
        _site(fed, "site-2", 1, 3),
        _site(fed, "site-3", 2, 3, epsilon_max=one_round * 0.5),
    ]
    with running_coordinator(fed) as (coordinator, codes):
        coordinator.privacy.eligible = lambda sites, rnd: (list(sites), {})  # type: ignore[method-assign]
        for a in agents:
            fed.start_agent(a)
        _wait(fed, codes)
    assert codes == [0]
    (row,) = [r for r in _rounds(fed) if r.round == 1]
    assert row.selected == ["site-1", "site-2", "site-3"]
    assert row.succeeded == ["site-1", "site-2"]
    assert row.failures["site-3"].startswith("BUDGET_EXHAUSTED")
    assert "would exceed its budget" in row.failures["site-3"]
    with PrivacyLedger(fed.root / "site-3-state" / "ledger.db", site="site-3") as ledger:
        assert ledger.events() == []
    with AuditLog(fed.root / "site-3-state" / "audit.db") as log:
        refused = [e.payload for e in log.entries() if e.kind == "budget_refused"]
    assert refused and refused[0]["error"] == "BudgetExceeded"
    assert refused[0]["epsilon_max"] == pytest.approx(one_round * 0.5)


def _plain_app() -> ClientApp:
    """A Flower app that ignores the DP plan: trains nothing, returns the weights."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        reply = RecordDict(
            {"arrays": arrays, "metrics": MetricRecord({"num-examples": 10, "train_loss": 1.0})}
        )
        return Message(reply, reply_to=msg)

    return app


def test_a_result_that_did_not_apply_dp_is_withheld(tmp_path: Path) -> None:
    fed = _dp_federation(tmp_path, rounds=1)
    agents = [
        _site(fed, "site-1", 0, 3),
        _site(fed, "site-2", 1, 3),
        _site(fed, "site-3", 2, 3, app=_plain_app()),
    ]
    with running_coordinator(fed) as (_coordinator, codes):
        for a in agents:
            fed.start_agent(a)
        _wait(fed, codes)
    (row,) = [r for r in _rounds(fed) if r.round == 1]
    assert row.failures["site-3"].startswith("DP_NOT_APPLIED")
    with PrivacyLedger(fed.root / "site-3-state" / "ledger.db", site="site-3") as ledger:
        assert ledger.events() == []


def test_a_site_that_requires_dp_refuses_a_plain_round(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, sites=("site-1", "site-2", "site-3"), rounds=1, expected=3)
    fed.doc["evaluation"] = {"fraction": 0.0}
    agents = [
        _site(fed, "site-1", 0, 3, epsilon_max=None),
        _site(fed, "site-2", 1, 3, epsilon_max=None),
        _site(fed, "site-3", 2, 3),  # [privacy] require_dp = true by default
    ]
    with running_coordinator(fed) as (_coordinator, codes):
        for a in agents:
            fed.start_agent(a)
        _wait(fed, codes)
    (row,) = [r for r in _rounds(fed) if r.round == 1]
    assert row.failures["site-3"].startswith("DP_REQUIRED")
    assert row.succeeded == ["site-1", "site-2"]


@pytest.mark.parametrize(("noise", "secure"), [("central", "none"), ("distributed", "secagg+")])
def test_client_level_dp_clips_and_records_each_round(
    tmp_path: Path, noise: str, secure: str
) -> None:
    fed = _dp_federation(
        tmp_path,
        rounds=2,
        delta=1e-5,
        client={"noise": noise, "noise_multiplier": 0.8, "clip_norm": 0.5},
    )
    fed.doc["federation"]["secure_aggregation"] = secure
    fed.doc["selection"]["min_sites"] = 3
    agents = [_site(fed, f"site-{i}", i - 1, 3) for i in (1, 2, 3)]
    with running_coordinator(fed) as (coordinator, codes):
        start = [w.copy() for w in coordinator.weights]
        for a in agents:
            fed.start_agent(a)
        _wait(fed, codes)
        end = coordinator.weights
    assert codes == [0]
    for i in (1, 2, 3):
        with PrivacyLedger(fed.root / f"site-{i}-state" / "ledger.db", site=f"site-{i}") as led:
            events = led.events()
        assert [
            (e.mechanism, e.noise_multiplier, e.sample_rate, e.steps, e.clip_norm) for e in events
        ] == [("dp-fedavg", 0.8, 1.0, 1, 0.5)] * 2
    # Each round moves the model by the mean of clipped updates plus noise of std z·C/m
    # per coordinate; two rounds of it leave a clear but bounded trace.
    moved = np.sqrt(sum(float(np.sum((e - s) ** 2)) for s, e in zip(start, end, strict=True)))
    dim = sum(s.size for s in start)
    noise_norm = 0.8 * 0.5 / 3 * np.sqrt(dim)
    assert 0.5 * noise_norm < moved < 2 * (1.0 + noise_norm * np.sqrt(2))
