"""The `confide` command: one-line errors naming the field and the fix, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from confide.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--task", "mnist-rnn"], "--task: unknown task 'mnist-rnn'"),
        (["--task", "mnist-cnn", "--rounds", "-1"], "--rounds: Input should be greater than"),
        (["--task", "mnist-cnn", "--sites", "many"], "--sites: Input should be a valid integer"),
        (["--task", "mnist-cnn", "--data-dir", "/nonexistent/data"], "--data-dir: no such folder"),
        (["--task", "mnist-cnn", "--partition", "dirichlet:-1"], "--partition:"),
        (["--task", "shakespeare-lstm", "--partition", "dirichlet:0.5"], "does not apply"),
        (["--task", "mnist-cnn", "--model", "char-lstm"], "--model: 'char-lstm' is not a model"),
        (["--task", "mnist-cnn", "--strategy", "fedsgd"], "--strategy:"),
        (["--task", "mnist-cnn", "--sites", "2", "--min-sites", "3"], "--min-sites: exceeds"),
        (["--task", "mnist-cnn", "--secure-aggregation", "secagg"], "--secure-aggregation:"),
        (
            ["--task", "mnist-cnn", "--sites", "2", "--secure-aggregation", "secagg+"],
            "min_sites: secure aggregation needs at least 3 sites per round",
        ),
    ],
)
def test_bad_values_give_one_line_with_field_and_fix(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = _run(capsys, "sim", "run", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("confide: error: ")
    assert expected in lines[0]
    assert "Fix: " in lines[0]
    assert "Traceback" not in err and out == ""


def test_missing_task_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "sim", "run", "--rounds", "2")
    assert code == 2 and "--task: missing" in err


def test_config_file_errors_name_the_toml_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('task = "mnist-cnn"\nrounds = 0\n')
    code, _, err = _run(capsys, "sim", "run", "--config", str(cfg))
    assert code == 2
    assert "confide: error: rounds: Input should be greater than or equal to 1" in err
    cfg.write_text('task = "mnist-cnn"\nroundz = 3\n')
    code, _, err = _run(capsys, "sim", "run", "--config", str(cfg))
    assert code == 2 and "roundz: unknown setting" in err
    cfg.write_text("task = \n")
    code, _, err = _run(capsys, "sim", "run", "--config", str(cfg))
    assert code == 2 and "is not valid TOML" in err
    code, _, err = _run(capsys, "sim", "run", "--config", str(tmp_path / "absent.toml"))
    assert code == 2 and "no such file" in err


def test_missing_data_file_names_the_path_and_the_fix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = _run(
        capsys,
        "sim",
        "run",
        "--task",
        "mnist-cnn",
        "--rounds",
        "1",
        "--data-dir",
        str(tmp_path),
        "--quiet",
    )
    assert code == 2
    assert "mnist" in err and "--data-dir" in err
    assert len(err.strip().splitlines()) == 1


def test_tasks_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "sim", "tasks")
    assert code == 0
    for name in (
        "mnist-cnn",
        "shakespeare-lstm",
        "shakespeare-transformer",
        "credit-lstm",
        "credit-transformer",
    ):
        assert name in out


@pytest.mark.slow
def test_console_script_runs_a_small_federation(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'task = "credit-lstm"\nsites = 3\nrounds = 2\nmax_samples_per_site = 300\nseed = 3\n'
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "confide.cli",
            "sim",
            "run",
            "--config",
            str(cfg),
            "--rounds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"history: {out / 'history.json'}" in proc.stdout
    history = json.loads((out / "history.json").read_text())
    # The flag overrides the file: one round after round 0.
    assert [r["round"] for r in history["rounds"]] == [0, 1]
    assert history["meta"]["config"]["seed"] == 3
    assert (out / "metrics.png").stat().st_size > 10_000
    assert "round   1/1" in proc.stderr


def test_console_script_runs_a_secure_aggregation_federation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--task", "credit-lstm", "--sites", "3", "--min-sites", "3", "--rounds", "1"]
    args += ["--max-samples-per-site", "200", "--secure-aggregation", "secagg+"]
    proc = subprocess.run(
        [sys.executable, "-m", "confide.cli", "sim", "run", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "secagg ±" in proc.stderr
    history = json.loads((out / "history.json").read_text())
    assert history["rounds"][-1]["secure_aggregation"]["survivors"] == 3


def test_coordinator_config_errors_name_the_field_and_the_fix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "federation.toml"
    cfg.write_text('[federation]\nname = "fed"\nrounds = 0\n')
    code, _, err = _run(capsys, "coordinator", "start", "--config", str(cfg))
    assert code == 2
    assert "confide: error: federation.rounds: Input should be greater than or equal to 1" in err
    assert "Fix: use a whole number of rounds >= 1" in err
    cfg.write_text('[federation]\nname = "fed"\n[selection]\nmin_site = 2\n')
    code, _, err = _run(capsys, "coordinator", "start", "--config", str(cfg))
    assert code == 2 and "selection.min_site: unknown setting" in err and "min_sites" in err
    cfg.write_text('[federation]\nname = "fed"\n[server]\ncoordinator_dir = "nowhere"\n')
    code, _, err = _run(capsys, "coordinator", "start", "--config", str(cfg))
    assert code == 2 and "no such coordinator folder" in err and "confide pki init" in err
    assert len(err.strip().splitlines()) == 1


def test_deid_commands_run_from_the_confide_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps({"id": 1, "text": "Call Dr. Smith at 555-123-4567."}) + "\n")
    code, _, err = _run(capsys, "deid", "text", "--in", str(notes), "--out", str(tmp_path / "o"))
    assert code == 0, err
    line = json.loads((tmp_path / "o").read_text())
    assert "555-123-4567" not in line["text"] and "Smith" not in line["text"]
    assert {s["type"] for s in line["spans"]} >= {"NAME", "PHONE"}
    cfg = tmp_path / "deid.toml"
    cfg.write_text('secret_file = "missing.key"\n[columns]\na = "keep"\n')
    table = tmp_path / "t.csv"
    table.write_text("a\n1\n")
    code, _, err = _run(
        capsys,
        "deid",
        "table",
        "--config",
        str(cfg),
        "--in",
        str(table),
        "--out",
        str(tmp_path / "c"),
    )
    assert code == 2 and "secret_file" in err and "Fix:" in err
    assert not (tmp_path / "c").exists()
