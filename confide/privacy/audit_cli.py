"""``confide audit``: verify and export a signed, hash-chained audit log (offline).

A compliance officer verifies a site's or the coordinator's log with only the log (the
SQLite file or its JSON export) and the writers' public keys; nothing else is trusted.

    confide audit verify --log site-state/audit.db --trust site-a.pub.pem [--head HASH]
    confide audit export --log site-state/audit.db --out audit.json
    confide audit public-key --key site-state/audit.key --out site-a.pub.pem
    confide audit report --ledger ledger.db --log audit.db --trust site-a.pub.pem \
        --out report.html --json report.json

An auditor reads the coordinator's records over mutual TLS with an ``auditor`` kit
(read-only) and reports on them the same way:

    confide audit fetch --kit officer/ --out records.json
    confide audit report --records records.json --records-trust coordinator.pub.pem \
        --out report.html
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confide.errors import ConfideError, DataNotFoundError

EXIT_OK, EXIT_BROKEN = 0, 1


def add_audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser(
        "audit",
        help="verify or export a signed, hash-chained audit log",
        description="Verify or export an audit log (confide.privacy.audit), offline.",
    )
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    verify = audit_sub.add_parser(
        "verify",
        help="check every entry: order, chain, hashes, signatures (exit 1 when broken)",
    )
    verify.add_argument("--log", type=Path, required=True, help="audit.db, or its JSON export")
    verify.add_argument(
        "--trust",
        type=Path,
        action="append",
        required=True,
        metavar="PUBLIC_KEY.pem",
        help="a writer's public key (repeat for each writer)",
    )
    verify.add_argument(
        "--head", help="a head hash published earlier: detects entries cut from the end"
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=_cmd_verify)
    export = audit_sub.add_parser("export", help="write the log as JSON (verifiable on its own)")
    export.add_argument("--log", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(func=_cmd_export)
    fetch = audit_sub.add_parser(
        "fetch",
        help="read the coordinator's privacy records with an auditor kit (read-only)",
        description="Fetch the coordinator's ledger mirror, the sites' budgets and its signed "
        "audit log over mutual TLS with an auditor (or admin) kit. Nothing is changed at the "
        "coordinator except one audit entry recording the read.",
    )
    fetch.add_argument("--kit", type=Path, required=True, help="the auditor's startup kit")
    fetch.add_argument("--coordinator", help="HOST:PORT (default: the address in the kit)")
    fetch.add_argument("--out", type=Path, required=True, help="where to write records.json")
    fetch.set_defaults(func=_cmd_fetch)
    pub = audit_sub.add_parser("public-key", help="write the public key of an audit key file")
    pub.add_argument("--key", type=Path, required=True, help="the writer's audit.key")
    pub.add_argument("--out", type=Path, required=True)
    pub.set_defaults(func=_cmd_public_key)
    _add_report_parser(audit_sub)

    def _help(_: argparse.Namespace) -> int:
        audit.print_help()
        return 2

    audit.set_defaults(func=_help)


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataNotFoundError(f"{what}: {path} not found. Fix: pass an existing file")
    return path


def _cmd_verify(args: argparse.Namespace) -> int:
    from confide.privacy.audit import (
        AuditLog,
        read_export,
        read_public_key,
        trust_store,
        verify_entries,
    )

    log = _existing(args.log, "--log")
    keys = trust_store(*(read_public_key(_existing(p, "--trust")) for p in args.trust))
    if log.suffix == ".json":
        report = verify_entries(read_export(log), keys, expected_head=args.head)
    else:
        with AuditLog(log) as audit:
            report = audit.verify(keys, expected_head=args.head)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "entries_checked": report.entries_checked,
                    "head": report.head,
                    "signers": report.signers,
                    "problems": [str(p) for p in report.problems],
                },
                indent=2,
            )
        )
    else:
        print(report.summary())
    return EXIT_OK if report.ok else EXIT_BROKEN


def _cmd_export(args: argparse.Namespace) -> int:
    from confide.privacy.audit import AuditLog

    with AuditLog(_existing(args.log, "--log")) as audit:
        entries = audit.export()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", "utf-8")
    print(f"exported {len(entries)} entries -> {args.out}")
    return EXIT_OK


def _cmd_public_key(args: argparse.Namespace) -> int:
    from confide.privacy.audit import AuditKey

    key = AuditKey.load(_existing(args.key, "--key"))
    key.write_public_key(args.out)
    print(f"public key {key.key_id} -> {args.out}")
    return EXIT_OK


# --------------------------------------------------------------------------- report

_REPORT_EPILOG = """\
Pairing logs with keys: each --trust (and --head) applies to the --log written before it,
so give every log its own keys:

  confide audit report --ledger site-a/ledger.db --ledger coordinator/mirror.db \\
      --log site-a/audit.db --trust site-a.pub.pem \\
      --log coordinator/audit.db --trust coordinator.pub.pem --head 3f2a... \\
      --out report.html --json report.json

Exit status: 0 when the verdict is PASS (every site within its budget, every ledger row and
every audit chain verifies), 1 when any check fails (the report is still written), 2 on a
usage error (missing file, unknown site, --trust before any --log).
"""


class _LogAction(argparse.Action):
    """``--log PATH`` opens a new audit source; the ``--trust``/``--head`` after it fill it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        logs = list(getattr(namespace, "logs", None) or [])
        logs.append({"path": Path(values), "trust": [], "head": None})
        namespace.logs = logs


class _LogOptionAction(argparse.Action):
    """``--trust KEY`` / ``--head HASH``: belongs to the ``--log`` given just before it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        logs = getattr(namespace, "logs", None)
        if not logs:
            parser.error(f"{option_string} must follow the --log it applies to")
        if self.dest == "trust":
            logs[-1]["trust"].append(Path(values))
        elif logs[-1]["head"] is not None:
            parser.error(f"--log {logs[-1]['path']}: --head given twice")
        else:
            logs[-1]["head"] = str(values)


def _add_report_parser(audit_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = audit_sub.add_parser(
        "report",
        help="the compliance report: ε per site vs budget, ledger and audit-chain checks",
        description="Write one self-contained HTML page (and optionally JSON) for a "
        "compliance officer: ε spent per site recomputed from the privacy ledgers' DP "
        "events (PRV; RDP and, when installed, Google dp-accounting PLD beside it), budgets "
        "and what remains, every ledger row re-verified, every audit log's hash chain and "
        "signatures verified, and one verdict. Read-only: the files given are copied before "
        "they are opened.",
        epilog=_REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "--records",
        type=Path,
        metavar="RECORDS.json",
        help="a coordinator's audit records fetched by an auditor (`confide audit fetch`): "
        "its ledger mirror, the budgets and its audit log",
    )
    report.add_argument(
        "--records-trust",
        type=Path,
        action="append",
        metavar="COORDINATOR.pub.pem",
        help="the coordinator's audit public key, obtained from the federation admin, to "
        "verify the records' audit log against (default: the key inside the records)",
    )
    report.add_argument(
        "--ledger",
        type=Path,
        action="append",
        default=[],
        metavar="LEDGER.db",
        help="a privacy ledger (a site's state_dir/ledger.db or the coordinator's mirror); "
        "repeat for more. The same event in two ledgers is counted once",
    )
    report.add_argument(
        "--log",
        action=_LogAction,
        dest="logs",
        metavar="AUDIT",
        help="an audit log to verify (audit.db or its JSON export); repeat for more. The "
        "--trust and --head options that follow it apply to it",
    )
    report.add_argument(
        "--trust",
        action=_LogOptionAction,
        dest="trust",
        metavar="PUBLIC_KEY.pem",
        help="a public key of a writer of the preceding --log (repeat for each writer)",
    )
    report.add_argument(
        "--head",
        action=_LogOptionAction,
        dest="head",
        metavar="HASH",
        help="a head hash of the preceding --log published earlier: detects a cut-off tail",
    )
    report.add_argument("--out", type=Path, required=True, help="the HTML report to write")
    report.add_argument("--json", type=Path, help="also write the report as JSON here")
    report.add_argument(
        "--site",
        action="append",
        metavar="SITE",
        help="report only this site (repeat for more); default: every site in the ledgers",
    )
    report.add_argument(
        "--pld",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compute Google dp-accounting's PLD ε beside PRV (default: when installed)",
    )
    report.set_defaults(func=_cmd_report, logs=None)


def _report_logs(
    logs: Sequence[dict[str, Any]] | None,
) -> list[tuple[Path, list[Path], str | None]]:
    out = []
    for log in logs or []:
        if not log["trust"]:
            raise ConfideError(
                f"--log {log['path']}: no --trust key follows it, so its signatures cannot be "
                "checked. Fix: add --trust WRITER.pub.pem after it (one per writer; a site "
                "exports it with `confide audit public-key`)"
            )
        out.append((log["path"], log["trust"], log["head"]))
    return out


def _cmd_fetch(args: argparse.Namespace) -> int:
    from confide.privacy.audit_fetch import fetch_records, save_records
    from confide.privacy.crypto import load_kit

    doc = fetch_records(load_kit(args.kit), args.coordinator)
    save_records(doc, args.out)
    events = doc.get("events")
    print(
        f"fetched the audit records of federation {doc.get('federation')}: "
        f"{'unreadable ledger' if events is None else f'{len(events)} DP events'}, "
        f"{len(doc.get('budgets') or {})} site budgets, {len(doc.get('audit_log') or [])} "
        f"audit entries -> {args.out}"
    )
    print(f"next: confide audit report --records {args.out} --out report.html")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from confide.privacy.report import (
        add_records,
        build_report,
        inputs_from_files,
        site_line,
        write_report,
    )

    if not args.ledger and args.records is None:
        raise ConfideError(
            "give at least one --ledger (a site's or the coordinator's ledger.db) or "
            "--records (from `confide audit fetch`). Fix: add one"
        )
    logs = _report_logs(args.logs)
    inputs = inputs_from_files(args.ledger, logs)
    if args.records is not None:
        if not args.records.is_file():
            raise DataNotFoundError(f"--records: {args.records} not found. Fix: fetch it first")
        try:
            records = json.loads(args.records.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfideError(f"--records: {args.records} is not JSON ({e})") from None
        add_records(inputs, records, str(args.records), args.records_trust or ())
    report = build_report(inputs, include_pld=args.pld, sites=args.site)
    written = write_report(report, args.out, args.json)
    for site in report["sites"]:
        print(site_line(site))
    for a in report["audit"]:
        if a["ok"]:
            print(f"OK   audit log {a['name']}: {a['entries']} entries; head {a['head']}")
        else:
            first = a["problems"][0]
            print(
                f"FAIL audit log {a['name']}: {len(a['problems'])} problem(s), first at seq "
                f"{first['seq']} ({first['check']}): {first['message']}"
            )
    for c in report["ledger"]["sources"]:
        if not c["ok"]:
            print(f"FAIL ledger {c['name']}: {c['message']}")
    for path in written:
        print(f"wrote {path}")
    print(report["verdict"]["summary"])
    return EXIT_OK if report["verdict"]["ok"] else EXIT_BROKEN
