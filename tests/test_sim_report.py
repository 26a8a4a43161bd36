"""Run and estimate reports: the figures they state come from the history and the estimate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from confide.htmlpage import ReportError, esc
from confide.server.history import History, RoundRecord
from confide.sims.config import SimRunConfig
from confide.sims.cost import estimate_run
from confide.sims.report import (
    render_estimate_html,
    render_run_html,
    run_report,
    write_estimate_report,
    write_run_report,
)


def _history() -> History:
    h = History(task="mnist-cnn", strategy="fedavg", meta={"model": "cnn-small"})
    h.add(RoundRecord(round=0, test_accuracy=0.1, traffic={"up_bytes": 10, "down_bytes": 20}))
    for r, (acc, eps) in enumerate([(0.8, 0.5), (0.9, 0.75)], start=1):
        h.add(
            RoundRecord(
                round=r,
                sites_selected=3,
                sites_succeeded=3 - (r == 2),
                test_accuracy=acc,
                seconds=2.0 * r,
                dp={"epsilon_max_site": eps},
                traffic={"up_bytes": 1_000_000 * r, "down_bytes": 3_000_000, "source": "model"},
                failures=["site 2: TimeoutError: late"] if r == 2 else [],
            )
        )
    return h


def test_run_report_totals_come_from_the_rounds() -> None:
    report = run_report(_history())
    t = report["totals"]
    assert t["rounds"] == 2
    assert t["seconds"] == pytest.approx(6.0)
    assert t["bytes_down"] == 20 + 2 * 3_000_000
    assert t["bytes_up"] == 10 + 3_000_000
    assert t["final_test_accuracy"] == 0.9
    assert t["epsilon_max_site"] == 0.75
    assert report["bytes_source"] == "meter, model"
    assert [r["failures"] for r in report["rounds"]] == [0, 0, 1]
    json.dumps(report, allow_nan=False)  # the JSON export is strict JSON


def test_run_page_is_self_contained_and_states_the_figures(tmp_path: Path) -> None:
    est = estimate_run(SimRunConfig(task="mnist-cnn", model="cnn-small", sites=3, rounds=2))
    html_path, json_path = write_run_report(_history(), tmp_path, est.to_json())
    page = html_path.read_text()
    assert "<script" not in page and not re.search(r"(src|href)=['\"]https?:", page)
    assert page.count("data:image/png;base64,") == 2  # run curves + cost plot
    assert "0.750" in page  # ε of the most-spent site
    assert "4.000 / 6.000" not in page and "6.000 / 3.000" in page  # MB down / up
    saved = json.loads(json_path.read_text())
    assert saved["estimate"]["federation"]["sites"] == 3
    assert saved["estimate"]["usd"]["usd_total"] == pytest.approx(est.usd_total)


def test_estimate_page_lists_groups_and_sources(tmp_path: Path) -> None:
    est = estimate_run(SimRunConfig(task="mnist-cnn", sites=10, rounds=3)).to_json()
    page = render_estimate_html(est)
    assert "Site groups" in page and "Datacenter" in page
    assert est["sources"] and "Sources of the catalog numbers used" in page
    for number, source in est["sources"].items():
        assert f"<td>{esc(number)}</td><td>{esc(source)}</td>" in page
    paths = write_estimate_report(est, tmp_path / "e.html", None)
    assert [p.name for p in paths] == ["e.html"]


def test_an_unwritable_report_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportError, match="Fix: pass a writable path"):
        write_run_report(_history(), blocker / "sub")


def test_a_run_without_dp_or_traffic_still_renders() -> None:
    h = History(task="credit-mlp", strategy="fedavg")
    h.add(RoundRecord(round=0))
    h.add(RoundRecord(round=1, sites_selected=2, sites_succeeded=2, train_loss=0.5))
    report = run_report(h)
    assert report["totals"]["epsilon_max_site"] is None
    assert report["bytes_source"] is None
    assert "Federation report" in render_run_html(report)


def test_a_simulation_writes_its_report_with_the_wire_models_bytes(tmp_path: Path) -> None:
    from confide.privacy.secagg.federated import SecAggSettings
    from confide.sims.engine import run_inprocess
    from confide.sims.wirebytes import model_arrays, round_traffic

    cfg = SimRunConfig(
        task="credit-lstm",
        sites=3,
        rounds=2,
        max_samples_per_site=100,
        secure_aggregation="secagg+",
        out=tmp_path,
    )
    result = run_inprocess(cfg, show_progress=False)
    assert result.report_path == tmp_path / "report.html"
    report = json.loads((tmp_path / "report.json").read_text())
    expected = round_traffic(model_arrays("seq-lstm"), sites=3, secagg=SecAggSettings())
    for row in report["rounds"][1:]:
        assert row["bytes_down"] == expected.down_per_site * 3
        assert row["bytes_up"] == expected.up_per_site * 3
    assert report["bytes_source"] == "model"
    est = report["estimate"]
    assert est["federation"]["secure_aggregation"] == "secagg+"
    assert est["per_site_group"][0]["examples_per_site"] == 100
