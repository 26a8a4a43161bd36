"""A site de-identifies its raw export before training; the app reads only the clean file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from confide.client.agent import SiteAgent, load_site_config
from confide.client.data.paths import default_data_dir
from confide.client.data.tabular import generalized_value, load_credit
from confide.privacy.audit import AuditKey, AuditLog, trust_store
from confide.privacy.crypto import init_ca, issue, load_kit
from confide.privacy.deid import KAnonymityNotReached
from confide.privacy.dp import PrivacyLedger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw_credit(tmp_path: Path) -> Path:
    src = default_data_dir() / "credit-default" / "UCI_Credit_Card.csv.gz"
    if not src.is_file():
        pytest.skip(f"{src} not present (set CONFIDE_DATA_DIR to the shared data folder)")
    with gzip.open(src, "rt") as fh:
        lines = [next(fh) for _ in range(4001)]  # header + 4,000 rows: this site's export
    out = tmp_path / "export" / "credit.csv"
    out.parent.mkdir()
    out.write_text("".join(lines))
    return out


def _site(tmp_path: Path, raw: Path, deid_toml: Path) -> SiteAgent:
    init_ca(tmp_path / "pki", "fed")
    issue(tmp_path / "pki", "bank-a", "site", tmp_path / "kit")
    site = tmp_path / "site.toml"
    site.write_text(
        'app = "confide.client.apps:credit_lstm"\n'
        "[run_config]\nseed = 0\n"
        f'[deid]\nconfig = "{deid_toml}"\ninput = "{raw}"\noutput = "private/clean.csv"\n'
    )
    return SiteAgent(load_kit(tmp_path / "kit"), load_site_config(site))


def test_the_site_trains_only_on_its_deidentified_table(tmp_path: Path, raw_credit: Path) -> None:
    agent = _site(tmp_path, raw_credit, ROOT / "examples" / "deid" / "credit.toml")
    summary = agent.prepare_data()
    clean = tmp_path / "private" / "clean.csv"  # relative paths are read from site.toml's folder
    assert clean.is_file() and agent._run_config["data-dir"] == str(clean)
    assert summary["k"] >= 5 and summary["rows_out"] <= 4000
    assert summary["rows_in"] - summary["rows_out"] <= 0.05 * 4000
    report = json.loads((tmp_path / "private" / "clean.csv.report.json").read_text())
    assert report["k_achieved"] == summary["k"] and "rows" not in report
    # The built-in credit loader reads the generalized table: bands and "*" become numbers.
    train, test = load_credit(clean)
    assert len(train) + len(test) == summary["rows_out"]
    assert np.isfinite(train.x).all() and np.isfinite(test.x).all()
    # The report (never the data) is in the site's signed, hash-chained audit log.
    key = AuditKey.load(tmp_path / "site-state" / "audit.key")
    with AuditLog(tmp_path / "site-state" / "audit.db") as audit:
        entries = audit.entries()
        assert [e.kind for e in entries] == ["deid_report"]
        assert entries[0].actor == "site:bank-a" and entries[0].payload["k_achieved"] >= 5
        assert audit.verify(trust_store(key.public_key)).ok
    # ... and in the site's privacy ledger, beside its DP events.
    with PrivacyLedger(tmp_path / "site-state" / "ledger.db", site="bank-a") as ledger:
        (rec,) = ledger.reports(kind="deid_report")
        assert rec["payload"]["k_achieved"] == summary["k"] and rec["site"] == "bank-a"


def test_a_gate_that_cannot_be_met_stops_the_site_before_it_connects(
    tmp_path: Path, raw_credit: Path
) -> None:
    strict = tmp_path / "strict.toml"
    text = (ROOT / "examples" / "deid" / "credit.toml").read_text()
    strict.write_text(
        text.replace("k = 5", "k = 100000").replace(
            "max_suppression = 0.05", "max_suppression = 0.0"
        )
    )
    agent = _site(tmp_path, raw_credit, strict)
    with pytest.raises(KAnonymityNotReached):
        agent.run(max_attempts=1)  # no coordinator exists: it must fail before connecting
    assert not (tmp_path / "private" / "clean.csv").exists()
    assert "data-dir" not in agent._run_config
    with AuditLog(tmp_path / "site-state" / "audit.db") as audit:
        (entry,) = audit.entries()
        assert entry.kind == "deid_refused" and entry.payload["error"] == "KAnonymityNotReached"


def test_generalized_cells_read_as_numbers() -> None:
    assert generalized_value("20-29") == 24.5
    assert generalized_value("90+") == 90
    assert generalized_value("<=1935") == 1935
    assert np.isnan(generalized_value("*") or 0.0)
    assert generalized_value("abc") is None
