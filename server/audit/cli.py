"""The audit's command line: parse arguments, call the library, print. Exit 0 / 1 / 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from server.audit.checks import ACCOUNTANTS, audit_ledger
from server.audit.evaluation import audit_evaluation, format_evaluation
from server.audit.evaluation import to_dict as evaluation_dict
from server.audit.output import format_report, plot_report
from server.audit.reading import LEDGER_NAME, LedgerError, ledger_path, read_context, read_ledger

# --------------------------------------------------------------------------- command line

def _usable_cpus() -> int:
    # The affinity mask, as common/cpus.py reads it; the audit imports nothing of the training stack.
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity masks on this platform (macOS)
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, audit, print; returns the exit status. Never a traceback."""
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description="Recompute every epsilon in a privacy ledger from its mechanism fields alone, and "
                    "compare the ledger with the run's config.yaml, metrics.jsonl and the hospitals' odometers.")
    parser.add_argument("ledger", help=f"a run directory (containing {LEDGER_NAME}) or the ledger file")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="both",
                        help="which recomputed columns to show; the checks always use PLD (default: both)")
    parser.add_argument("--plot", metavar="FILE.png|DIR",
                        help="write cumulative epsilon per hospital to this PNG (a directory: DIR/epsilon.png)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--rounds", action="store_true",
                        help="also print the per-round table (one line per ledger record); default: the summary only")
    parser.add_argument("--odometer", action="append", default=[], metavar="FILE",
                        help="a hospital's odometer (a simulation's: ODOMETER_DIR/simulation.jsonl): the ledger must "
                             "hold exactly its charges of this run, their delta and the earlier charges on the same "
                             "data (repeatable)")
    parser.add_argument("--jobs", type=int, default=_usable_cpus(),
                        help="processes for large ledgers (default: the cores this process may use)")
    args = parser.parse_args(argv)
    # RDP drops fractional orders that do not converge and logs each; the bound stays valid.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        records = read_ledger(args.ledger)
        context = read_context(args.ledger, args.odometer)
        plot = _plot_path(args.plot) if args.plot else None
    except LedgerError as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    try:
        report = audit_ledger(records, accountant=args.accountant, jobs=max(1, args.jobs), context=context)
    except (ArithmeticError, MemoryError, RecursionError, ValueError) as err:
        # The checks bound what they recompute; anything dp_accounting still cannot do is bad input.
        print(f"audit: cannot recompute this ledger ({err.__class__.__name__}: {str(err)[:200]}); "
              "it holds values no training run writes", file=sys.stderr)
        return 2
    # The evaluation half of the ledger (evaluation.py): recomputed beside the training figures.
    training = {h.hospital: (h.epsilon_pld, h.delta) for h in report.hospitals}
    evaluation = audit_evaluation(args.ledger, context, training)
    report.discrepancies += [f"evaluation: {d}" for d in evaluation.discrepancies]
    if plot:
        try:
            plot_report(report, plot)
        except (OSError, ValueError, OverflowError) as err:
            print(f"audit: cannot write --plot {plot}: {err}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(report.to_dict() | {"evaluation": evaluation_dict(evaluation)}, indent=1))
    else:
        print(format_report(report, str(ledger_path(args.ledger)), rounds=args.rounds))
        print("\n".join(format_evaluation(evaluation)))
    return 0 if report.ok else 1


def run(argv: list[str] | None = None) -> int:
    """`main` for the command line: an unforeseen error is still one line and exit 2, never a traceback."""
    try:
        return main(argv)
    except Exception as err:  # noqa: BLE001 - the officer gets one line; the input is what is wrong
        print(f"audit: cannot audit this input ({err.__class__.__name__}: {str(err)[:200]}); "
              "check that it is a ledger written by hospital-fl", file=sys.stderr)
        return 2


def _program_name() -> str:
    """How the officer called the audit: `hospital-fl audit` (server/cli.py sets argv[0]) or `python -m server.audit`."""
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return called if called.startswith("hospital-fl") else "python -m server.audit"


def _plot_path(given: str) -> Path:
    """The PNG to write: DIR/epsilon.png for an existing directory, else the file itself."""
    path = Path(given)
    if path.is_dir():
        return path / "epsilon.png"
    if not path.resolve().parent.is_dir():
        raise LedgerError(f"--plot {given}: the directory does not exist; create it or choose another path")
    if path.suffix.lower() != ".png":
        raise LedgerError(f"--plot {given}: give a .png file or an existing directory")
    return path
