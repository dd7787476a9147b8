"""The audit's output: the human-readable table and the epsilon plot."""
from __future__ import annotations

import math
import os


from server.audit.accounting import _dp_accounting_version
from server.audit.checks import RDP_NOTE_MARGIN, AuditReport
from server.audit.reading import _is_int, _is_number, _short, short_name

# --------------------------------------------------------------------------- output

def _fmt(value, spec: str = ".6f") -> str:
    if value is None:
        return "n/a"
    if _is_number(value) and not (spec == "d" and not _is_int(value)):
        text = "inf" if math.isinf(value) else format(value, spec)
        return text if len(text) <= 40 else _short(value)
    return _short(value)  # a hostile value: shown, cut short, never formatted as what it is not


def _rounds_table(report: AuditReport) -> list[str]:
    """One line per ledger record, hospitals by name, each hospital's records in ledger order."""
    show_pld = report.accountant in ("pld", "both")
    show_rdp = report.accountant in ("rdp", "both")
    header = ["round", "hospital", "status", "steps", "q", "sigma", "eps reported"]
    header += ["eps PLD"] * show_pld + ["eps RDP"] * show_rdp + ["remaining", "check"]
    table = [header]
    for row in sorted(report.rows, key=lambda r: r.hospital):  # stable: each hospital's rounds keep their order
        rdp = _fmt(row.epsilon_rdp)
        if row.epsilon_rdp is not None and row.epsilon_pld is not None \
                and row.epsilon_pld > row.epsilon_rdp * (1 + RDP_NOTE_MARGIN):
            rdp += " <PLD"  # a note, not a failure: RDP should bound PLD from above
        line = [_fmt(row.round, "d"), short_name(row.hospital), str(row.status)[:20], _fmt(row.steps, "d"),
                _fmt(row.sampling_rate, ".4g"), _fmt(row.noise_multiplier, ".4g"), _fmt(row.epsilon_reported)]
        line += [_fmt(row.epsilon_pld)] * show_pld + [rdp] * show_rdp
        line += [_fmt(row.remaining, ".4f"), _verdict(row.discrepancies, row.epsilon_pld is not None)]
        table.append(line)
    return _aligned(table, left=(1, 2))


def _verdict(numbers: list[int], recomputed: bool = True) -> str:
    if numbers:
        shown = ",".join(map(str, numbers[:8])) + (",..." if len(numbers) > 8 else "")
        return f"see {shown}"
    return "ok" if recomputed else "n/a"


def _aligned(table: list[list[str]], left: tuple[int, ...]) -> list[str]:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in table]


def _summary_table(report: AuditReport) -> list[str]:
    """One line per hospital, by name: rounds, unit, epsilon (ledger, odometer), budget, verdict."""
    with_odometer = any(h.epsilon_odometer is not None for h in report.hospitals)
    header = ["hospital", "rounds", "trained", "unit", "epsilon", "delta"]
    header += ["odometer eps"] * with_odometer + ["budget", "remaining", "verdict"]
    table = [header]
    for h in report.hospitals:
        line = [short_name(h.hospital), _fmt(h.records, "d"), _fmt(h.trained_rounds, "d"), str(h.unit)[:20],
                _fmt(h.epsilon_pld), _fmt(h.delta, "g")]
        if with_odometer:
            odometer = _fmt(h.epsilon_odometer)
            if h.epsilon_odometer is not None and h.delta_odometer != h.delta:
                odometer += f" @{_fmt(h.delta_odometer, 'g')}"
            line.append(odometer)
        line += [_fmt(h.max_epsilon, "g"), _fmt(h.remaining, ".4f"), _verdict(h.discrepancies, h.epsilon_pld is not None)]
        table.append(line)
    return _aligned(table, left=(0, 3, len(header) - 1))


def format_report(report: AuditReport, source: str = "", rounds: bool = False) -> str:
    """Summary first (one line per hospital), the per-round table with `rounds`, then the federation
    maximum, notes, what could not be checked, and the verdict."""
    units = sorted({str(h.unit) for h in report.hospitals}) or ["image"]
    unit = " / ".join(f"one {u}" for u in units)
    out = [f"Privacy ledger audit{': ' + source if source else ''}",
           (f"{len(report.rows)} records, {len(report.hospitals)} hospitals. Unit: {unit} of a hospital's training "
            "set, zero-out adjacency (n public); DP-SGD with Poisson sampling; epsilon recomputed with "
            f"dp_accounting {_dp_accounting_version()} (PLD, RDP cross-check)."), ""]
    out += _summary_table(report)
    if rounds:
        out += [""] + _rounds_table(report) + [""] + _details(report)
    out.append("")
    out += _headline(report)
    out.append("")
    if report.notes:
        out.append("Notes (not failures):")
        out += [f"  - {note}" for note in report.notes]
    if report.unchecked:
        out.append("Not checked:")
        out += [f"  - {text}" for text in report.unchecked]
    if report.ok:
        out.append("OK: every figure recomputes" + (" from the ledger alone (see 'Not checked')" if report.unchecked
                                                   else " and matches the odometers"))
    else:
        out.append(f"DISCREPANCIES ({len(report.discrepancies)}):")
        out += [f"  {i}. {message}" for i, message in enumerate(report.discrepancies, start=1)]
    return "\n".join(out)


def _details(report: AuditReport) -> list[str]:
    """One sentence per hospital: its figures with their RDP bound, steps and last record."""
    lines = []
    for h in report.hospitals:
        rdp = f" (RDP bound {_fmt(h.epsilon_rdp)})" if h.epsilon_rdp is not None else ""
        lines.append(f"hospital {short_name(h.hospital)}: epsilon {_fmt(h.epsilon_pld)} (PLD, recomputed){rdp} at delta "
                     f"{_fmt(h.delta, 'g')}; budget {_fmt(h.max_epsilon, 'g')}, remaining {_fmt(h.remaining, '.4f')}; "
                     f"{h.trained_rounds} trained rounds, {_fmt(h.total_steps, 'd')} steps "
                     f"({h.prior_steps} before this ledger's rounds); last round {_fmt(h.last_round, 'd')} "
                     f"{str(h.last_status)[:20]}")
    return lines


def _headline(report: AuditReport) -> list[str]:
    """The federation's maximum: the larger of each hospital's ledger and odometer figures."""
    top = report.federation_max()
    if top is None:
        return []
    epsilon, delta = top.guarantee()
    deltas = {repr(h.guarantee()[1]) for h in report.hospitals if h.guarantee() is not None}
    at = f"delta {_fmt(delta, 'g')}" if len(deltas) == 1 else f"its delta {_fmt(delta, 'g')} (deltas differ)"
    source = " (by its odometer: more than the ledger shows)" if top.epsilon_pld is None or epsilon > top.epsilon_pld \
        else ""
    unknown = [short_name(h.hospital) for h in report.hospitals if h.epsilon_pld is None]
    return [f"federation maximum: epsilon {_fmt(epsilon)} at {at}, hospital {short_name(top.hospital)}{source}"
            + (f" (not recomputable: {', '.join(unknown[:10])})" if unknown else "")
            + "; each patient's guarantee is their own hospital's epsilon"]


def plot_report(report: AuditReport, path: str | os.PathLike) -> None:
    """Cumulative recomputed epsilon per round and hospital, in the run report's style (server/plots.py)."""
    from server.plots import epsilon_plot

    rows = [{"hospital": r.hospital, "round": r.round, "epsilon": r.epsilon_pld, "max_epsilon": r.max_epsilon,
             "delta": r.delta} for r in report.rows if _is_int(r.round) and r.epsilon_pld is not None]
    epsilon_plot(rows, path, ylabel="cumulative epsilon (PLD, recomputed)")
