"""`confide pki init | issue | list | revoke`: the federation administrator's commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from confide.errors import ConfigError
from confide.privacy.crypto import pki

EXIT_USAGE = 2


def add_pki_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``pki`` and its subcommands to the ``confide`` parser; each sets ``func``."""
    p = subparsers.add_parser(
        "pki",
        help="federation certificate authority and startup kits",
        description="Make the federation's certificate authority, issue startup kits for "
        "sites, auditors and admins, list and revoke certificates.",
    )
    sub = p.add_subparsers(dest="pki_command", metavar="SUBCOMMAND")

    init = sub.add_parser(
        "init",
        help="create the federation CA and the coordinator certificate",
        description="Create a CA (ECDSA P-256) in DIR, and DIR/coordinator/ with the "
        "coordinator's certificate (SANs localhost, 127.0.0.1, ::1 and every --host).",
    )
    init.add_argument("--dir", type=Path, required=True, metavar="DIR", help="PKI folder")
    init.add_argument("--federation", required=True, metavar="NAME", help="federation name")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="H",
        help="a DNS name or IP the sites dial to reach the coordinator (repeatable)",
    )
    init.add_argument(
        "--address",
        default=pki.DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"coordinator address written into kits ({pki.DEFAULT_ADDRESS})",
    )
    init.add_argument("--valid-days", metavar="N", help="coordinator certificate lifetime (825)")
    init.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    init.set_defaults(func=_cmd_init)

    iss = sub.add_parser(
        "issue",
        help="issue a certificate and write its startup kit",
        description="Issue a certificate for an identity and write a startup kit folder: "
        "certificate, key (0600), CA certificate, kit.json and a README for the operator.",
    )
    iss.add_argument("--dir", type=Path, required=True, metavar="DIR", help="PKI folder")
    iss.add_argument("--identity", required=True, metavar="NAME", help="e.g. hospital-a")
    iss.add_argument("--role", required=True, metavar="ROLE", help="site | auditor | admin")
    iss.add_argument(
        "--out", type=Path, metavar="KITDIR", help="kit folder (default DIR/kits/NAME)"
    )
    iss.add_argument("--address", metavar="HOST:PORT", help="coordinator address (from init)")
    iss.add_argument("--valid-days", metavar="N", help="certificate lifetime (825)")
    iss.add_argument(
        "--force", action="store_true", help="re-issue, revoking the identity's valid one"
    )
    iss.set_defaults(func=_cmd_issue)

    lst = sub.add_parser("list", help="list issued certificates")
    lst.add_argument("--dir", type=Path, required=True, metavar="DIR", help="PKI folder")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=_cmd_list)

    rev = sub.add_parser(
        "revoke",
        help="revoke a certificate and publish the CRL",
        description="Revoke a certificate and write the signed CRL to DIR/crl.pem and "
        "DIR/coordinator/crl.pem; a running coordinator picks it up without restart.",
    )
    rev.add_argument("--dir", type=Path, required=True, metavar="DIR", help="PKI folder")
    which = rev.add_mutually_exclusive_group(required=True)
    which.add_argument("--identity", metavar="NAME", help="revoke this identity's certificate")
    which.add_argument("--serial", metavar="N", help="revoke by serial (hex, as listed)")
    rev.add_argument(
        "--reason",
        default="unspecified",
        help="unspecified | key_compromise | superseded | cessation_of_operation | ...",
    )
    rev.set_defaults(func=_cmd_revoke)

    co = sub.add_parser(
        "coordinator",
        help="re-issue the coordinator certificate (new names, or near expiry)",
        description="Give the coordinator a new certificate from the same CA, adding --host "
        "names to the ones it has; kits stay valid. Restart the coordinator afterwards.",
    )
    co.add_argument("--dir", type=Path, required=True, metavar="DIR", help="PKI folder")
    co.add_argument("--host", action="append", default=[], metavar="H", help="name to add")
    co.add_argument("--address", metavar="HOST:PORT", help="new default address for kits")
    co.add_argument("--valid-days", metavar="N", help="certificate lifetime (825)")
    co.set_defaults(func=_cmd_coordinator)

    p.set_defaults(func=lambda a: _help(p))
    return p


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


def _days(value: str | None) -> int:
    if value is None:
        return pki.DEFAULT_VALID_DAYS
    try:
        days = int(value)
    except ValueError:
        days = 0
    if days < 1:
        raise ConfigError("--valid-days", f"{value!r} is not a whole number >= 1", "e.g. 825")
    return days


def _cmd_init(args: argparse.Namespace) -> int:
    info = pki.init_ca(
        args.dir,
        args.federation,
        coordinator_hosts=args.host,
        coordinator_address=args.address,
        valid_days=_days(args.valid_days),
        force=args.force,
    )
    print(f"federation {info.federation}: CA created in {info.pki_dir}")
    print(f"CA certificate:     {info.ca_certificate} (SHA-256 {info.ca_fingerprint})")
    print(f"CA key:             {info.pki_dir / pki.CA_KEY} (keep it offline and backed up)")
    print(f"coordinator folder: {info.coordinator_dir} (certificate, key, ca.crt, crl.pem)")
    print(f"coordinator names:  {', '.join(info.coordinator_sans)}")
    print(f"coordinator address for kits: {info.coordinator_address}")
    print(f"next: confide pki issue --dir {info.pki_dir} --identity NAME --role site")
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    info = pki.reissue_coordinator(
        args.dir,
        coordinator_hosts=args.host,
        coordinator_address=args.address,
        valid_days=_days(args.valid_days),
    )
    print(f"coordinator certificate re-issued in {info.coordinator_dir}")
    print(f"coordinator names:  {', '.join(info.coordinator_sans)}")
    print(f"coordinator address for kits: {info.coordinator_address}")
    print("restart the coordinator (copy the folder to it first if it runs elsewhere)")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    kit_dir = pki.issue(
        args.dir,
        args.identity,
        args.role,
        args.out,
        coordinator_address=args.address,
        valid_days=_days(args.valid_days),
        force=args.force,
    )
    kit = pki.load_kit(kit_dir)
    print(f"issued {kit.role} certificate for {kit.identity} (serial {kit.serial:x})")
    print(f"startup kit: {kit_dir}")
    print(f"  certificate: {kit.certificate.name} (SHA-256 {kit.fingerprint})")
    print(f"  key:         {kit.private_key.name} (mode 0600: secret, ship over a secure channel)")
    print(f"  CA, kit.json, README.md; coordinator {kit.coordinator_address}")
    print(f"  valid until {kit.not_after.date()}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    records = pki.list_certificates(args.dir)
    if args.json:
        rows = [{**r.to_json(), "status": r.status_at()} for r in records]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"certificates of {args.dir}")
    table.add_column("identity")
    table.add_column("role")
    table.add_column("serial", no_wrap=True, min_width=40)  # copied whole into --serial
    table.add_column("not after")
    table.add_column("status")
    colours = {"valid": "green", "revoked": "red", "expired": "yellow"}
    for r in records:
        status = r.status_at()
        table.add_row(
            r.identity,
            r.role,
            r.serial_hex,
            str(r.not_after.date()),
            f"[{colours[status]}]{status}[/]",
        )
    console = Console()
    if not console.is_terminal:  # piped: no width to respect, keep one row per certificate
        console = Console(width=120)
    console.print(table)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    key: str | int = args.identity if args.identity else pki.parse_serial(args.serial)
    record = pki.revoke(args.dir, key, reason=args.reason)
    print(
        f"revoked {record.identity} ({record.role}, serial {record.serial_hex}, "
        f"reason {record.reason})"
    )
    print(f"CRL: {Path(args.dir) / pki.CRL}")
    print(
        f"coordinator CRL: {Path(args.dir) / pki.COORDINATOR_DIR / pki.CRL} "
        "(a running coordinator reloads it; copy it there if the coordinator runs elsewhere)"
    )
    return 0
