"""The run report: `report.md` in the run directory, with its plots, written once at the end.

Everything here is read back from the run directory (config.yaml, metrics.jsonl,
privacy_ledger.jsonl, plan.json if the run has one) so the report says exactly what the
files say. Plots stay readable at 50 hospitals: per-hospital series are summarised (min,
median, max) beyond LISTED hospitals, legends sit outside the axes, rounds are integers.

The label distribution per hospital is drawn only in a simulation, where the coordinator
itself holds the partition; in a deployment nothing a hospital sends carries its labels.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from server.report import chance_warning

LISTED = 10  # at most this many hospitals get their own line, bar label or legend entry


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _order(names):
    return sorted(names, key=lambda name: (len(name), name))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    return plt, MaxNLocator


def epsilon_plot(ledger: list[dict], path: Path) -> None:
    """Cumulative epsilon against round: one line per hospital, or min/median/max beyond LISTED."""
    plt, MaxNLocator = _pyplot()
    hospitals = _order({r["hospital"] for r in ledger})
    rounds = sorted({r["round"] for r in ledger})
    by = {(r["hospital"], r["round"]): r["epsilon"] for r in ledger}
    figure, axis = plt.subplots(figsize=(7.5, 4))
    if len(hospitals) <= LISTED:
        for hospital in hospitals:
            own = [(n, by[hospital, n]) for n in rounds if (hospital, n) in by]
            axis.plot(*zip(*own), marker=".", label=hospital)
    else:
        per_round = [[by[h, n] for h in hospitals if (h, n) in by] for n in rounds]
        axis.fill_between(rounds, [min(v) for v in per_round], [max(v) for v in per_round], alpha=0.25,
                          label=f"min-max over {len(hospitals)} hospitals")
        axis.plot(rounds, [statistics.median(v) for v in per_round], marker=".", label="median")
    for budget in sorted({r["max_epsilon"] for r in ledger}):
        axis.axhline(budget, color="red", linestyle=":", linewidth=1, label=f"budget {budget:g}")
    axis.set(xlabel="round", ylabel="cumulative epsilon", title=f"Privacy spent (delta={ledger[0]['delta']:g})")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _hospital_accuracy_plot(evaluation: dict[str, dict], path: Path) -> None:
    """Last round's federated accuracy per hospital (its own held-out split), sorted."""
    plt, _ = _pyplot()
    pairs = sorted(((name, scores["accuracy"]) for name, scores in evaluation.items() if "accuracy" in scores),
                   key=lambda item: item[1])
    height = max(2.5, 0.18 * len(pairs) + 1)
    figure, axis = plt.subplots(figsize=(7, height))
    axis.barh(range(len(pairs)), [a for _, a in pairs], color="tab:blue")
    axis.set_yticks(range(len(pairs)), [n for n, _ in pairs], fontsize=7 if len(pairs) > LISTED else 9)
    axis.set(xlim=(0, 1), xlabel="accuracy on the hospital's held-out split",
             title="Global model, last round, per hospital")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _label_plot(counts: dict[str, list[int]], class_names: list[str], path: Path) -> None:
    """Each hospital's training examples per class, as stacked horizontal bars; legend outside."""
    plt, _ = _pyplot()
    names = _order(counts)
    height = max(2.5, 0.18 * len(names) + 1)
    figure, axis = plt.subplots(figsize=(8, height))
    left = [0] * len(names)
    colours = plt.get_cmap("tab20")
    for k, label in enumerate(class_names):
        widths = [counts[n][k] for n in names]
        axis.barh(range(len(names)), widths, left=left, color=colours(k % 20), label=str(label))
        left = [a + b for a, b in zip(left, widths)]
    axis.set_yticks(range(len(names)), names, fontsize=7 if len(names) > LISTED else 9)
    axis.invert_yaxis()
    axis.set(xlabel="training examples", title="Label distribution per hospital")
    if len(class_names) <= 20:
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="class")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _privacy_section(ledger: list[dict]) -> list[str]:
    latest: dict[str, dict] = {}
    steps: dict[str, int] = {}
    for record in ledger:
        latest[record["hospital"]] = record
        steps[record["hospital"]] = steps.get(record["hospital"], 0) + int(record.get("steps", 0))
    lines = ["## Privacy", ""]
    if not latest:
        return lines + ["No hospital reported a privacy record.", ""]
    worst = max(latest.values(), key=lambda r: r["epsilon"])
    lines += [
        f"Each hospital's guarantee is (epsilon, delta)-differential privacy for one training example "
        f"(one patient image) of that hospital, zero-out adjacency (n public), over every DP-SGD step it has "
        f"ever run on its data (earlier runs included): Poisson-sampled Gaussian mechanism, accounted with "
        f"dp-accounting's PLD accountant. The federation's maximum is **epsilon {worst['epsilon']:.3f} at "
        f"delta {worst['delta']:g}** ({worst['hospital']}). Recompute it: `python -m server.audit <this directory>`.",
        "",
        "| hospital | epsilon | delta | budget | left | noise multiplier | sampling rate | steps (this run) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in _order(latest):
        r = latest[name]
        lines.append(f"| {name} | {r['epsilon']:.3f} | {r['delta']:g} | {r['max_epsilon']:g} | "
                     f"{r['max_epsilon'] - r['epsilon']:.3f} | {r['noise_multiplier']:g} | {r['sampling_rate']:.4f} | "
                     f"{steps[name]} | {r['status']} |")
    return lines + [""]


SCORES = ("accuracy", "balanced_accuracy", "auc", "loss")  # balanced accuracy shows a majority-class model


def _scores_section(metrics: list[dict], latest: dict[str, dict]) -> list[str]:
    lines = ["## Scores", ""]
    if not metrics:
        return lines + ["No round completed.", ""]
    final = metrics[-1]
    keys = [k for prefix in ("", "federated_") for k in (prefix + s for s in SCORES) if k in final]
    lines += [f"After round {final['round']} (central test set; `federated_*`: the hospitals' own held-out splits):", "",
              "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
              "| " + " | ".join(f"{final[k]:.3f}" for k in keys) + " |", ""]
    warning = [line.strip() for line in chance_warning(final, latest)]
    lines += warning + [""] * bool(warning)
    evaluation = final.get("hospitals_evaluation") or {}
    if evaluation and len(evaluation) <= LISTED:
        # Every hospital's columns: one whose split holds a single class has no AUC, and says so.
        cols = [k for k in SCORES if any(k in scores for scores in evaluation.values())]
        lines += ["| hospital | held-out examples | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        lines += [f"| {n} | {evaluation[n].get('num-examples', '?')} | "
                  + " | ".join(f"{evaluation[n][k]:.3f}" if k in evaluation[n] else "n/a" for k in cols) + " |"
                  for n in _order(evaluation)]
        lines += ["", "A hospital's held-out split is small: its scores move by chance"
                  + (" (n/a: AUC needs both classes)." if "auc" in cols else "."), ""]
    elif evaluation:
        for key in ("accuracy", "balanced_accuracy"):
            values = [s[key] for s in evaluation.values() if key in s]
            if values:
                lines += [f"Per-hospital {key.replace('_', ' ')} over {len(values)} hospitals: min {min(values):.3f}, "
                          f"median {statistics.median(values):.3f}, max {max(values):.3f} (plot below)."]
        lines += [""]
    return lines


def write_report(run, labels: tuple[dict[str, list[int]], list[str]] | None = None) -> Path:
    """Write `<run-dir>/report.md` and its plots from the run directory's files; return its path.

    `labels`: (training examples per class of each hospital, class names), known only in a
    simulation; a deployment's coordinator never sees a hospital's labels."""
    path = Path(run.path)
    ledger = _jsonl(path / "privacy_ledger.jsonl")
    metrics = _jsonl(path / "metrics.jsonl")
    resolved = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    lines = [f"# Run report: {path.name}", "",
             f"{len({r['hospital'] for r in ledger})} hospitals, {len(metrics)} round(s) of up to "
             f"{resolved.get('rounds', '?')}; data `{(resolved.get('data') or {}).get('source', '?')}`.", ""]
    latest = {r['hospital']: r for r in ledger}
    lines += _scores_section(metrics, latest)
    lines += _privacy_section(ledger)
    plan = path / "plan.json"
    if plan.is_file():
        lines += ["## Plan", "", "```json", plan.read_text().strip(), "```", ""]

    figures = [("accuracy.png", "Global model accuracy")]
    if ledger:
        epsilon_plot(ledger, path / "epsilon.png")
        figures.append(("epsilon.png", "Privacy spent per hospital"))
    evaluation = (metrics[-1].get("hospitals_evaluation") if metrics else None) or {}
    if evaluation:
        _hospital_accuracy_plot(evaluation, path / "report_hospital_accuracy.png")
        figures.append(("report_hospital_accuracy.png", "Accuracy per hospital"))
    if labels:
        _label_plot(*labels, path / "report_labels.png")
        figures.append(("report_labels.png", "Label distribution per hospital"))
    lines += ["## Plots", ""]
    lines += [f"![{title}]({name})" + "\n" for name, title in figures if (path / name).is_file()]
    lines += ["## Settings", "", "```yaml", yaml.safe_dump(resolved, sort_keys=False).strip(), "```", ""]
    report = path / "report.md"
    report.write_text("\n".join(lines))
    return report
