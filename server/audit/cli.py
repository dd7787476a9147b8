"""The audit's command line: parse arguments, call the library, print. Exit 0 / 1 / 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from server.audit.checks import ACCOUNTANTS, audit_ledger
from server.audit.output import format_report, plot_report
from server.audit.reading import LEDGER_NAME, LedgerError, ledger_path, read_ledger

# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """Parse arguments, audit, print; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m server.audit",
        description="Recompute every epsilon in a privacy ledger from its mechanism fields alone.")
    parser.add_argument("ledger", help=f"a run directory (containing {LEDGER_NAME}) or the ledger file")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="both",
                        help="which recomputed columns to show; the checks always use PLD (default: both)")
    parser.add_argument("--plot", metavar="FILE.png", help="write cumulative epsilon per hospital to this PNG")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes for large ledgers (default: all cores)")
    args = parser.parse_args(argv)
    # RDP drops fractional orders that do not converge and logs each; the bound stays valid.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        records = read_ledger(args.ledger)
        if args.plot and not Path(args.plot).resolve().parent.is_dir():
            raise LedgerError(f"--plot {args.plot}: the directory does not exist; create it or choose another path")
    except LedgerError as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    report = audit_ledger(records, accountant=args.accountant, jobs=max(1, args.jobs))
    if args.plot:
        try:
            plot_report(report, args.plot)
        except (OSError, ValueError) as err:
            print(f"audit: cannot write --plot {args.plot}: {err}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(format_report(report, str(ledger_path(args.ledger))))
    return 0 if report.ok else 1
