"""The DP privacy ledger: ε from recorded events, recomputed independently, fail-closed budgets.

Real SQLite files, real Opacus (PRV, RDP) and Google's dp-accounting (PLD) as the second,
independent library.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
from pathlib import Path

import pytest

from confide.errors import ConfideError
from confide.privacy.dp import (
    BudgetExceeded,
    DpEvent,
    InvalidDpEvent,
    LedgerCorrupted,
    NoBudget,
    PrivacyLedger,
    accountant_versions,
    epsilon,
    epsilon_report,
    projected_epsilon,
)
from confide.privacy.dp import accounting as acc

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant  # noqa: E402

DELTA = 1e-5
T0 = 1_700_000_000.0
_clock = itertools.count()


def ev(
    sigma: float,
    q: float,
    steps: int,
    *,
    fed: str = "fed-a",
    rnd: int = 0,
    site: str | None = None,
    mech: str = "dp-sgd",
    n: int = 20_000,
) -> DpEvent:
    return DpEvent(
        mechanism=mech,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        clip_norm=1.0,
        delta=DELTA,
        dataset_size=n,
        federation=fed,
        round=rnd,
        time=T0 + next(_clock),
        site=site,
    )


def heterogeneous(count: int, seed: int, *, fed: str = "fed-a") -> list[DpEvent]:
    """Rounds of DP-SGD with q = 0.01..0.05, σ = 0.8..1.5, 50..500 steps each."""
    rng = random.Random(seed)
    return [
        ev(
            rng.choice([0.8, 1.0, 1.2, 1.5]),
            rng.choice([0.01, 0.02, 0.03, 0.05]),
            rng.choice([50, 100, 200, 500]),
            fed=fed,
            rnd=i,
        )
        for i in range(count)
    ]


def pld_epsilon(events: list[DpEvent], delta: float) -> float:
    """Independent recomputation: dp-accounting's PLD accountant, one event at a time."""
    a = PLDAccountant()
    for e in events:
        gauss = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        one = (
            gauss
            if e.sample_rate == 1
            else dp_accounting.PoissonSampledDpEvent(e.sample_rate, gauss)
        )
        a.compose(one, e.steps)
    return float(a.get_epsilon(delta))


@pytest.fixture
def site_ledger(tmp_path: Path) -> PrivacyLedger:
    led = PrivacyLedger(tmp_path / "site-a" / "privacy.db", site="site-a")
    yield led
    led.close()


# --- ε: PRV vs independent PLD, RDP beside it ----------------------------------------------


def test_prv_epsilon_equals_dp_accounting_pld_within_1_percent(site_ledger: PrivacyLedger) -> None:
    events = heterogeneous(6, seed=7, fed="fed-a") + heterogeneous(6, seed=8, fed="fed-b")
    for e in events:
        site_ledger.record(e)
    site_ledger.set_budget("site-a", 50.0, DELTA)

    prv = site_ledger.spent("site-a")
    pld = pld_epsilon(events, DELTA)
    rdp = site_ledger.spent("site-a", method="rdp")
    print(f"\nheterogeneous 12 events: PRV={prv:.4f} PLD={pld:.4f} RDP={rdp:.4f}")
    assert abs(prv - pld) / pld < 0.01
    assert rdp >= prv  # the cross-check direction: RDP is looser, never tighter
    report = site_ledger.summary()
    assert report["epsilon"] == prv and report["epsilon_rdp"] == rdp
    assert report["federations"] == {"fed-a": 6, "fed-b": 6}
    assert report["accountants"]["opacus"] == accountant_versions()["opacus"]


@pytest.mark.parametrize(
    ("events", "label"),
    [
        ([ev(1.5, 0.01, 100), ev(2.0, 0.02, 60)], "small ε"),
        ([ev(1.1, 0.004, 1000, rnd=r) for r in range(3)], "one (σ, q), 3 rounds"),
        (
            [
                ev(5.0, 1.0, 2, mech="gaussian"),
                ev(1.0, 0.1, 30, mech="dp-fedavg", n=50),
                ev(1.0, 0.02, 300),
            ],
            "gaussian + dp-fedavg + dp-sgd",
        ),
    ],
)
def test_prv_agrees_with_pld_across_regimes(events: list[DpEvent], label: str) -> None:
    prv = epsilon(events, DELTA)
    pld = pld_epsilon(events, DELTA)
    rdp = epsilon(events, DELTA, "rdp")
    print(f"\n{label}: PRV={prv:.4f} PLD={pld:.4f} RDP={rdp:.4f} RDP/PRV={rdp / prv:.3f}")
    assert abs(prv - pld) / pld < 0.01
    assert rdp >= prv
    # the library's own PLD path (method="pld") is the same recomputation, grouped
    assert epsilon(events, DELTA, "pld") == pytest.approx(pld, rel=1e-6)


def test_fast_composition_is_opacus_prv_accountant() -> None:
    """The ledger's PRV path computes what Opacus's PRVAccountant computes for that history."""
    from opacus.accountants import PRVAccountant

    events = heterogeneous(8, seed=3)
    groups = acc.group_events(events)
    err = acc._prv_eps_error(groups, DELTA)
    reference = PRVAccountant()
    reference.history = list(groups)
    want = reference.get_epsilon(DELTA, eps_error=err)
    assert epsilon(events, DELTA) == pytest.approx(want, rel=1e-6)


def test_two_hundred_events_accounted_across_federations() -> None:
    """A long history: PRV below RDP, a projected round above the spent ε (speed: the
    ``benchmarks/accountant.py`` table)."""
    events = [
        ev(
            random.Random(i).choice([0.8, 0.9, 1.0, 1.1, 1.2, 1.5]),
            random.Random(i + 1000).choice([0.005, 0.01, 0.02, 0.05]),
            random.Random(i + 2000).choice([10, 20, 50]),
            fed=f"fed-{i % 3}",
            rnd=i,
        )
        for i in range(200)
    ]
    prv = epsilon(events, DELTA)
    rdp = epsilon(events, DELTA, "rdp")
    projected = projected_epsilon(events, [ev(1.0, 0.01, 20, rnd=200)], DELTA)
    assert len(acc.group_events(events)) < 200  # repeated (σ, q) pairs are composed together
    assert prv < projected and rdp >= prv


# --- composition and persistence --------------------------------------------------------------


def test_costs_compose_across_rounds_and_federations_and_survive_reopening(
    tmp_path: Path,
) -> None:
    path = tmp_path / "privacy.db"
    rounds = [ev(1.1, 0.02, 200, fed="fed-a", rnd=r) for r in range(3)] + [
        ev(1.3, 0.03, 150, fed="fed-b", rnd=r) for r in range(2)
    ]
    seen: list[float] = []
    with PrivacyLedger(path, site="site-a") as led:
        led.set_budget("site-a", 20.0, DELTA)
        for e in rounds:
            led.record(e)
            seen.append(led.spent())
        spent = led.spent()
        assert len(led.events(federation="fed-a")) == 3
        assert len(led.events(federation="fed-b")) == 2
        assert [e.site for e in led.events()] == ["site-a"] * 5
    assert all(b > a for a, b in itertools.pairwise(seen))  # monotone in events
    # composed, not reset per round or per federation, and tighter than summing ε per event
    assert spent == pytest.approx(epsilon(rounds, DELTA), rel=1e-12)
    assert spent > max(epsilon([e], DELTA) for e in rounds)
    assert spent < sum(epsilon([e], DELTA) for e in rounds)
    with PrivacyLedger(path, site="site-a") as again:
        assert again.spent() == spent
        assert again.remaining() == pytest.approx(20.0 - spent)
        assert again.events() == [e.with_site("site-a") for e in rounds]
    assert projected_epsilon(rounds[:3], rounds[3:], DELTA) == pytest.approx(spent, rel=1e-12)


def test_recording_the_same_event_twice_counts_once(site_ledger: PrivacyLedger) -> None:
    e = ev(1.0, 0.02, 100)
    first = site_ledger.record(e)
    assert site_ledger.record(e) == first
    assert len(site_ledger.events()) == 1


# --- enforcement (fail closed) ----------------------------------------------------------------


def test_round_over_budget_is_refused_and_records_nothing(site_ledger: PrivacyLedger) -> None:
    site_ledger.set_budget("site-a", 3.0, DELTA)
    site_ledger.record(ev(1.1, 0.02, 300, rnd=0))
    spent = site_ledger.spent()
    ok = site_ledger.check("site-a", [ev(1.1, 0.02, 100, rnd=1)])
    assert ok.spent == spent and spent < ok.projected <= 3.0 and ok.remaining_after > 0
    big = [ev(0.8, 0.05, 500, rnd=1)]
    with pytest.raises(BudgetExceeded) as info:
        site_ledger.check("site-a", big)
    err = info.value
    assert isinstance(err, ConfideError)
    assert err.spent == pytest.approx(spent) and err.projected > 3.0 and err.epsilon_max == 3.0
    assert f"{err.projected:.4f}" in str(err) and f"{spent:.4f}" in str(err)
    assert "ε_max=3" in str(err) and "Fix:" in str(err)
    assert err.as_dict()["projected"] == err.projected
    assert len(site_ledger.events()) == 1 and site_ledger.spent() == spent


def test_no_budget_fails_closed(site_ledger: PrivacyLedger) -> None:
    with pytest.raises(NoBudget, match="Fix: set one"):
        site_ledger.check("site-a", [ev(1.0, 0.01, 10)])
    with pytest.raises(NoBudget):
        site_ledger.remaining()
    with pytest.raises(NoBudget):
        site_ledger.spent()
    assert site_ledger.spent(delta=DELTA) == 0.0


def test_coordinator_selects_only_sites_with_budget(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "mirror.db") as coord:
        for s in ("a", "b", "c"):
            coord.set_budget(s, 4.0, DELTA)
        coord.mirror([ev(0.8, 0.05, 500, site="b")])  # b has spent nearly all of it
        plan = [ev(1.1, 0.02, 100)]
        assert coord.spent("b") > 3.0
        assert coord.eligible(["a", "b", "c", "d"], plan) == ["a", "c"]  # d: no budget
        assert coord.eligible(["a", "c"], {"a": plan}) == ["a"]  # c: nothing planned


# --- coordinator mirror -----------------------------------------------------------------------


def test_mirror_is_idempotent_and_matches_the_site(tmp_path: Path) -> None:
    with (
        PrivacyLedger(tmp_path / "site.db", site="site-a") as site,
        PrivacyLedger(tmp_path / "coord.db") as coord,
    ):
        site.set_budget("site-a", 10.0, DELTA)
        coord.set_budget("site-a", 10.0, DELTA)
        for r in range(3):
            site.record(ev(1.2, 0.02, 100, rnd=r))
        upload = site.export()
        assert coord.mirror(upload) == 3
        assert coord.mirror(upload) == 0  # a retried upload
        assert coord.mirror(site.events()) == 0
        assert coord.spent("site-a") == site.spent()
        assert [d["uid"] for d in coord.export()] == [d["uid"] for d in upload]
        forged = dict(upload[0], steps=1)  # content changed, uid kept
        with pytest.raises(LedgerCorrupted):
            coord.mirror([forged])
        with pytest.raises(InvalidDpEvent):
            coord.mirror([ev(1.0, 0.01, 10)])  # no site
        assert coord.verify() == 3


# --- typed errors, append-only ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"mechanism": "gaussian", "sample_rate": 0.1}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"dataset_size": 0}, "dataset_size"),
        ({"federation": ""}, "federation"),
        ({"round": -1}, "round"),
        ({"mechanism": "laplace"}, "mechanism"),
        ({"site": ""}, "site"),
    ],
)
def test_bad_events_give_typed_errors(change: dict[str, object], field: str) -> None:
    good = ev(1.0, 0.01, 10).to_dict()
    with pytest.raises(InvalidDpEvent, match="Fix:") as info:
        DpEvent.from_dict({**good, **change})
    assert info.value.field == field
    assert isinstance(info.value, ConfideError)


def test_bad_budgets_and_delta_give_typed_errors(site_ledger: PrivacyLedger) -> None:
    with pytest.raises(InvalidDpEvent):
        site_ledger.set_budget("site-a", 0.0, DELTA)
    with pytest.raises(InvalidDpEvent):
        site_ledger.set_budget("site-a", 1.0, 0.0)
    with pytest.raises(acc.AccountingError):
        epsilon([ev(1.0, 0.01, 10)], 0.0)


def test_ledger_is_append_only_and_detects_tampering(tmp_path: Path) -> None:
    forbidden = ("delete", "remove", "update", "edit", "reset", "clear", "drop", "truncate")
    assert not [n for n in dir(PrivacyLedger) if any(w in n.lower() for w in forbidden)]
    path = tmp_path / "privacy.db"
    with PrivacyLedger(path, site="site-a") as led:
        led.set_budget("site-a", 10.0, DELTA)
        for r in range(3):
            led.record(ev(1.0, 0.02, 200, rnd=r))
        spent = led.spent()
    raw = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("UPDATE dp_events SET steps = 1 WHERE id = 2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("DELETE FROM dp_events WHERE id = 3")
    # someone determined drops the guard and lowers the recorded cost of a round
    raw.execute("DROP TRIGGER dp_events_no_update")
    raw.execute("UPDATE dp_events SET steps = 1 WHERE id = 2")
    raw.commit()
    with PrivacyLedger(path, site="site-a") as led:
        with pytest.raises(LedgerCorrupted, match="row 2"):
            led.spent()
        with pytest.raises(LedgerCorrupted):
            led.check("site-a", [ev(1.0, 0.02, 1)])  # fails closed
        assert led.eligible(["site-a"], [ev(1.0, 0.02, 1)]) == []
    # opening the ledger re-armed the guard; drop it again, restore ...
    raw.execute("DROP TRIGGER dp_events_no_update")
    raw.execute("UPDATE dp_events SET steps = 200 WHERE id = 2")
    raw.execute("DROP TRIGGER dp_events_no_delete")
    raw.execute("DELETE FROM dp_events WHERE id = 3")  # ... and delete the last round instead
    raw.commit()
    raw.close()
    with PrivacyLedger(path, site="site-a") as led, pytest.raises(LedgerCorrupted, match="deleted"):
        led.events()
    assert spent > 0


def test_epsilon_report_shows_rdp_beside_prv() -> None:
    events = heterogeneous(4, seed=11)
    rep = epsilon_report(events, DELTA)
    assert rep["method"] == "prv" and rep["epsilon_rdp"] >= rep["epsilon"]
    assert 1.0 <= rep["rdp_over_prv"] < 1.6
    assert epsilon([], DELTA) == 0.0


def test_data_reports_are_append_only_and_tamper_evident(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with PrivacyLedger(path, site="h1") as ledger:
        rid = ledger.record_report("deid_report", {"k_achieved": 7, "rows_out": 100})
        assert ledger.reports()[0]["payload"] == {"k_achieved": 7, "rows_out": 100}
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE data_reports SET payload = '{}' WHERE id = ?", (rid,))
    db.execute("DROP TRIGGER data_reports_no_update")  # an attacker with file access
    db.execute("UPDATE data_reports SET payload = '{\"k_achieved\":50}' WHERE id = ?", (rid,))
    db.commit()
    db.close()
    with PrivacyLedger(path, site="h1") as ledger, pytest.raises(LedgerCorrupted):
        ledger.reports()
