"""Free-text de-identification: detectors, replacement, the JSONL contract, the benchmark."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from confide.errors import ConfideError
from confide.privacy.deid.notes import generate_notes
from confide.privacy.deid.text import DeidError, Scrubber, scrub
from confide.privacy.deid.text_cli import add_arguments, run

CASES = [
    ("Patient: Jane Doe was seen today.", "Jane Doe", "NAME"),
    ("Seen by Dr. Thistlewood in clinic.", "Thistlewood", "NAME"),
    ("Marcell728 VonRueden376 attended.", "Marcell728 VonRueden376", "NAME"),
    ("DOB 03/04/1931, reviewed.", "03/04/1931", "DATE"),
    ("Admitted on March 4, 2021 with pain.", "March 4, 2021", "DATE"),
    ("Scan on 2021-03-04 was normal.", "2021-03-04", "DATE"),
    ("She is a 92-year-old woman.", "92", "AGE"),
    ("Call 555-123-4567 if worse.", "555-123-4567", "PHONE"),
    ("Fax: (555) 987-6543 please.", "(555) 987-6543", "FAX"),
    ("Email jane.doe@example.com today.", "jane.doe@example.com", "EMAIL"),
    ("SSN 123-45-6789 on file.", "123-45-6789", "SSN"),
    ("MRN: 1234567 confirmed.", "1234567", "MRN"),
    ("Account #: 99887766 billed.", "99887766", "ACCOUNT"),
    ("Driver's license S99918685 seen.", "S99918685", "LICENSE"),
    ("Lives in Boston, MA 02118 alone.", "02118", "ZIP"),
    ("Lives at 315 Heathcote Well Unit 65, Lancaster.", "315 Heathcote Well Unit 65", "ADDRESS"),
    ("Portal https://portal.example.org/p/1 works.", "https://portal.example.org/p/1", "URL"),
    ("Login from 192.168.10.4 noted.", "192.168.10.4", "IP"),
    ("Lancaster LA4 5XY is home.", "LA4 5XY", "ZIP"),
]


@pytest.mark.parametrize(("text", "value", "typ"), CASES)
def test_each_type_is_found_with_an_exact_span(text: str, value: str, typ: str) -> None:
    res = scrub(text)
    start = text.index(value)
    assert any(
        s.start == start and s.end == start + len(value) and s.type == typ for s in res.spans
    ), [(text[s.start : s.end], s.type) for s in res.spans]
    assert f"[{typ}]" in res.text and value not in res.text


@pytest.mark.parametrize(
    "text",
    [
        "Metformin 5 mg daily; Hb 13.2 g/dL; BP 132/84.",
        "Use 3/4 strength feeds; next dose at 10:30.",
        "May continue current dose. Will review. Bill was sent to the insurer.",
        "A 67-year-old man, aged 45, age: 89.",
    ],
)
def test_hard_negatives_are_left_alone(text: str) -> None:
    assert scrub(text).spans == []


def test_pseudonyms_are_stable_per_secret_and_differ_across_secrets() -> None:
    text = "Seen by Dr. Smith. Dr. Smith called 555-123-4567."
    a = Scrubber(mode="pseudonym", secret=b"k" * 32).scrub(text).text
    b = Scrubber(mode="pseudonym", secret=b"k" * 32).scrub(text).text
    c = Scrubber(mode="pseudonym", secret=b"j" * 32).scrub(text).text
    assert a == b and a != c and "Smith" not in a
    names = [w.strip(".") for w in a.split() if w.startswith("NAME-")]
    assert len(names) == 2 and names[0] == names[1]
    with pytest.raises(DeidError, match="secret"):
        Scrubber(mode="pseudonym")


def test_presidio_missing_gives_the_install_hint() -> None:
    with pytest.raises(ConfideError, match="pip install presidio-analyzer"):
        Scrubber(backend="presidio")


def _run(*argv: str) -> int:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args([*argv, "--quiet"]))


def test_jsonl_contract_end_to_end(tmp_path: Path) -> None:
    notes = generate_notes(20, seed=3)
    inp, out = tmp_path / "notes.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": n.id, "text": n.text}) + "\n" for n in notes))
    assert _run("--in", str(inp), "--out", str(out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [n.id for n in notes]
    for note, row in zip(notes, rows, strict=True):
        got = {(s["start"], s["end"], s["type"]) for s in row["spans"]}
        for g in note.spans:  # spans index the *input* text
            assert (g.start, g.end, g.type) in got, note.text[g.start : g.end]
        for s in row["spans"]:
            assert note.text[s["start"] : s["end"]] not in ("", " ")
        assert "[NAME]" in row["text"]
    key = tmp_path / "key"
    key.write_bytes(b"0123456789abcdef0123")
    out2 = tmp_path / "p.jsonl"
    assert (
        _run("--in", str(inp), "--out", str(out2), "--mode", "pseudonym", "--secret-file", str(key))
        == 0
    )
    assert "NAME-" in out2.read_text()


def test_malformed_line_names_the_line_and_writes_nothing(tmp_path: Path) -> None:
    inp, out = tmp_path / "notes.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": 1, "text": "ok"}\n{"id": 2, "text": \n')
    with pytest.raises(ConfideError, match=r"notes.jsonl:2: not valid JSON"):
        _run("--in", str(inp), "--out", str(out))
    inp.write_text('{"id": 1, "text": "ok"}\n{"id": 2}\n')
    with pytest.raises(ConfideError, match=r':2: field "text" is missing'):
        _run("--in", str(inp), "--out", str(out))
    assert not out.exists() and list(tmp_path.iterdir()) == [inp]


def test_recall_and_precision_targets_on_generated_notes() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from deid import RECALL_95, RECALL_99, score  # type: ignore[import-not-found]

    notes = generate_notes(200, seed=11)
    sc = Scrubber()
    s = score(notes, [sc.detect(n.text) for n in notes])
    for t in RECALL_99:
        assert s["per_type"][t]["recall"] >= 0.99, t
    for t in RECALL_95:
        assert s["per_type"][t]["recall"] >= 0.95, t
    assert s["precision"] >= 0.90


@pytest.mark.slow
def test_deid_benchmark_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "deid.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "deid.py"
    proc = subprocess.run(
        [sys.executable, str(bench), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["text"]["per_type"]["NAME"]["support"] > 0
    table = data["table"]
    if table is not None:  # the shared data folder is present: the credit table was timed
        row = table[0]
        assert row["rows"] == 3000 and row["k"] >= 5 and row["l"] >= 2
        assert 0 < row["deidentify_s"] < 60 and row["suppressed_fraction"] <= 0.05


def test_parallel_workers_write_the_same_output_in_order(tmp_path: Path) -> None:
    import argparse

    from confide.privacy.deid import text_cli
    from confide.privacy.deid.notes import generate_notes

    notes = generate_notes(120, seed=3)
    inp = tmp_path / "notes.jsonl"
    inp.write_text("".join(json.dumps({"id": n.id, "text": n.text}) + "\n" for n in notes))
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out-{workers}.jsonl"
        args = argparse.Namespace(
            inp=inp,
            out=out,
            mode="placeholder",
            secret_file=None,
            backend="builtin",
            workers=workers,
            quiet=True,
        )
        assert text_cli.run(args) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    lines = [json.loads(x) for x in outs[1].splitlines()]
    assert [x["id"] for x in lines] == [n.id for n in notes]
