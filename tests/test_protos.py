"""The committed gRPC stubs match the .proto files (CI fails when someone forgets `make protos`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "protos" / "confide" / "v1").glob("*.proto"))


def test_committed_stubs_equal_freshly_generated_ones(tmp_path: Path) -> None:
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    assert PROTOS, "no .proto files in protos/confide/v1"
    args = [
        "grpc_tools.protoc",
        "--proto_path=confide/protos=" + str(ROOT / "protos" / "confide"),
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        *[str(p) for p in PROTOS],
    ]
    assert grpc_tools.main(args) == 0
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc produced nothing"
    stale = [
        str(rel) for rel in generated if (tmp_path / rel).read_bytes() != (ROOT / rel).read_bytes()
    ]
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit the result"


def test_stubs_import_and_describe_the_coordinator_service() -> None:
    from confide.protos.v1 import PROTOCOL_VERSION, coordinator_pb2, coordinator_pb2_grpc

    proto = (
        Path(__file__).resolve().parents[1] / "protos/confide/v1/coordinator.proto"
    ).read_text()
    declared = re.search(r"PROTOCOL_VERSION = (\d+)", proto)
    assert declared is not None and PROTOCOL_VERSION == int(declared.group(1)) == 4
    assert coordinator_pb2.Task.SECAGG == 5
    service = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    assert {m.name for m in service.methods} == {
        "Join",
        "PullTask",
        "DownloadModel",
        "UploadResult",
        "Heartbeat",
        "ReportError",
        "GetAuditRecords",
    }
    assert hasattr(coordinator_pb2_grpc, "CoordinatorServicer")
    chunk = coordinator_pb2.Chunk(data=b"\x00" * 8)
    assert coordinator_pb2.Chunk.FromString(chunk.SerializeToString()).data == b"\x00" * 8
