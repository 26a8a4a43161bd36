"""An `auditor` certificate reads every privacy record and can start nothing (real mTLS)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from federation_helpers import make_federation

from confide.privacy.audit import trust_store, verify_entries
from confide.privacy.audit_fetch import AuditFetchError, fetch_records
from confide.privacy.crypto import load_kit
from confide.privacy.dp import DpEvent, PrivacyLedger
from confide.protos.v1 import PROTOCOL_VERSION
from confide.protos.v1 import coordinator_pb2 as pb
from confide.rpc import CoordinatorClient
from confide.server.coordinator import Coordinator


@pytest.fixture
def serving(tmp_path: Path):  # type: ignore[no-untyped-def]
    fed = make_federation(
        tmp_path, sites=("site-1",), others=(("officer", "auditor"), ("root", "admin"))
    )
    fed.doc["dp"] = {"delta": 1e-5, "example": {"noise_multiplier": 1.1, "sample_rate": 0.01}}
    coordinator = Coordinator(fed.config())
    # A mirrored event and budget, as a site's join would have left them.
    ev = DpEvent("dp-sgd", 1.1, 0.01, 100, 1.0, 1e-5, 600, "testfed", 1, 1.7e9, site="site-1")
    coordinator.privacy.ledger.set_budget("site-1", 8.0, 1e-5)
    coordinator.privacy.ledger.mirror([ev])
    coordinator.start()
    try:
        yield fed, coordinator, ev
    finally:
        coordinator.shutdown()


def _stub(fed, name: str) -> tuple[grpc.Channel, CoordinatorClient]:  # type: ignore[no-untyped-def]
    kit = load_kit(fed.kit(name))
    channel = grpc.secure_channel(fed.address, kit.channel_credentials())
    return channel, CoordinatorClient(channel)


def test_an_auditor_reads_the_ledger_budgets_and_a_verifiable_audit_log(serving) -> None:  # type: ignore[no-untyped-def]
    fed, _coordinator, ev = serving
    doc = fetch_records(load_kit(fed.kit("officer")), fed.address)
    assert doc["federation"] == "testfed"
    assert doc["budgets"] == {"site-1": {"epsilon_max": 8.0, "delta": 1e-5}}
    (row,) = doc["events"]
    assert row["uid"] == ev.uid and DpEvent.from_dict(row) == ev
    # The audit log verifies offline with the key it came with, and records the read.
    report = verify_entries(doc["audit_log"], trust_store(doc["audit_public_key_pem"]))
    assert report.ok, report.summary()
    kinds = [e["kind"] for e in doc["audit_log"]]
    assert kinds[0] == "dp_plan" and kinds[-1] == "audit_read"
    assert doc["audit_log"][-1]["payload"] == {"reader": "auditor:officer"}
    # An admin may read too.
    assert fetch_records(load_kit(fed.kit("root")), fed.address)["federation"] == "testfed"
    # Reading changed nothing but the audit log: the ledger is as it was.
    with PrivacyLedger(fed.root / "state" / "ledger.db") as mirror:
        assert [r["uid"] for r in mirror.export()] == [ev.uid]


def test_an_auditor_can_start_nothing(serving) -> None:  # type: ignore[no-untyped-def]
    fed, coordinator, _ = serving
    channel, stub = _stub(fed, "officer")
    calls = [
        lambda: stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=10),
        lambda: stub.PullTask(pb.PullTaskRequest(session_id="x", wait_seconds=1), timeout=10),
        lambda: stub.Heartbeat(pb.HeartbeatRequest(session_id="x"), timeout=10),
        lambda: stub.ReportError(pb.SiteError(session_id="x", code="X"), timeout=10),
        lambda: list(stub.DownloadModel(pb.DownloadModelRequest(model_id="m"), timeout=10)),
        lambda: stub.UploadResult(iter([pb.Chunk().SerializeToString()]), timeout=10),
    ]
    try:
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    finally:
        channel.close()
    assert coordinator.board.connected() == []  # no session was ever opened


def test_a_site_cannot_read_the_audit_records(serving) -> None:  # type: ignore[no-untyped-def]
    fed, _, _ = serving
    channel, stub = _stub(fed, "site-1")
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GetAuditRecords(pb.AuditRecordsRequest(), timeout=10))
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()
    with pytest.raises(AuditFetchError, match="auditor"):
        fetch_records(load_kit(fed.kit("site-1")), fed.address)


def test_fetch_then_report_recomputes_epsilon_and_verifies_the_log(serving, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from confide.cli import main
    from confide.privacy.audit import AuditKey
    from confide.privacy.dp import epsilon

    fed, _, ev = serving
    records = tmp_path / "records.json"
    assert main(["audit", "fetch", "--kit", str(fed.kit("officer")), "--out", str(records)]) == 0
    pub = tmp_path / "coordinator.pub.pem"
    AuditKey.load(fed.root / "state" / "audit.key").write_public_key(pub)
    out = tmp_path / "report.html"
    code = main(
        [
            "audit", "report", "--records", str(records), "--records-trust", str(pub),
            "--out", str(out), "--json", str(tmp_path / "report.json"), "--no-pld",
        ]
    )  # fmt: skip
    assert code == 0 and out.is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    (site,) = report["sites"]
    assert site["site"] == "site-1"
    assert site["epsilon"] == pytest.approx(epsilon([ev], 1e-5))
    assert site["budget"]["epsilon_max"] == 8.0 and site["ok"]
    # A key that did not write the log: the verdict fails.
    other = tmp_path / "other.pem"
    AuditKey.generate(tmp_path / "other.key").write_public_key(other)
    code = main(
        [
            "audit", "report", "--records", str(records), "--records-trust", str(other),
            "--out", str(tmp_path / "bad.html"), "--no-pld",
        ]
    )  # fmt: skip
    assert code == 1
