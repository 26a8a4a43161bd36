"""Smoke run of the transport benchmark (--quick): real coordinator, mutual TLS, loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transport.py"


@pytest.mark.slow
def test_transport_quick_run_prints_a_table_and_writes_positive_figures(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "┃" in proc.stdout or "|" in proc.stdout  # a table was printed
    assert "Throughput" in proc.stdout and "Round overhead" in proc.stdout

    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1
    rows = [row for t in data["throughput"] for row in t["rows"]]
    assert {row["direction"] for row in rows} == {"download", "upload"}
    for row in rows:
        assert row["payload_bytes"] > 0
        assert row["confide_mb_s"] > 0 and row["raw_mb_s"] > 0
    assert data["rounds"], "no federation was run"
    for run in data["rounds"]:
        assert run["round_seconds"] and all(s > 0 for s in run["round_seconds"])
        assert run["sites_succeeded_min"] == run["sites"]
        assert run["agent_exit_codes_ok"]
    # The raw grpcio floor of the same rounds: every site's download and upload, timed.
    (floor,) = data["raw_round_floor"]
    assert floor["sites"] == data["rounds"][0]["sites"]
    assert len(floor["round_seconds"]) == data["settings"]["rounds"]
    assert all(s > 0 for s in floor["round_seconds"])
    assert floor["server_cpu_s_per_round"] > 0 and floor["clients_cpu_s_per_round"] > 0
    assert "raw grpcio floor" in proc.stdout
