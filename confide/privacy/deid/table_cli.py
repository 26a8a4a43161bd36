"""`confide deid table`: de-identify a CSV at the site before training; fail closed on the gate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from confide.errors import ConfideError
from confide.privacy.crypto._files import write_atomic
from confide.privacy.deid.config import DeidConfig
from confide.privacy.deid.errors import KAnonymityNotReached
from confide.privacy.deid.table import deidentify, read_table, write_table

EXIT_USAGE = 2
EXIT_GATE = 3  # the k-anonymity gate failed closed: nothing written, do not train


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``confide deid table``; sets ``func`` to :func:`run`."""
    p.add_argument("--config", type=Path, required=True, metavar="TOML", help="deid.toml")
    p.add_argument(
        "--in",
        dest="in_path",
        type=Path,
        required=True,
        metavar="CSV",
        help="raw table (.csv or .csv.gz)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="CSV",
        help="de-identified table (.csv or .csv.gz), written atomically",
    )
    p.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="report for the ledger and audit log (no data in it)",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command; 0 on success, 3 when the gate fails closed, 2 on any other error.

    Nothing is written unless every step succeeded: the table and the report go through a
    temp file and a rename.
    """
    try:
        cfg = DeidConfig.load(args.config)
        table, report = deidentify(read_table(args.in_path), cfg)
    except KAnonymityNotReached as e:
        print(f"confide deid: gate failed closed: {e}", file=sys.stderr)
        return EXIT_GATE
    except ConfideError as e:
        print(f"confide deid: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    write_table(args.out, table)
    if args.report is not None:
        write_atomic(args.report.expanduser(), report.to_json().encode())
    if not args.quiet:
        lv = ", ".join(f"{c}={g['level_name']}" for c, g in report.generalization.items())
        ell = f", ℓ={report.l_achieved}" if report.l_achieved is not None else ""
        print(
            f"de-identified {report.rows_in} rows -> {report.rows_out} "
            f"({report.rows_suppressed} suppressed, {100 * report.suppression_fraction:.1f}%): "
            f"k={report.k_achieved}{ell}, {report.equivalence_classes} classes, "
            f"prosecutor risk {report.prosecutor_risk:.3f}, in {report.seconds:.2f} s"
        )
        if lv:
            print(f"generalization: {lv}")
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"table:  {args.out}")
        if args.report is not None:
            print(f"report: {args.report} (config sha256 {report.config_sha256[:12]}…)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser (``python -m confide.privacy.deid.table_cli``)."""
    p = argparse.ArgumentParser(prog="confide deid table", description=__doc__)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
