"""The run report: `report.md` in the run directory, with its plots, written once at the end.

Everything here is read back from the run directory (config.yaml, metrics.jsonl,
privacy_ledger.jsonl, plan.json, status.json, model.keras) so the report says exactly what
the files say: the confusion matrix is the saved model's, loaded back and run on the central
test set that config.yaml defines. Plots (server/plots.py, the style the audit's `--plot`
shares) stay readable at 50 hospitals: per-hospital series are summarised (min, median, max)
beyond LISTED hospitals.

Provenance (versions, Flower's app bundle hash, start and end) comes from status.json's
"provenance" when the ServerApp wrote one (server/provenance.py), else from this process
and the files' times. The audit's verdict is the audit library's, run here on the finished
files; `hospital-fl audit RUN` repeats it independently.

The label distribution per hospital is drawn only in a simulation, where the coordinator
itself holds the partition; in a deployment nothing a hospital sends carries its labels.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import yaml

from server import plots
from server.cli import command
from server.provenance import PACKAGES, now_utc, provenance
from server.report import chance_warning

LISTED = plots.LISTED  # at most this many hospitals get their own line, bar label or legend entry
AUDIT_RECORDS = 2000  # beyond this many ledger records the report leaves the audit to its command (minutes of CPU)
CONFUSION_CLASSES = 20  # beyond this many classes the matrix is left out (per-class recall stays)
UNITS = {  # what one epsilon protects, per the ledger's `unit` (a record without one: image)
    "image": "image (each epsilon protects one image; a patient with k images is protected at group size k)",
    "patient": "patient (each epsilon protects all of one patient's images together)",
}


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _order(names):
    return sorted(names, key=plots.natural)


def _file_time(path: Path) -> str | None:
    return now_utc(path.stat().st_mtime) if path.is_file() else None


def _provenance_section(path: Path, status: dict, metrics: list[dict]) -> list[str]:
    recorded = status.get("provenance") or {}
    here = provenance()
    versions = recorded.get("versions") or here["versions"]
    flower = recorded.get("flower_run") or here["flower_run"]
    source = "status.json" if recorded else "the process that wrote this report"
    started = recorded.get("started_at") or _file_time(path / "config.yaml")
    ended = recorded.get("written_at") or _file_time(path / "status.json") or here["written_at"]
    seconds = sum(float(m.get("seconds", 0)) for m in metrics)
    lines = ["## Provenance", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {versions.get(name) or 'not installed'} |" for name in PACKAGES]
    lines += [f"| Python | {recorded.get('python') or here['python']} |"]
    if flower.get("fab_hash"):
        lines += [f"| app bundle (FAB) sha256 | `{flower['fab_hash']}` |",
                  f"| app | {flower.get('fab_id', '?')} {flower.get('fab_version', '')} (Flower run {flower.get('run_id', '?')}) |"]
    else:
        lines += ["| app bundle (FAB) sha256 | not recorded (the ServerApp did not pass Flower's run to "
                  "server/provenance.py) |"]
    lines += [f"| started (UTC) | {started or '?'} |", f"| ended (UTC) | {ended} |",
              f"| state | {status.get('state', '?')}, {status.get('rounds_completed', len(metrics))} round(s) completed, "
              f"{seconds:.1f} s in rounds |"]
    return lines + ["", f"Versions and the bundle hash from {source}.", ""]


def _audit_section(path: Path) -> list[str]:
    """The audit library's verdict on the finished files (the same checks as `hospital-fl audit`)."""
    hint = command("audit", str(path))
    lines = ["## Audit", ""]
    if not (path / "privacy_ledger.jsonl").is_file():
        return lines + ["No privacy ledger to audit.", ""]
    started = time.monotonic()
    try:
        from server.audit import audit_ledger, read_context, read_ledger

        records = read_ledger(str(path))
        if len(records) > AUDIT_RECORDS:
            return lines + [f"The ledger holds {len(records)} records: audit it with `{hint}` (exit 0 when every "
                            "check passes).", ""]
        context = read_context(str(path), [])
        report = audit_ledger(records, accountant="pld", jobs=1, context=context)
        from server.audit.evaluation import audit_evaluation

        evaluation = audit_evaluation(str(path), context, {h.hospital: (h.epsilon_pld, h.delta) for h in report.hospitals})
        report.discrepancies += [f"evaluation: {d}" for d in evaluation.discrepancies]
    except Exception as error:  # noqa: BLE001 - the report still gets written; the command says more
        return lines + [f"The audit could not run here ({type(error).__name__}: {str(error)[:200]}): run `{hint}`.", ""]
    took = time.monotonic() - started
    if report.ok:
        verdict = (f"**passed**: every epsilon in the ledger recomputes from its mechanism fields (PLD), no budget is "
                   f"exceeded and the ledger agrees with config.yaml, metrics.jsonl and status.json"
                   + (f"; every evaluation epsilon recomputes too" if evaluation.present else "") + f" ({took:.1f} s).")
    else:
        verdict = f"**{len(report.discrepancies)} discrepancies** ({took:.1f} s):"
    lines += [f"Audit at the end of the run: {verdict}"]
    lines += [f"{k}. {text}" for k, text in enumerate(report.discrepancies[:20], 1)]
    if len(report.discrepancies) > 20:
        lines += [f"... and {len(report.discrepancies) - 20} more."]
    return lines + ["", f"Repeat it independently of the training code: `{hint}` (exit 0 when every check passes).", ""]


def _unit_lines(latest: dict[str, dict]) -> list[str]:
    by_unit: dict[str, list[str]] = {}
    for name in _order(latest):
        by_unit.setdefault(latest[name].get("unit") or "image", []).append(name)
    if len(by_unit) == 1:
        (unit,) = by_unit
        return [f"Unit of privacy: {UNITS.get(unit, unit)}."]
    return [f"Unit of privacy at {', '.join(names)}: {UNITS.get(unit, unit)}." for unit, names in by_unit.items()]


def _privacy_section(ledger: list[dict], path: Path) -> list[str]:
    latest: dict[str, dict] = {}
    steps: dict[str, int] = {}
    for record in ledger:
        latest[record["hospital"]] = record
        steps[record["hospital"]] = steps.get(record["hospital"], 0) + int(record.get("steps", 0))
    lines = ["## Privacy", ""]
    if not latest:
        return lines + ["No hospital reported a privacy record.", ""]
    worst = max(latest.values(), key=lambda r: r["epsilon"])
    units = {r.get("unit") or "image" for r in latest.values()}
    unit = "one training example (one patient image)" if units == {"image"} else (
        "one patient (all of that patient's training images)" if units == {"patient"} else "one unit (below)")
    lines += [
        f"Each hospital's guarantee is (epsilon, delta)-differential privacy for {unit} of that hospital, "
        f"zero-out adjacency (n public), over every DP-SGD step it has ever run on its data (earlier runs "
        f"included): Poisson-sampled Gaussian mechanism, accounted with dp-accounting's PLD accountant. The "
        f"federation's maximum is **epsilon {worst['epsilon']:.3f} at delta {worst['delta']:g}** "
        f"({worst['hospital']}). Recompute it: `{command('audit', str(path))}`.",
        "", *_unit_lines(latest), "",
        "| hospital | epsilon | delta | budget | left | unit | noise multiplier | sampling rate | steps (this run) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in _order(latest):
        r = latest[name]
        lines.append(f"| {name} | {r['epsilon']:.3f} | {r['delta']:g} | {r['max_epsilon']:g} | "
                     f"{r['max_epsilon'] - r['epsilon']:.3f} | {r.get('unit') or 'image'} | {r['noise_multiplier']:g} | "
                     f"{r['sampling_rate']:.4f} | {steps[name]} | {r['status']} |")
    return lines + [""]


def _evaluation_section(ledger: list[dict], evaluations: list[dict]) -> list[str]:
    """Each hospital's evaluation epsilon beside its training epsilon, and the patient's (the larger)."""
    lines = ["## Privacy of the federated evaluation", ""]
    if not evaluations:
        return lines + ["No hospital released evaluation counts in this run (federated evaluation off, or none "
                        "answered): the only epsilon is the training epsilon above.", ""]
    training = {r["hospital"]: r for r in ledger}
    latest = {r["hospital"]: r for r in evaluations}
    answered: dict[str, int] = {}
    for r in evaluations:
        answered[r["hospital"]] = answered.get(r["hospital"], 0) + (r.get("status") == "evaluated")
    lines += [
        "What a hospital releases about its held-out split is its per-class counts of correct and missed "
        "classifications, each with Gaussian noise (sigma below; sensitivity 1 per unit: a patient's k images weigh "
        "1/k each), accounted with the same PLD accountant against the hospital's own evaluation budget, earlier "
        "runs included; the scores above are computed from those noisy counts. The held-out patients are not in "
        "the training set, so **a patient's epsilon is the larger of the two**: the training epsilon for a "
        "training patient, the evaluation epsilon for a held-out one.", "",
        "| hospital | training epsilon | evaluation epsilon | evaluation budget | evaluations (this run) | "
        "evaluation sigma | held-out units | patient epsilon (max) | delta |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name in _order(latest | {n: r for n, r in training.items() if n not in latest}):
        e, t = latest.get(name), training.get(name)
        if e is None:
            lines.append(f"| {name} | {t['epsilon']:.3f} | not evaluated | - | 0 | - | - | {t['epsilon']:.3f} | "
                         f"{t['delta']:g} |")
            continue
        worst = max(e["epsilon"], t["epsilon"] if t else 0.0)
        lines.append(f"| {name} | {'-' if t is None else format(t['epsilon'], '.3f')} | {e['epsilon']:.3f} | "
                     f"{e['max_epsilon']:g} | {answered[name]}{' (then declined)' if e['status'] == 'declined' else ''}"
                     f" | {e['noise_multiplier']:g} | {e['num_examples']} {e['unit']}s | {worst:.3f} | {e['delta']:g} |")
    return lines + ["", "The evaluation records are in `evaluation_ledger.jsonl`; the audit recomputes them too.", ""]


def _plan_section(plan: dict) -> list[str]:
    """plan.json as the table the terminal showed before round 1 (server/plan.py plan_lines)."""
    lines = ["## Privacy plan", "", "What each hospital planned before round 1, from its own budget "
             "(sigma: the noise multiplier it chose; `declines`: it cannot afford a useful round).", "",
             "| hospital | examples | expected batch | q | steps/round | sigma | epsilon before | epsilon at end "
             "(planned) | budget |", "|---|---|---|---|---|---|---|---|---|"]
    for name in _order(plan):
        p = plan[name]
        try:
            n, q = int(p["num-examples"]), float(p["sampling-rate"])
            sigma, final = ((f"{p['noise-multiplier']:.4g}", f"{p['epsilon-planned']:.3f}")
                            if "noise-multiplier" in p else ("-", "declines"))
            lines.append(f"| {name} | {n} | {round(q * n)} | {q:.4f} | {int(p['steps-per-round'])} | {sigma} | "
                         f"{float(p['epsilon-before']):.3f} | {final} | {float(p['max-epsilon']):g} |")
        except (KeyError, TypeError, ValueError):
            lines.append(f"| {name} | " + " | ".join(["?"] * 8) + " |")
    return lines + [""]


def confusion(path: Path, resolved: dict):
    """(matrix[true][predicted], class names) of model.keras on config.yaml's central test set, or a reason str."""
    if not (path / "model.keras").is_file():
        return "no model.keras in the run directory"
    try:
        import numpy as np

        from common.config import from_dict
        from common.federation import central_test_set
        from common.metrics import predict
        from common.model import load_model

        dataset, test_x, test_y = central_test_set(from_dict(resolved))
        probabilities = predict(load_model(path / "model.keras"), test_x)
    except Exception as error:  # noqa: BLE001 - the rest of the report stands without it
        return f"could not evaluate model.keras on the central test set ({type(error).__name__}: {str(error)[:160]})"
    k = len(dataset.class_names)
    predicted = (probabilities[:, 0] >= 0.5).astype(np.int64) if probabilities.shape[-1] == 1 else \
        probabilities.argmax(axis=-1)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(test_y, dtype=np.int64), predicted), 1)
    return matrix.tolist(), [str(c) for c in dataset.class_names]


def _confusion_section(found) -> list[str]:
    lines = ["## Per class (final model, central test set)", ""]
    if isinstance(found, str):
        return lines + [f"Not computed: {found}.", ""]
    matrix, names = found
    total = sum(map(sum, matrix))
    lines += ["| class | test examples | predicted as it | recall | precision |", "|---|---|---|---|---|"]
    for k, name in enumerate(names):
        support, predicted = sum(matrix[k]), sum(row[k] for row in matrix)
        recall = f"{matrix[k][k] / support:.3f}" if support else "n/a"
        precision = f"{matrix[k][k] / predicted:.3f}" if predicted else "n/a"
        lines.append(f"| {name} | {support} | {predicted} | {recall} | {precision} |")
    lines += ["", f"{total} test images. Recall: the share of a class's test images the model names correctly "
              "(the mean over classes is the balanced accuracy); precision: the share of the model's answers for a "
              "class that are right; n/a where a class has no test images (recall) or is never predicted (precision).",
              ""]
    if len(names) <= CONFUSION_CLASSES:
        lines += ["Confusion matrix (rows: true class, columns: predicted class):", "",
                  "| true \\ predicted | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| **{name}** | " + " | ".join(f"**{v}**" if j == k else str(v) for j, v in enumerate(row)) + " |"
                  for k, (name, row) in enumerate(zip(names, matrix))]
        lines += [""]
    return lines


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
                  + (" (n/a: AUC needs both classes)." if "auc" in cols else ".")
                  + (" They are computed from the hospital's noisy counts (differentially private evaluation: "
                     "see below), and move by the noise too." if any("evaluation_epsilon" in v for v in evaluation.values())
                     else ""), ""]
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
    status = _json(path / "status.json")
    resolved = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    lines = [f"# Run report: {path.name}", "",
             f"{len({r['hospital'] for r in ledger})} hospitals, {len(metrics)} round(s) of up to "
             f"{resolved.get('rounds', '?')}; data `{(resolved.get('data') or {}).get('source', '?')}`"
             + (f"; the run {status['state']}" if status.get("state") else "") + ".", ""]
    latest = {r['hospital']: r for r in ledger}
    lines += _scores_section(metrics, latest)
    found = confusion(path, resolved) if metrics else "no round completed"
    lines += _confusion_section(found)
    lines += _privacy_section(ledger, path)
    lines += _evaluation_section(ledger, _jsonl(path / "evaluation_ledger.jsonl"))
    if (path / "plan.json").is_file():
        plan = _json(path / "plan.json")
        lines += _plan_section(plan) if plan else [
            "## Privacy plan", "", "plan.json is empty: no hospital answered the plan query before round 1 in time "
            "(each still planned its noise before it trained, and the ledger records what it used).", ""]
    lines += _audit_section(path)

    classes = next((int(m["classes"]) for m in reversed(metrics) if "classes" in m), None)
    if not isinstance(found, str):
        classes = len(found[1])
    figures = []
    if metrics:
        plots.accuracy_plot(metrics, path / "accuracy.png", classes)
        figures.append(("accuracy.png", "Global model accuracy"))
    if ledger:
        plots.epsilon_plot(ledger, path / "epsilon.png")
        figures.append(("epsilon.png", "Privacy spent per hospital"))
    evaluation = (metrics[-1].get("hospitals_evaluation") if metrics else None) or {}
    if evaluation:
        plots.hospital_accuracy_plot(evaluation, path / "report_hospital_accuracy.png", classes)
        figures.append(("report_hospital_accuracy.png", "Accuracy per hospital"))
    if labels:
        plots.label_plot(*labels, path / "report_labels.png")
        figures.append(("report_labels.png", "Label distribution per hospital"))
    lines += ["## Plots", ""]
    lines += [f"![{title}]({name})" + "\n" for name, title in figures if (path / name).is_file()]
    lines += _provenance_section(path, status, metrics)
    lines += ["## Settings", "", "```yaml", yaml.safe_dump(resolved, sort_keys=False).strip(), "```", ""]
    report = path / "report.md"
    report.write_text("\n".join(lines))
    return report
