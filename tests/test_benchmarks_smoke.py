"""Smoke runs of every benchmark script (--quick), so a broken benchmark fails CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def quick_run(script: str, out: Path) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/SCRIPT --quick --json OUT``, its output captured."""
    return subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [
        "train_throughput.py",
        "fedavg_mnist.py",
        "fedavg_shakespeare.py",
        "dp_accuracy.py",
        "sim_scale.py",  # N = 30: Flower's simulation, Confide on Ray and in process
        "sim_estimate.py",
        "accountant.py",
    ],
)
def test_benchmark_quick_run_prints_a_table_and_writes_json(script: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = quick_run(script, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "┃" in proc.stdout or "|" in proc.stdout  # a table was printed
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1


@pytest.mark.slow
def test_secagg_benchmark_quick_run_checks_the_aggregate_and_writes_real_figures(
    tmp_path: Path,
) -> None:
    out = tmp_path / "secagg.json"
    proc = quick_run("secagg.py", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "┃" in proc.stdout  # the tables were printed
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["mode"] for r in rows} == {"plus", "full"}
    for r in rows:
        assert r["problems"] == []
        assert 0 <= r["max_abs_error"] <= r["error_bound"]
        assert r["masked_upload_bytes"] == 4 * (r["D"] + 1)
        assert r["upload_bytes_per_site"] > r["masked_upload_bytes"]
        assert r["mask_s"] > 0 and r["unmask_s"] > 0 and r["share_keys_s_median"] > 0
        assert r["dropped"] == round(0.1 * r["N"])
        assert r["count"] > 0
        if data["flower_not_run"] is None:  # flwr installed: Flower's figures sit beside
            assert r["flower_figures"]["mask_s"] > 0
            assert r["flower_figures"]["unmask_s"] > 0
    assert [g["status"] for g in data["goals"]] == ["not run"] * 3  # --quick: no N=100 row


@pytest.mark.slow
def test_cost_validation_quick_run_meets_the_bytes_target(tmp_path: Path) -> None:
    """A real 3-site loopback federation against the estimate: bytes within 2 %."""
    out = tmp_path / "cost_validation.json"
    proc = quick_run("cost_validation.py", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["bytes_per_round_measured"] > 1_000_000  # two cnn-small transfers per site
    assert abs(result["bytes_error"]) < 0.02, result
    assert result["round_seconds_measured"] > 0 and result["round_seconds_estimated"] > 0


@pytest.mark.slow
def test_load_quick_run_completes_every_round_with_secagg(tmp_path: Path) -> None:
    """6 sites in 2 helper processes, the coordinator in its own process, SecAgg+, 2 rounds."""
    out = tmp_path / "load.json"
    proc = quick_run("load.py", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "┃" in proc.stdout  # the tables were printed
    data = json.loads(out.read_text())
    r = data["result"]
    assert r["every_round_completed"] and r["rounds_completed"] == 2
    assert r["survivors"] == [6, 6] and r["agents_exit_ok"] and r["problems"] == []
    assert r["coordinator_exit_code"] == 0
    assert r["rounds_per_minute"] > 0 and r["coordinator_peak_rss_mb"] > 0
    assert set(r["upload_s_by_kind"]) == {"secagg-1", "secagg-2", "secagg-3", "secagg-4"}
    assert all(v["n"] == 12 for v in r["upload_s_by_kind"].values())  # 6 sites x 2 rounds
    assert 0 < r["upload_s"]["p50"] <= r["upload_s"]["p95"] <= r["upload_s"]["max"]
    assert r["upload_array_bytes_by_kind"]["secagg-3"] == 4 * (1_001_000 + 1)  # masked vector
    assert [g["status"] for g in data["goals"]] == ["met", "not run"]  # --quick: no soak
