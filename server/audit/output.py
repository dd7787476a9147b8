"""The audit's output: the human-readable table and the epsilon plot."""
from __future__ import annotations

import math
import os

import numpy as np

from server.audit.accounting import _dp_accounting_version
from server.audit.checks import RDP_NOTE_MARGIN, AuditReport, AuditRow
from server.audit.reading import _is_int, _is_number, _short

# --------------------------------------------------------------------------- output

def _fmt(value, spec: str = ".6f") -> str:
    if value is None:
        return "n/a"
    if _is_number(value) and not (spec == "d" and not _is_int(value)):
        text = "inf" if math.isinf(value) else format(value, spec)
        return text if len(text) <= 40 else _short(value)
    return _short(value)  # a hostile value: shown, cut short, never formatted as what it is not


def format_report(report: AuditReport, source: str = "") -> str:
    """The human-readable table, per-hospital lines, federation maximum and verdict."""
    show_pld = report.accountant in ("pld", "both")
    show_rdp = report.accountant in ("rdp", "both")
    header = ["round", "hospital", "status", "steps", "q", "sigma", "eps reported"]
    header += ["eps PLD"] * show_pld + ["eps RDP"] * show_rdp + ["remaining", "check"]
    table = [header]
    for row in report.rows:
        rdp = _fmt(row.epsilon_rdp)
        if row.epsilon_rdp is not None and row.epsilon_pld is not None \
                and row.epsilon_pld > row.epsilon_rdp * (1 + RDP_NOTE_MARGIN):
            rdp += " <PLD"  # a note, not a failure: RDP should bound PLD from above
        line = [_fmt(row.round, "d"), row.hospital, str(row.status), _fmt(row.steps, "d"),
                _fmt(row.sampling_rate, ".4g"), _fmt(row.noise_multiplier, ".4g"), _fmt(row.epsilon_reported)]
        line += [_fmt(row.epsilon_pld)] * show_pld + [rdp] * show_rdp
        line += [_fmt(row.remaining, ".4f"),
                 "see " + ",".join(map(str, row.discrepancies)) if row.discrepancies
                 else ("ok" if row.epsilon_pld is not None else "n/a")]
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = [f"Privacy ledger audit{': ' + source if source else ''}",
           (f"{len(report.rows)} records, {len(report.hospitals)} hospitals. Unit: one training example, "
            "zero-out adjacency (n public); DP-SGD with Poisson sampling; epsilon recomputed with "
            f"dp_accounting {_dp_accounting_version()} (PLD, RDP cross-check)."), ""]
    out += ["  ".join(cell.rjust(w) if i not in (1, 2) else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in table]
    out.append("")
    for h in report.hospitals:
        rdp = f" (RDP bound {_fmt(h.epsilon_rdp)})" if h.epsilon_rdp is not None else ""
        out.append(f"hospital {h.hospital}: epsilon {_fmt(h.epsilon_pld)} (PLD, recomputed){rdp} at delta "
                   f"{_fmt(h.delta, 'g')}; budget {_fmt(h.max_epsilon, 'g')}, remaining {_fmt(h.remaining, '.4f')}; "
                   f"{h.trained_rounds} trained rounds, {_fmt(h.total_steps, 'd')} steps "
                   f"({h.prior_steps} before this ledger); last round {_fmt(h.last_round, 'd')} {h.last_status}")
    top = report.federation_max()
    if top is not None:
        deltas = {repr(h.delta) for h in report.hospitals}
        at = f"delta {_fmt(top.delta, 'g')}" if len(deltas) == 1 else f"its delta {_fmt(top.delta, 'g')} (deltas differ)"
        unknown = [h.hospital for h in report.hospitals if h.epsilon_pld is None]
        out.append(f"federation maximum: epsilon {_fmt(top.epsilon_pld)} at {at}, hospital {top.hospital}"
                   + (f" (not recomputable: {', '.join(unknown)})" if unknown else "")
                   + "; each patient's guarantee is their own hospital's epsilon")
    out.append("")
    if report.notes:
        out.append("Notes (not failures):")
        out += [f"  - {note}" for note in report.notes]
    if report.ok:
        out.append("OK: every figure recomputes")
    else:
        out.append(f"DISCREPANCIES ({len(report.discrepancies)}):")
        out += [f"  {i}. {message}" for i, message in enumerate(report.discrepancies, start=1)]
    return "\n".join(out)


def plot_report(report: AuditReport, path: str | os.PathLike) -> None:
    """Cumulative recomputed epsilon per round, one line per hospital, dashed budget lines."""
    import matplotlib
    matplotlib.use("Agg")  # files only: the officer may run this on a headless machine
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    by_hospital: dict[str, list[AuditRow]] = {}
    for row in report.rows:
        if _is_int(row.round) and row.epsilon_pld is not None:
            by_hospital.setdefault(row.hospital, []).append(row)
    for index, (name, rows) in enumerate(by_hospital.items()):
        color = f"C{index % 10}"
        # An infinite epsilon (zero noise) cannot be drawn; leave a gap rather than a fake value.
        ys = [r.epsilon_pld if math.isfinite(r.epsilon_pld) else np.nan for r in rows]
        ax.plot([r.round for r in rows], ys, marker="o", markersize=3, color=color, label=name)
        budget = rows[-1].max_epsilon
        if _is_number(budget) and math.isfinite(budget):
            ax.axhline(budget, color=color, linestyle="--", linewidth=0.8, alpha=0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon (PLD, recomputed)")
    ax.set_title("Privacy spend per hospital (dashed: each hospital's max_epsilon)")
    if 0 < len(by_hospital) <= 15:  # beyond that a legend hides the plot
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
