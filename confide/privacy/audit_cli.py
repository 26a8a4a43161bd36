"""``confide audit``: verify and export a signed, hash-chained audit log (offline).

A compliance officer verifies a site's or the coordinator's log with only the log (the
SQLite file or its JSON export) and the writers' public keys; nothing else is trusted.

    confide audit verify --log site-state/audit.db --trust site-a.pub.pem [--head HASH]
    confide audit export --log site-state/audit.db --out audit.json
    confide audit public-key --key site-state/audit.key --out site-a.pub.pem
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    pub = audit_sub.add_parser("public-key", help="write the public key of an audit key file")
    pub.add_argument("--key", type=Path, required=True, help="the writer's audit.key")
    pub.add_argument("--out", type=Path, required=True)
    pub.set_defaults(func=_cmd_public_key)

    def _help(_: argparse.Namespace) -> int:
        audit.print_help()
        return 2

    audit.set_defaults(func=_help)


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataNotFoundError(f"{what}: {path} not found. Fix: pass an existing file")
    return path


def _cmd_verify(args: argparse.Namespace) -> int:
    from confide.privacy.audit import AuditLog, read_public_key, trust_store, verify_entries

    log = _existing(args.log, "--log")
    keys = trust_store(*(read_public_key(_existing(p, "--trust")) for p in args.trust))
    if log.suffix == ".json":
        try:
            entries = json.loads(log.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfideError(
                f"--log: {log} is not a JSON export ({e}). Fix: pass audit.db "
                "or a file written by `confide audit export`"
            ) from None
        report = verify_entries(entries, keys, expected_head=args.head)
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
