"""The coordinator's words: one line per round and the run summary."""
from __future__ import annotations

import statistics

from server.cli import command

LISTED_HOSPITALS = 10  # beyond this a round line shows min / median / max instead of each


def _epsilons(latest: dict[str, dict]) -> str:
    if not latest:
        return "epsilon: no hospital reported"
    ordered = sorted(latest.values(), key=lambda r: (len(r["hospital"]), r["hospital"]))
    values = [r["epsilon"] for r in ordered]
    if len(ordered) <= LISTED_HOSPITALS:
        parts = [
            f"{r['hospital']} {r['epsilon']:.3f} ({r['max_epsilon'] - r['epsilon']:.2f} left)"
            + (" budget spent" if r["status"] == "budget_exhausted" else "")
            for r in ordered
        ]
        text = "epsilon: " + ", ".join(parts)
    else:
        text = f"epsilon over {len(values)} hospitals: min {min(values):.3f}, median {statistics.median(values):.3f}"
    return f"{text} | max {max(values):.3f} | delta {ordered[0]['delta']:g}"


def round_line(record: dict, total_rounds: int, latest: dict[str, dict]) -> str:
    """'Round 2/5 | accuracy 0.871 loss 0.402 | epsilon: ... | max ... | delta ...'."""
    scores = f"accuracy {record['accuracy']:.3f}"
    if "balanced_accuracy" in record:
        scores += f" balanced {record['balanced_accuracy']:.3f}"
    scores += f" loss {record['loss']:.3f}"
    if "auc" in record:
        scores += f" auc {record['auc']:.3f}"
    return f"Round {record['round']}/{total_rounds} | {scores} | {_epsilons(latest)} | {record['seconds']:.1f} s"


CHANCE_MARGIN = 0.05  # balanced accuracy within this of 1/classes is reported as chance level


SHORT_RUN = 5  # fewer rounds than this are named as a likely cause of a model at chance level


def chance_warning(final: dict, latest: dict[str, dict]) -> list[str]:
    """Why a model at chance level may be so, in the run's own words (empty when it learnt something)."""
    chance = 1 / final.get("classes", 2)
    balanced = final.get("balanced_accuracy")
    if balanced is None or balanced > chance + CHANCE_MARGIN:
        return []
    what = ("answers the same class for every test image" if final.get("single_class")
            else f"is at chance level (balanced accuracy {balanced:.3f}, chance {chance:.3f})")
    # A declined round's record carries no real sigma: only training records say what the noise was.
    trained = [r for r in latest.values() if r.get("status") == "trained" and r.get("num_examples")]
    if not trained:
        return [f"  Warning: the final model {what}; no hospital's last round trained (budgets spent or rounds "
                "failed: the round lines say which)."]
    if final.get("round", SHORT_RUN) < SHORT_RUN:  # one or two rounds teach little whatever the noise
        why = (f"only {final['round']} round(s) ran, too few to learn much: run more rounds (planned noise spreads "
               "the same budget over them). The data may also be too small for this budget.")
    else:
        why = "the data is too small for this budget."
    smallest = min(trained, key=lambda r: r["num_examples"])
    batch = smallest["sampling_rate"] * smallest["num_examples"]
    return [f"  Warning: the final model {what}: {why} The smallest hospital holds {smallest['num_examples']} training "
            f"examples; at epsilon {smallest['max_epsilon']:g} its noise (sigma {smallest['noise_multiplier']:.3g} on an "
            f"expected batch of {batch:.0f}, i.e. noise of {smallest['noise_multiplier'] / max(batch, 1):.2f} x the clip "
            "bound on every averaged gradient) drowns what so few examples can teach. Pool data into fewer, larger "
            "hospitals, add data, or raise the budget (privacy.max_epsilon; a deployed hospital's max-epsilon: each "
            "hospital's decision)."]


def summary_lines(run, latest: dict[str, dict], exhausted: list[str], declined_at: dict[str, float], seconds: float,
                  first_round: int = 1, planned_rounds: int = 0) -> list[str]:
    """Final accuracy, each hospital's spend and remaining budget, who ended on budget, where files are.

    `seconds` is this process's time, from `first_round` on (after a resume, not the whole run's)."""
    metrics = run.read_metrics()
    here = sum(1 for m in metrics if m.get("round", 0) >= first_round)
    last = max((m.get("round", 0) for m in metrics), default=0)
    # A deployed round cut short by an interruption is skipped on resume: say where the run ended.
    done = f"{len(metrics)} round(s)" + (f" (through round {last}; a round cut short is not rerun)"
                                         if last != len(metrics) else "")
    lines = ["", f"Finished {done} in {seconds:.1f} s." if here == len(metrics) else
             f"Finished {done}, {here} of them since the resume, in {seconds:.1f} s."]
    if metrics:
        final = metrics[-1]
        lines.append(f"Final global model: accuracy {final['accuracy']:.3f}"
                     + (f", balanced accuracy {final['balanced_accuracy']:.3f}" if "balanced_accuracy" in final else "")
                     + f", loss {final['loss']:.3f}"
                     + (f", AUC {final['auc']:.3f}" if "auc" in final else "") + " on the central test set.")
        lines.extend(chance_warning(final, latest))
    if latest:
        worst = max(latest.values(), key=lambda r: r["epsilon"])
        lines.append(f"Privacy: maximum epsilon {worst['epsilon']:.3f} at delta {worst['delta']:g} "
                     f"({worst['hospital']}), PLD accounting over Poisson-sampled DP-SGD steps.")
        if len(latest) <= LISTED_HOSPITALS:
            for record in sorted(latest.values(), key=lambda r: (len(r["hospital"]), r["hospital"])):
                lines.append(f"  {record['hospital']}: epsilon {record['epsilon']:.3f} of {record['max_epsilon']:g}, "
                             f"{record['max_epsilon'] - record['epsilon']:.3f} left")
        else:  # 50 lines would bury the rest: the report lists every hospital
            values = [r["epsilon"] for r in latest.values()]
            left = [r["max_epsilon"] - r["epsilon"] for r in latest.values()]
            lines.append(f"  {len(values)} hospitals: epsilon min {min(values):.3f}, median {statistics.median(values):.3f}, "
                         f"max {max(values):.3f}; budget left min {min(left):.3f} (each hospital: report.md)")
        if exhausted:
            named = ", ".join(exhausted[:LISTED_HOSPITALS]) + (f" and {len(exhausted) - LISTED_HOSPITALS} more"
                                                               if len(exhausted) > LISTED_HOSPITALS else "")
            if planned_rounds and len(metrics) >= planned_rounds:  # planned noise ends every hospital here
                lines.append(f"Budget spent as planned over the {planned_rounds} rounds (no further round affordable): "
                             f"{named}")
            else:
                lines.append(f"Ended on budget (cannot afford another round): {named}")
        if declined_at:
            hospital, needed = min(declined_at.items(), key=lambda item: item[1])
            lines.append(f"  {len(declined_at)} hospital(s) declined; the cheapest, {hospital}, would have reached "
                         f"epsilon {needed:.6g} > {latest[hospital]['max_epsilon']:g}. The budget left cannot pay for a "
                         "useful round: only the hospital can raise its budget (privacy.max_epsilon, or a deployed "
                         "hospital's max-epsilon); with a fixed dp.noise_multiplier, raising it or lowering "
                         "train.local_epochs also helps.")
    lines.append(f"Run directory: {run.path} (report.md, config.yaml, metrics.jsonl, privacy_ledger.jsonl, "
                 "model.keras, plots)")
    lines.append(f"Audit it: {command('audit', str(run.path))}")
    return lines
