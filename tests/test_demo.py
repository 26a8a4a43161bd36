"""`confide demo`: a real coordinator and site processes; nothing is left running afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True
    )
    return [line for line in out.stdout.splitlines() if text in line and "ps -eo" not in line]


def _demo(out: Path, *extra: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "confide.cli",
            "demo",
            "--out",
            str(out),
            "--model",
            "cnn-small",
            "--samples",
            "300",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A test run started in the background (`make test &`, nohup) inherits SIGINT
        # ignored, and so would the demo: give it the default, as a terminal would.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_runs_a_networked_federation_and_says_where_things_are(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _demo(Path("demo"), "--rounds", "2", cwd=tmp_path)  # relative, as `make demo` gives it
    stdout, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, stdout[-3000:]
    assert "listening on 127.0.0.1" in stdout and "(mutual TLS)" in stdout
    assert "round 2/2 done: 3/3 sites" in stdout
    for where in ("state database:", "history, plot:", "logs:", "kits:"):
        assert where in stdout
    history = json.loads((out / "state" / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    assert history["rounds"][-1]["eval_accuracy"] > history["rounds"][0]["eval_accuracy"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "coordinator.log",
        "site-1.log",
        "site-2.log",
        "site-3.log",
    ]
    assert not _processes_mentioning(str(out))


def test_ctrl_c_stops_every_process_of_the_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _demo(out, "--rounds", "50")
    assert proc.stdout is not None
    end = time.monotonic() + 180
    for line in proc.stdout:  # wait until the federation is really training
        if "round 1/50" in line or time.monotonic() > end:
            break
    assert len(_processes_mentioning(str(out))) >= 4  # coordinator and three sites
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted: stopping every process" in rest
    time.sleep(0.5)
    assert not _processes_mentioning(str(out))


def test_demo_with_secure_aggregation(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _demo(out, "--rounds", "1", "--secure-aggregation")
    stdout, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, stdout[-3000:]
    assert "secure aggregation (SecAgg+)" in stdout
    assert "secure aggregation stage 4 (unmask): 3/3 sites" in stdout
    history = json.loads((out / "state" / "history.json").read_text())
    info = history["rounds"][-1]["secure_aggregation"]
    assert info["survivors"] == 3 and info["neighbours"] == 2 and info["threshold"] == 2
    assert history["rounds"][-1]["eval_accuracy"] > history["rounds"][0]["eval_accuracy"]
    assert not _processes_mentioning(str(out))
