"""The run's plots, in one style: report.md's, and the audit's `--plot` (`epsilon_plot`).

    epsilon_plot(ledger_records, "epsilon.png")          # cumulative epsilon per hospital, budget line
    accuracy_plot(metrics_records, "accuracy.png")       # central / federated accuracy, chance level
    hospital_accuracy_plot(evaluation, "bars.png")       # last round per hospital: value and n on each bar
    label_plot(counts, class_names, "labels.png")        # training examples per class and hospital

Every axis that shows a quantity starts at 0 (a y axis starting at round 1's epsilon makes two
rounds look steep), budgets and chance levels are drawn as labelled lines, legends are sorted
(hospital-2 before hospital-10) and sit outside the axes. Hospitals whose lines would lie on
top of each other (planned noise makes every hospital end at its budget) are drawn as one
line with the band of their extremes and the extremes named; beyond LISTED hospitals the
band is min-max with the median. Otherwise each hospital has its own colour, marker and
line style, so lines stay apart in grey print too.

Imports only the standard library and matplotlib (numbers in, PNG out): the audit, which
must not import training code, can use it.
"""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

LISTED = 10  # at most this many hospitals get their own line, bar label or legend entry
COINCIDE = 0.01  # lines closer than this share of the axis height are drawn as one band
DPI = 110
SIZE = (7.5, 4.0)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
LINESTYLES = ("-", "--", "-.", ":")
BUDGET_STYLE = {"color": "tab:red", "linestyle": (0, (4, 2)), "linewidth": 1.2}
# tab10 without its red, which the budget line uses
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive",
           "tab:cyan", "black")
CHANCE_STYLE = {"color": "0.35", "linestyle": ":", "linewidth": 1.2}


def natural(name: str):
    """Sort key: hospital-2 before hospital-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: runs and audits happen on headless machines
    import matplotlib.pyplot as plt

    return plt


def _figure(plt, size=SIZE):
    figure, axis = plt.subplots(figsize=size)
    axis.grid(alpha=0.3)
    axis.spines[["top", "right"]].set_visible(False)
    return figure, axis


def _integer_rounds(axis, rounds: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    axis.set_xlim(0, max(rounds, default=1) + 0.5)


def _legend(axis) -> None:
    """Legend outside the axes, hospitals in natural order and reference lines (budget, chance) last."""
    handles, labels = axis.get_legend_handles_labels()
    if not handles:
        return
    pairs = sorted(zip(labels, handles), key=lambda p: (p[0].startswith(("budget", "chance")), natural(p[0])))
    axis.legend([h for _, h in pairs], [label for label, _ in pairs], fontsize=8, loc="upper left",
                bbox_to_anchor=(1.01, 1.0), frameon=False)


def save(figure, path) -> Path:
    """Write `figure` as a PNG and free it."""
    plt = _pyplot()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return Path(path)


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def epsilon_figure(ledger_records: list[dict], ylabel: str = "cumulative epsilon (all runs on this data)"):
    """Cumulative epsilon against round per hospital, from ledger records (hospital, round, epsilon,
    max_epsilon, delta); the budget as a line. Records whose epsilon or round is not a number are
    left out; an infinite epsilon (zero noise) leaves a gap. Returns the figure."""
    plt = _pyplot()
    ledger_records = [r for r in ledger_records if _number(r.get("epsilon")) is not None
                      and isinstance(r.get("round"), int) and not isinstance(r.get("round"), bool)]
    by = {(str(r["hospital"]), r["round"]): _number(r["epsilon"]) for r in ledger_records}
    by = {key: (value if math.isfinite(value) else math.nan) for key, value in by.items()}
    hospitals = sorted({h for h, _ in by}, key=natural)
    rounds = sorted({n for _, n in by})
    budgets = sorted({b for r in ledger_records if (b := _number(r.get("max_epsilon"))) is not None
                      and math.isfinite(b)})
    deltas = sorted({d for r in ledger_records if (d := _number(r.get("delta"))) is not None})
    series = {h: [(n, by[h, n]) for n in rounds if (h, n) in by] for h in hospitals}
    finite = [e for e in by.values() if math.isfinite(e)]
    top = max(finite + budgets + [1e-9])
    figure, axis = _figure(plt)
    per_round = [[by[h, n] for h in hospitals if (h, n) in by and math.isfinite(by[h, n])] or [math.nan]
                 for n in rounds]
    spread = max((max(v) - min(v) for v in per_round if not math.isnan(v[0])), default=0.0)
    if len(hospitals) > LISTED or (len(hospitals) > 1 and spread <= COINCIDE * top):
        lows, highs = [min(v) for v in per_round], [max(v) for v in per_round]
        middle = [statistics.median(v) for v in per_round]
        if len(hospitals) > LISTED:
            what = f"median of {len(hospitals)} hospitals"
        else:
            what = (f"{len(hospitals)} hospitals (identical)" if spread == 0 else
                    f"{len(hospitals)} hospitals (lines coincide within {spread:.3g})")
        axis.fill_between(rounds, lows, highs, color="tab:blue", alpha=0.25, label="min-max band")
        axis.plot(rounds, middle, color="tab:blue", marker="o", markersize=3, label=what)
        last = rounds[-1]
        final = {h: by[h, last] for h in hospitals if (h, last) in by and math.isfinite(by[h, last])}
        if final:
            low, high = min(final, key=final.get), max(final, key=final.get)
            if final[high] == final[low] and len(final) > 1:
                note = f"round {last}: all {len(final)} hospitals at {final[high]:.3f}"
            elif low != high:
                note = f"round {last}: highest {high} {final[high]:.3f}, lowest {low} {final[low]:.3f}"
            else:
                note = f"round {last}: {high} {final[high]:.3f}"
            axis.text(0.98, 0.04, note, transform=axis.transAxes, fontsize=8, va="bottom", ha="right",
                      bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9})
    else:
        for k, hospital in enumerate(hospitals):
            xs, ys = zip(*series[hospital])
            axis.plot(xs, ys, color=COLOURS[k % len(COLOURS)], marker=MARKERS[k % len(MARKERS)], markersize=4,
                      linestyle=LINESTYLES[k % len(LINESTYLES)], linewidth=1.4, label=hospital)
    for budget in budgets:
        axis.axhline(budget, label=f"budget {budget:g}", **BUDGET_STYLE)
        if len(budgets) > 1:  # which dashed line is which
            axis.text(0.1, budget, f"budget {budget:g}", color=BUDGET_STYLE["color"], fontsize=8, va="bottom")
    title = "Privacy spent per hospital" + (f" (delta = {deltas[0]:g})" if len(deltas) == 1 else "")
    axis.set(xlabel="round", ylabel=ylabel, title=title)
    axis.set_ylim(0, top * 1.08)
    _integer_rounds(axis, rounds)
    _legend(axis)
    return figure


def accuracy_figure(metrics_records: list[dict], classes: int | None = None):
    """Accuracy and balanced accuracy of the global model against round, on the central test set and
    (where present) the hospitals' held-out splits; chance level 1 / classes as a line."""
    plt = _pyplot()
    figure, axis = _figure(plt)
    rounds = [int(m["round"]) for m in metrics_records]
    lines = (("accuracy", "central test set: accuracy", "tab:blue", "o", "-"),
             ("balanced_accuracy", "central test set: balanced accuracy", "tab:blue", "s", "--"),
             ("federated_accuracy", "hospitals' held-out splits: accuracy", "tab:orange", "^", "-."))
    for key, label, colour, marker, style in lines:
        points = [(int(m["round"]), float(m[key])) for m in metrics_records if key in m]
        if points:
            axis.plot(*zip(*points), color=colour, marker=marker, markersize=4, linestyle=style, label=label)
    classes = classes or next((int(m["classes"]) for m in reversed(metrics_records) if "classes" in m), None)
    if classes:
        axis.axhline(1 / classes, label=f"chance level 1/{classes}", **CHANCE_STYLE)
    axis.set(xlabel="round", ylabel="accuracy", title="Global model accuracy", ylim=(0, 1))
    _integer_rounds(axis, rounds)
    _legend(axis)
    return figure


def hospital_accuracy_figure(evaluation: dict[str, dict], classes: int | None = None):
    """Last round's accuracy per hospital on its own held-out split, sorted; each bar labelled with its
    value and its n (held-out examples) up to LISTED hospitals; chance level as a line."""
    plt = _pyplot()
    rows = sorted(((name, float(s["accuracy"]), s.get("num-examples")) for name, s in evaluation.items()
                   if "accuracy" in s), key=lambda row: (row[1], natural(row[0])))
    height = max(2.5, 0.28 * len(rows) + 1.2) if len(rows) <= LISTED else max(2.5, 0.18 * len(rows) + 1)
    figure, axis = _figure(plt, (7.5, height))
    axis.grid(axis="y", visible=False)
    axis.barh(range(len(rows)), [a for _, a, _ in rows], color="tab:blue", alpha=0.85)
    axis.set_yticks(range(len(rows)), [n for n, _, _ in rows], fontsize=7 if len(rows) > LISTED else 9)
    if len(rows) <= LISTED:
        for k, (_, accuracy, n) in enumerate(rows):
            text = f"{accuracy:.3f}" + (f"  (n={int(n)})" if n is not None else "")
            axis.text(min(accuracy, 1.0) + 0.01, k, text, va="center", fontsize=8)
    if classes:
        axis.axvline(1 / classes, label=f"chance level 1/{classes}", **CHANCE_STYLE)
        _legend(axis)
    axis.set(xlim=(0, 1.18 if len(rows) <= LISTED else 1.0), xlabel="accuracy on the hospital's held-out split",
             title="Global model, last round, per hospital")
    axis.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    return figure


def label_figure(counts: dict[str, list[int]], class_names: list[str]):
    """Each hospital's training examples per class as stacked horizontal bars, total n at each bar's end."""
    plt = _pyplot()
    names = sorted(counts, key=natural)
    height = max(2.5, 0.28 * len(names) + 1.2) if len(names) <= LISTED else max(2.5, 0.18 * len(names) + 1)
    figure, axis = _figure(plt, (8, height))
    axis.grid(axis="y", visible=False)
    left = [0] * len(names)
    colours = plt.get_cmap("tab20")
    for k, label in enumerate(class_names):
        widths = [counts[n][k] for n in names]
        axis.barh(range(len(names)), widths, left=left, color=colours(k % 20), label=str(label))
        left = [a + b for a, b in zip(left, widths)]
    if len(names) <= LISTED:
        for k, total in enumerate(left):
            axis.text(total, k, f" n={total}", va="center", fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=7 if len(names) > LISTED else 9)
    axis.invert_yaxis()
    axis.set_xlim(0, max(left, default=1) * 1.12)
    axis.set(xlabel="training examples", title="Label distribution per hospital")
    if len(class_names) <= 20:  # legend in class order, not sorted: it is the stacking order
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="class", frameon=False)
    return figure


def epsilon_plot(ledger_records: list[dict], path, ylabel: str = "cumulative epsilon (all runs on this data)") -> Path:
    """epsilon_figure as a PNG at `path` (the audit's `--plot` and report.md's epsilon.png)."""
    return save(epsilon_figure(ledger_records, ylabel), path)


def accuracy_plot(metrics_records: list[dict], path, classes: int | None = None) -> Path:
    return save(accuracy_figure(metrics_records, classes), path)


def hospital_accuracy_plot(evaluation: dict[str, dict], path, classes: int | None = None) -> Path:
    return save(hospital_accuracy_figure(evaluation, classes), path)


def label_plot(counts: dict[str, list[int]], class_names: list[str], path) -> Path:
    return save(label_figure(counts, class_names), path)
