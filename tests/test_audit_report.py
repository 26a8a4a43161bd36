"""The compliance report: ε recomputed from real ledgers, chains verified, one self-contained page.

Real SQLite ledgers and real signed audit logs made with Confide's classes; ε checked against
Google's dp-accounting PLD accountant, composed here independently of Confide's code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from confide.cli import main
from confide.errors import ConfideError
from confide.privacy.audit import AuditKey, AuditLog
from confide.privacy.dp import DpEvent, PrivacyLedger, epsilon
from confide.privacy.report import (
    ReportError,
    ReportInputs,
    build_report,
    inputs_from_files,
    inputs_from_json,
    render_html,
)

DELTA = 1e-5
T0 = 1_700_000_000.0


def ev(
    site: str,
    sigma: float,
    q: float,
    steps: int,
    *,
    fed: str = "fed-a",
    rnd: int = 0,
    mech: str = "dp-sgd",
    t: float = 0.0,
) -> DpEvent:
    return DpEvent(
        mechanism=mech,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        clip_norm=1.0,
        delta=DELTA,
        dataset_size=20_000,
        federation=fed,
        round=rnd,
        time=T0 + t,
        site=site,
    )


def make_ledger(path: Path, events: list[DpEvent], budgets: dict[str, tuple[float, float]]) -> Path:
    with PrivacyLedger(path) as led:
        for site, (eps_max, delta) in budgets.items():
            led.set_budget(site, eps_max, delta)
        for e in events:
            led.record(e)
    return path


def make_log(tmp_path: Path, entries: int = 5) -> tuple[Path, Path]:
    key = AuditKey.generate(tmp_path / "site.key")
    with AuditLog(tmp_path / "audit.db") as log:
        for i in range(entries):
            log.append("site:site-a", "dp_event", {"round": i, "epsilon": 0.1 * i}, key)
    pub = tmp_path / "site.pub.pem"
    key.write_public_key(pub)
    return tmp_path / "audit.db", pub


def drop_triggers(conn: sqlite3.Connection) -> None:
    names = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for (name,) in names:
        conn.execute(f"DROP TRIGGER {name}")


def site_of(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["sites"] if s["site"] == name)


# A mixture of σ, q, steps, mechanisms and federations; two events share (σ, q).
MIXTURE = [
    ev("site-a", 1.0, 0.01, 300, fed="fed-a", rnd=0, t=1),
    ev("site-a", 1.2, 0.02, 150, fed="fed-a", rnd=1, t=2),
    ev("site-a", 0.9, 0.005, 500, fed="fed-b", rnd=0, t=3),
    ev("site-a", 1.5, 0.1, 20, fed="fed-b", rnd=1, mech="dp-fedavg", t=4),
    ev("site-a", 1.0, 0.01, 300, fed="fed-a", rnd=2, t=5),
]


def test_report_epsilon_is_the_prv_epsilon_and_matches_dp_accounting_pld_within_1_percent(
    tmp_path: Path,
) -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    ledger = make_ledger(tmp_path / "ledger.db", MIXTURE, {"site-a": (8.0, DELTA)})
    report = build_report(inputs_from_files([ledger]), include_pld=True, curve_points=2)
    json.dumps(report, allow_nan=False)  # JSON-able as it is
    site = site_of(report, "site-a")

    # Recomputed here from the mechanisms alone, one event at a time, no Confide code.
    pld = dp_accounting.pld.PLDAccountant()
    for e in MIXTURE:
        gauss = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        step = dp_accounting.PoissonSampledDpEvent(e.sample_rate, gauss)
        pld.compose(dp_accounting.SelfComposedDpEvent(step, e.steps))
    independent = pld.get_epsilon(DELTA)

    assert site["epsilon"] == epsilon(MIXTURE, DELTA, "prv")
    assert site["epsilon"] == pytest.approx(independent, rel=0.01)
    assert site["epsilon_pld"] == pytest.approx(independent, rel=0.002)
    assert site["prv_over_pld"] == pytest.approx(site["epsilon"] / site["epsilon_pld"])
    assert site["epsilon_rdp"] == epsilon(MIXTURE, DELTA, "rdp") > site["epsilon"]
    assert site["rdp_over_prv"] == pytest.approx(site["epsilon_rdp"] / site["epsilon"])
    assert site["events"] == 5 and site["steps"] == 1270 and site["rounds"] == 5
    assert site["federations"] == {"fed-a": 3, "fed-b": 2}
    assert report["accountants"]["independent"] == "pld"
    assert set(report["accountants"]["versions"]) >= {"opacus", "dp-accounting"}
    # ε after each round: cumulative, RDP everywhere, the last point the ε spent.
    curve = site["curve"]
    assert [p["events"] for p in curve] == [1, 2, 3, 4, 5]
    assert curve[-1]["epsilon"] == site["epsilon"]
    assert curve[0]["epsilon"] == pytest.approx(epsilon(MIXTURE[:1], DELTA, "prv"), rel=0.02)
    rdps = [p["epsilon_rdp"] for p in curve]
    assert rdps == sorted(rdps) and rdps[-1] == site["epsilon_rdp"]
    assert [p["epsilon"] is not None for p in curve] == [True, False, True, False, True]
    row = site["event_rows"][3]
    assert (row["mechanism"], row["noise_multiplier"], row["sample_rate"], row["steps"]) == (
        "dp-fedavg",
        1.5,
        0.1,
        20,
    )
    assert row["uid"] == MIXTURE[3].uid and row["verified"] and row["federation"] == "fed-b"


def test_remaining_over_budget_and_no_budget_sites(tmp_path: Path) -> None:
    events = [
        ev("site-a", 1.1, 0.01, 100, rnd=0, t=1),
        ev("site-a", 1.1, 0.01, 100, rnd=1, t=2),
        ev("site-b", 0.8, 0.05, 200, rnd=0, t=1),
        ev("site-c", 1.0, 0.02, 50, rnd=0, t=1),
    ]
    ledger = make_ledger(
        tmp_path / "mirror.db",
        events,
        {"site-a": (8.0, DELTA), "site-b": (1.0, DELTA), "site-d": (3.0, DELTA)},
    )
    report = build_report(inputs_from_files([ledger]), include_pld=False)
    a, b, c, d = (site_of(report, s) for s in ("site-a", "site-b", "site-c", "site-d"))

    assert a["ok"] and a["status"] == "OK: within budget" and a["flags"] == []
    assert a["epsilon"] == epsilon(events[:2], DELTA, "prv")
    assert a["remaining"] == pytest.approx(8.0 - a["epsilon"])
    assert a["budget"] == {"epsilon_max": 8.0, "delta": DELTA}
    assert a["fraction_used"] == pytest.approx(a["epsilon"] / 8.0)

    assert not b["ok"] and b["status"] == "FAIL: over budget"
    assert b["epsilon"] > 1.0 and b["remaining"] == 0.0
    assert b["over_by"] == pytest.approx(b["epsilon"] - 1.0)
    assert [f["flag"] for f in b["flags"]] == ["over_budget"]

    # No budget: reported with its ε (at the events' δ) and failing closed, not crashed on.
    assert not c["ok"] and c["status"] == "FAIL: no budget (fail closed)"
    assert c["budget"] is None and c["remaining"] is None
    assert c["delta_source"] == "events" and c["epsilon"] == epsilon(events[3:], DELTA, "prv")
    assert "fail closed" in c["flags"][0]["message"]

    assert d["ok"] and d["epsilon"] == 0.0 and d["remaining"] == 3.0 and d["events"] == 0

    v = report["verdict"]
    assert not v["ok"] and not v["sites_within_budget"]
    assert v["ledger_rows_verify"] and v["audit_chains_verify"]
    assert any("site-b: over budget" in f for f in v["failures"])
    assert any("site-c: no privacy budget" in f for f in v["failures"])
    assert not any("site-a" in f or "site-d" in f for f in v["failures"])
    assert "no audit log was given, so none was verified" in v["warnings"]

    only = build_report(inputs_from_files([ledger]), include_pld=False, sites=["site-a"])
    assert [s["site"] for s in only["sites"]] == ["site-a"] and only["verdict"]["ok"]
    with pytest.raises(ReportError, match=r"site-x.*Fix:"):
        build_report(inputs_from_files([ledger]), include_pld=False, sites=["site-x"])


def test_an_edited_audit_entry_fails_the_verdict_at_its_seq_and_the_command_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = make_ledger(
        tmp_path / "ledger.db", [ev("site-a", 1.0, 0.01, 50)], {"site-a": (4.0, DELTA)}
    )
    log, pub = make_log(tmp_path)
    out, js = tmp_path / "out" / "report.html", tmp_path / "out" / "report.json"
    argv = ["audit", "report", "--ledger", str(ledger), "--log", str(log), "--trust", str(pub)]
    argv += ["--out", str(out), "--json", str(js), "--no-pld"]

    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "OK   site site-a: ε=" in printed and "PASS" in printed and str(out) in printed
    clean = json.loads(js.read_text())
    assert clean["verdict"]["ok"] and clean["audit"][0]["entries"] == 5

    conn = sqlite3.connect(log)
    drop_triggers(conn)
    conn.execute(
        "UPDATE audit_entries SET payload = ? WHERE seq = 3", ('{"epsilon":0.0,"round":2}',)
    )
    conn.commit()
    conn.close()
    out.unlink()

    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "FAIL audit log" in printed and "first at seq 3" in printed and "FAIL:" in printed
    report = json.loads(js.read_text())
    audit = report["audit"][0]
    assert not report["verdict"]["ok"] and not report["verdict"]["audit_chains_verify"]
    assert not audit["ok"] and audit["entries"] == 5
    assert (3, "hash") in {(p["seq"], p["check"]) for p in audit["problems"]}
    assert any("seq 3" in f for f in report["verdict"]["failures"])
    assert report["verdict"]["sites_within_budget"]  # only the chain failed
    assert out.is_file() and "BROKEN" in out.read_text()


def test_a_tampered_ledger_is_a_failed_check_in_the_report_and_the_file_is_left_as_found(
    tmp_path: Path,
) -> None:
    events = [ev("site-a", 1.0, 0.01, 100, rnd=r, t=r) for r in range(3)]
    ledger = make_ledger(tmp_path / "ledger.db", events, {"site-a": (8.0, DELTA)})
    with PrivacyLedger(ledger, site="site-a") as led:
        led.record_report("deid_report", {"k_requested": 5, "k_achieved": 7, "rows_in": 10})
    conn = sqlite3.connect(ledger)
    drop_triggers(conn)
    conn.execute("UPDATE dp_events SET steps = 1 WHERE id = 2")  # lower a round's cost
    conn.execute("UPDATE data_reports SET payload = '{\"k_achieved\":50}' WHERE id = 1")
    conn.commit()
    conn.close()
    before = hashlib.sha256(ledger.read_bytes()).hexdigest()

    inputs = inputs_from_files([ledger])
    report = build_report(inputs, include_pld=False, curve_points=1)

    check = report["ledger"]["sources"][0]
    assert not check["ok"] and "row 2" in check["message"] and str(ledger) in check["message"]
    problems = report["ledger"]["row_problems"]
    assert [p["id"] for p in problems] == [2, 1]
    assert "no longer matches its uid" in problems[0]["message"]
    assert "sha256" in problems[1]["message"]
    v = report["verdict"]
    assert not v["ok"] and not v["ledger_rows_verify"] and v["sites_within_budget"]
    site = site_of(report, "site-a")
    assert [r["verified"] for r in site["event_rows"]] == [True, False, True]
    assert site["data_reports"]["count"] == 1
    assert site["data_reports"]["reports"][0]["verified"] is False
    # Read from a snapshot: the evidence is byte-for-byte as found (no trigger re-created).
    assert hashlib.sha256(ledger.read_bytes()).hexdigest() == before
    conn = sqlite3.connect(ledger)
    assert (
        conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0] == 0
    )
    conn.execute("DELETE FROM dp_events WHERE id = 3")
    conn.commit()
    conn.close()
    deleted = build_report(inputs_from_files([ledger]), include_pld=False, curve_points=1)
    assert "deleted" in deleted["ledger"]["sources"][0]["message"]
    assert not deleted["verdict"]["ok"]


def test_the_html_is_self_contained_embeds_the_plot_and_escapes_names(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script>"
    ledger = make_ledger(
        tmp_path / "ledger.db",
        [ev(evil, 1.0, 0.01, 50, rnd=0, t=1), ev(evil, 1.0, 0.01, 50, rnd=1, t=2)],
        {evil: (2.0, DELTA)},
    )
    log, pub = make_log(tmp_path, entries=2)
    inputs = inputs_from_files([ledger], [(log, [pub])])
    page = render_html(build_report(inputs, include_pld=False))

    assert "<script" not in page.lower() and "&lt;script&gt;alert(&#x27;x&#x27;)" in page
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", page, re.I)
    png = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert page.startswith("<!DOCTYPE html>") and "PASS" in page
    for section in ("Privacy budget per site", "ε over rounds", "DP events", "Accountants"):
        assert section in page
    assert "Audit-log chain verification" in page and "How to recompute" in page
    assert "PoissonSampledDpEvent" in page and "SelfComposedDpEvent" in page


def test_inputs_round_trip_through_json_and_give_the_same_report(tmp_path: Path) -> None:
    ledger = make_ledger(
        tmp_path / "ledger.db",
        [ev("site-a", 1.0, 0.01, 60, rnd=0, t=1), ev("site-b", 1.3, 0.02, 40, rnd=0, t=1)],
        {"site-a": (3.0, DELTA)},
    )
    with PrivacyLedger(ledger, site="site-a") as led:
        led.record_report("deid_report", {"k_requested": 5, "k_achieved": 6})
    log, pub = make_log(tmp_path, entries=3)
    with AuditLog(log) as a:
        head = a.head()
    # The same ledger twice (a site's file and the coordinator's mirror): counted once.
    inputs = inputs_from_files([ledger, ledger], [(log, [pub], head)])
    wire = json.dumps(inputs.to_json())
    back = inputs_from_json(wire)

    assert back == inputs and inputs_from_json(json.loads(wire)) == inputs
    first = build_report(inputs, include_pld=False)
    second = build_report(back, include_pld=False)
    for key in ("verdict", "sites", "ledger", "audit"):
        assert first[key] == second[key]
    assert first["ledger"]["duplicates_merged"] == 2 and site_of(first, "site-a")["events"] == 1
    assert first["audit"][0]["ok"] and first["audit"][0]["expected_head"] == head
    assert site_of(first, "site-a")["data_reports"]["by_kind"] == {"deid_report": 2}
    assert not first["verdict"]["ok"]  # site-b has no budget
    for bad in (
        "not json",
        "[]",
        '{"format": "other"}',
        '{"format": "confide-report-inputs-1", "events": [1]}',
    ):
        with pytest.raises(ReportError, match="Fix:"):
            inputs_from_json(bad)
    assert ReportInputs().to_json()["format"] == "confide-report-inputs-1"


def test_usage_errors_exit_2_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = make_ledger(tmp_path / "ledger.db", [], {"site-a": (1.0, DELTA)})
    log, pub = make_log(tmp_path, entries=1)
    out = ["--out", str(tmp_path / "r.html"), "--no-pld"]
    base = ["audit", "report", "--ledger"]

    assert main([*base, str(tmp_path / "missing.db"), *out]) == 2
    assert "missing.db not found. Fix:" in capsys.readouterr().err
    assert main([*base, str(log), *out]) == 2  # an audit log is not a ledger
    assert "not a privacy ledger" in capsys.readouterr().err
    assert main([*base, str(ledger), "--log", str(log), *out]) == 2
    assert "no --trust key follows it" in capsys.readouterr().err
    assert main([*base, str(ledger), "--log", str(log), "--trust", str(log), *out]) == 2
    assert "Fix:" in capsys.readouterr().err  # not a PEM public key
    assert main([*base, str(ledger), "--site", "nope", *out]) == 2
    with pytest.raises(SystemExit) as exc:
        main([*base, str(ledger), "--trust", str(pub), "--log", str(log), *out])
    assert exc.value.code == 2 and "must follow the --log" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    assert main([*base, str(ledger), "--log", str(log), "--trust", str(pub), *out]) == 0
    assert "PASS" in capsys.readouterr().out
    assert issubclass(ReportError, ConfideError)


@pytest.mark.slow
def test_three_sites_of_100_events_each_are_reported_in_full(tmp_path: Path) -> None:
    # Its speed is a benchmark figure (docs/audit.md), not a test: timing asserts flake.
    rng = random.Random(7)
    events = [
        ev(
            site,
            rng.choice([1.0, 1.1, 1.3]),
            rng.choice([0.004, 0.008, 0.01]),
            rng.choice([20, 50, 80]),
            fed="fed-1" if i < 60 else "fed-2",
            rnd=i % 60,
            t=60 * i,
        )
        for site in ("site-a", "site-b", "site-c")
        for i in range(100)
    ]
    budgets = {s: (8.0, DELTA) for s in ("site-a", "site-b", "site-c")}
    ledger = make_ledger(tmp_path / "mirror.db", events, budgets)
    report = build_report(inputs_from_files([ledger]), include_pld=False)
    page = render_html(report)
    assert report["verdict"]["ok"] and len(page) > 10_000
    for s in report["sites"]:
        assert s["events"] == 100 and s["rounds"] == 100
        assert s["epsilon"] == epsilon([e for e in events if e.site == s["site"]], DELTA)
