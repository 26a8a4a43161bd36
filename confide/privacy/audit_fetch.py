"""An auditor reads the coordinator's privacy records over mutual TLS (read-only).

``confide audit fetch --kit AUDITOR_KIT --out records.json`` calls ``GetAuditRecords``
with an ``auditor`` (or ``admin``) certificate. The coordinator refuses every other role,
and an auditor's certificate is refused by every call that takes part in a federation
(join, tasks, uploads): an auditor can read everything and start nothing.

The document holds the coordinator's mirror of every site's DP events, the sites'
budgets, and the coordinator's signed audit log with its public key. Nothing in it is
taken on trust: ``confide audit report --records records.json`` verifies the chain and
recomputes every ε from the events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc

from confide.errors import ConfideError
from confide.privacy.crypto import Kit
from confide.protos.v1 import coordinator_pb2 as pb
from confide.rpc import CoordinatorClient

RECORDS_FORMAT = "confide-audit-records-1"
FETCH_TIMEOUT = 120.0


class AuditFetchError(ConfideError):
    """The coordinator's audit records could not be read."""


def fetch_records(
    kit: Kit, address: str | None = None, *, timeout: float = FETCH_TIMEOUT
) -> dict[str, Any]:
    """The coordinator's audit records as a dict (see the module docstring)."""
    if kit.role not in ("auditor", "admin"):
        raise AuditFetchError(
            f"{kit.path} is the kit of a {kit.role}; the audit records are for auditor and "
            "admin certificates. Fix: use a kit made with `confide pki issue --role auditor`"
        )
    target = address or kit.coordinator_address
    channel = grpc.secure_channel(
        target, kit.channel_credentials(), options=[("grpc.enable_http_proxy", 0)]
    )
    try:
        stream = CoordinatorClient(channel).GetAuditRecords(
            pb.AuditRecordsRequest(), timeout=timeout
        )
        data = b"".join(chunk.data for chunk in stream)
    except grpc.RpcError as e:
        raise AuditFetchError(
            f"the coordinator at {target} did not return its audit records "
            f"({e.code().name}: {e.details()}). Fix: check the address and that the kit's "
            "certificate is an unrevoked auditor certificate of this federation"
        ) from None
    finally:
        channel.close()
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise AuditFetchError(f"the audit records from {target} are not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != RECORDS_FORMAT:
        raise AuditFetchError(
            f"the coordinator at {target} sent records of format "
            f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r}, "
            f"expected {RECORDS_FORMAT}. Fix: use the confide version the coordinator runs"
        )
    return doc


def save_records(doc: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, sort_keys=True, indent=1))
    return out
