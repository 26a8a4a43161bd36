"""Smoke runs of every benchmark script (--quick), so a broken benchmark fails CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


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
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "┃" in proc.stdout or "|" in proc.stdout  # a table was printed
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1


@pytest.mark.slow
def test_secagg_benchmark_quick_run_checks_the_aggregate_and_writes_real_figures(
    tmp_path: Path,
) -> None:
    out = tmp_path / "secagg.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "secagg.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
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
    proc = subprocess.run(
        [sys.executable, str(BENCH / "cost_validation.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["bytes_per_round_measured"] > 1_000_000  # two cnn-small transfers per site
    assert abs(result["bytes_error"]) < 0.02, result
    assert result["round_seconds_measured"] > 0 and result["round_seconds_estimated"] > 0
