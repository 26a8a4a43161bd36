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
    "script", ["train_throughput.py", "fedavg_mnist.py", "fedavg_shakespeare.py"]
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
