"""The evaluation half of the audit: `evaluation_ledger.jsonl` recomputed, and checked against the odometers.

What a hospital releases about its held-out split (noisy per-class counts, Gaussian noise sigma
on each count, L2 sensitivity 1 per image or patient) is one Gaussian mechanism per evaluation.
Restated here from the ledger's documented format, not imported from the training code: a
record's evaluation epsilon composes its hospital's `prior_events` (first record), every
`added_prior_events` up to it and one event (sigma, sampling rate 1, `queries` steps) per
evaluated record up to it, grouped and composed as the training ledger's events are, with the
same PLD accountant (accounting.py). Checks, each failure one discrepancy:
  - every field is present, typed and in range; status evaluated has queries 1, declined 0;
    mechanism "gaussian-counts", sensitivity 1, accountant "pld";
  - the reported evaluation epsilon equals the recomputation (relative 1e-6); an evaluated
    record's epsilon is within its max_epsilon (the hospital's evaluation budget);
  - delta, max_epsilon, num_examples and unit never change for a hospital, and its delta is its
    training records' delta;
  - with --odometer FILE, the evaluation odometer beside it (`FILE` with suffix `.eval.jsonl`):
    its hash chain is intact; by the run id and (hospital, round), every evaluation charge of this
    run is an evaluated record with the same sigma, and every evaluated record is such a charge;
    every record's delta is the odometer's; the first record's prior_events are, as a multiset,
    the charges counted for the hospital's held-out data before its first charge of this run.
A patient's epsilon is the larger of the training and the evaluation epsilon (the held-out
patients are not in the training set); the summary states both.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from server.audit.accounting import _pld_epsilon
from server.audit.reading import (MAX_EPSILON, MAX_EXAMPLES, MAX_ROUND, MIN_SIGMA, MAX_SIGMA, SAMPLING, UNITS,
                                  LedgerError, RunContext, ShardFiles, _is_int, _is_number, _json_lines, _short,
                                  _valid_delta, odometer_chain_problems, short_name)

EVALUATION_LEDGER = "evaluation_ledger.jsonl"
EVAL_ODOMETER_SUFFIX = ".eval.jsonl"
FIELDS = ("round", "hospital", "status", "mechanism", "noise_multiplier", "queries", "sensitivity", "epsilon",
          "delta", "max_epsilon", "accountant", "num_examples", "unit")
STATUSES = {"evaluated": 1, "declined": 0}  # status -> queries
MECHANISM = "gaussian-counts"
MAX_QUERIES = 10**5  # events in one hospital's history: bounded work
REL_TOL, ABS_TOL = 1e-6, 1e-9


@dataclass
class EvaluationSummary:
    hospital: str
    evaluations: int
    epsilon_reported: object
    epsilon_pld: float | None
    max_epsilon: object
    delta: object
    unit: object
    training_epsilon: float | None = None  # the training audit's figure for the same hospital


@dataclass
class EvaluationAudit:
    present: bool  # False: the run has no evaluation ledger (nothing was evaluated)
    hospitals: list[EvaluationSummary] = field(default_factory=list)
    discrepancies: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0


def evaluation_ledger_path(ledger: str | Path) -> Path:
    path = Path(ledger)
    return (path if path.is_dir() else path.parent) / EVALUATION_LEDGER


def _event(item: dict) -> tuple | None:
    """(sigma, q, steps, sampling) of a ledger prior event or odometer charge; None when unusable."""
    sigma, q, steps, sampling = (item.get(k) for k in ("noise_multiplier", "sampling_rate", "steps", "sampling"))
    if not (_is_number(sigma) and _is_number(q) and _is_int(steps) and sampling == SAMPLING):
        return None
    if not (sigma == 0 or MIN_SIGMA <= sigma <= MAX_SIGMA) or not 0 < q <= 1 or not 0 <= steps <= MAX_QUERIES:
        return None
    return (float(sigma), float(q), int(steps), sampling)


def _epsilon(events: list[tuple], delta: float) -> float:
    groups: dict[tuple, int] = {}
    for sigma, q, steps, sampling in events:
        if steps > 0:
            groups[(sigma, q, sampling)] = groups.get((sigma, q, sampling), 0) + steps
    return _pld_epsilon(tuple(groups.items()), float(delta))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(ABS_TOL, REL_TOL * max(abs(a), abs(b)))


def _record_problems(record: dict) -> list[str]:
    missing = [name for name in FIELDS if name not in record]
    if missing:
        return [f"lacks {', '.join(missing)}"]
    problems = []
    if not (_is_int(record["round"]) and 1 <= record["round"] <= MAX_ROUND):
        problems.append(f"round {_short(record['round'])} is not a round number")
    if not isinstance(record["hospital"], str):
        problems.append("hospital is not a name")
    if record["status"] not in STATUSES:
        problems.append(f"status {_short(record['status'])} is not evaluated or declined")
    elif record["queries"] != STATUSES[record["status"]] or not _is_int(record["queries"]):
        problems.append(f"queries {_short(record['queries'])} for status {record['status']}")
    if record["mechanism"] != MECHANISM or record["accountant"] != "pld":
        problems.append(f"mechanism/accountant must be {MECHANISM}/pld")
    if record["sensitivity"] != 1 or isinstance(record["sensitivity"], bool):
        problems.append(f"sensitivity {_short(record['sensitivity'])}: the noise is calibrated to 1")
    sigma = record["noise_multiplier"]
    if not (_is_number(sigma) and MIN_SIGMA <= sigma <= MAX_SIGMA):
        problems.append(f"noise_multiplier {_short(sigma)} is out of range")
    if not _valid_delta(record["delta"]):
        problems.append(f"delta {_short(record['delta'])} is out of range")
    for name in ("epsilon", "max_epsilon"):
        if not (_is_number(record[name]) and 0 <= record[name] <= MAX_EPSILON):
            problems.append(f"{name} {_short(record[name])} is out of range")
    if not (_is_int(record["num_examples"]) and 1 <= record["num_examples"] <= MAX_EXAMPLES):
        problems.append(f"num_examples {_short(record['num_examples'])} is out of range")
    if record["unit"] not in UNITS:
        problems.append(f"unit {_short(record['unit'])} is not image or patient")
    for key in ("prior_events", "added_prior_events"):
        events = record.get(key, [])
        if not isinstance(events, list) or len(events) > MAX_QUERIES or any(_event(e) is None for e in events
                                                                             if isinstance(e, dict)) \
                or not all(isinstance(e, dict) for e in events):
            problems.append(f"{key} is not a list of events")
    return problems


def audit_evaluation(ledger: str | Path, context: RunContext, training: dict[str, tuple[float | None, object]]
                     ) -> EvaluationAudit:
    """Recompute every evaluation record; `training`: hospital -> (its training epsilon, its training delta)."""
    path = evaluation_ledger_path(ledger)
    if not path.is_file():
        found = EvaluationAudit(False)
        found.notes.append(f"no {EVALUATION_LEDGER} beside the ledger: no hospital released evaluation counts in "
                           "this run (federated evaluation off, or a run of an earlier version)")
        return found
    try:
        records = _json_lines(path)
    except LedgerError as error:
        found = EvaluationAudit(True)
        found.discrepancies.append(f"{EVALUATION_LEDGER}: {error}")
        return found
    found = EvaluationAudit(True, records=len(records))
    by_hospital: dict[str, list[dict]] = {}
    for number, record in enumerate(records, start=1):
        problems = _record_problems(record)
        if problems:
            found.discrepancies.append(f"{EVALUATION_LEDGER} record {number}: {'; '.join(problems)}")
            continue
        by_hospital.setdefault(record["hospital"], []).append(record)
    for hospital, own in sorted(by_hospital.items()):
        found.hospitals.append(_hospital(hospital, own, training.get(hospital), found.discrepancies))
    if context.odometers:
        for name in context.odometers:
            _check_odometer(Path(name), by_hospital, context.run_id, found)
    else:
        found.notes.append("evaluation records not checked against any evaluation odometer (--odometer FILE reads "
                           f"FILE's {EVAL_ODOMETER_SUFFIX} sibling)")
    return found


def _hospital(hospital: str, own: list[dict], training, discrepancies: list[str]) -> EvaluationSummary:
    shown = short_name(hospital)
    first = own[0]
    history = [_event(e) for e in first.get("prior_events", [])]
    recomputed = None
    last_round = 0
    for record in own:
        where = f"evaluation round {_short(record['round'])}, hospital {shown}"
        if record["round"] <= last_round:
            discrepancies.append(f"{where}: rounds do not increase")
        last_round = record["round"]
        for key in ("delta", "max_epsilon", "num_examples", "unit"):
            if record[key] != first[key]:
                discrepancies.append(f"{where}: {key} changed from {_short(first[key])} to {_short(record[key])}")
        history += [_event(e) for e in record.get("added_prior_events", [])]
        if record["status"] == "evaluated":
            history.append((float(record["noise_multiplier"]), 1.0, 1, SAMPLING))
        recomputed = _epsilon(history, record["delta"])
        if not _close(float(record["epsilon"]), recomputed):
            kind = "understated" if record["epsilon"] < recomputed else "overstated"
            discrepancies.append(f"{where}: evaluation epsilon {_short(record['epsilon'])} {kind}; its events "
                                 f"recompute to {recomputed:.6f}")
        if record["status"] == "evaluated" and recomputed > record["max_epsilon"] * (1 + REL_TOL):
            discrepancies.append(f"{where}: evaluation epsilon {recomputed:.6f} is over the evaluation budget "
                                 f"{_short(record['max_epsilon'])}")
    training_epsilon = None
    if training is not None:
        training_epsilon, training_delta = training
        if training_delta is not None and training_delta != first["delta"]:
            discrepancies.append(f"hospital {shown}: evaluation delta {_short(first['delta'])} is not its training "
                                 f"delta {_short(training_delta)}")
    return EvaluationSummary(hospital, sum(r["status"] == "evaluated" for r in own), own[-1]["epsilon"], recomputed,
                             first["max_epsilon"], first["delta"], first["unit"], training_epsilon)


def _check_odometer(training_odometer: Path, by_hospital: dict[str, list[dict]], run, found: EvaluationAudit) -> None:
    path = training_odometer.with_suffix(EVAL_ODOMETER_SUFFIX)
    if not path.is_file():
        found.notes.append(f"no evaluation odometer {path} beside --odometer {training_odometer}: evaluation records "
                           "not checked against it")
        return
    try:
        lines = _json_lines(path)
    except LedgerError as error:
        found.discrepancies.append(f"evaluation odometer: {error}")
        return
    found.discrepancies += [f"evaluation odometer {path}: {p}" for p in odometer_chain_problems(lines)]
    if run is None:
        found.notes.append(f"the run id is unknown (no checkpoint/state.json): evaluation odometer {path} not matched")
        return
    shards = ShardFiles(path.parent / "evaluation" / path.name)  # the held-out splits' shard files
    simulated = any("shard" in line for line in lines)
    for hospital in dict.fromkeys(str(line.get("hospital")) for line in lines):
        shown = short_name(hospital)
        own = [(i, line) for i, line in enumerate(lines) if line.get("run") == run and line.get("hospital") == hospital]
        ledger = by_hospital.get(hospital, [])
        if not own:
            if ledger and not simulated:  # declined only: its prior events are every charge in its own file
                known = Counter(_event(e) for r in ledger for e in r.get("prior_events", []) + r.get("added_prior_events", []))
                held = Counter(_event(line) for line in lines if str(line.get("hospital")) == hospital)
                if known != held:
                    found.discrepancies.append(
                        f"hospital {shown}: its evaluation records' prior events hold {sum(known.values())} event(s), "
                        f"but evaluation odometer {path} holds {sum(held.values())} charge(s) of it: the odometer "
                        f"implies evaluation epsilon {_epsilon([e for e in held.elements() if e], ledger[-1]['delta']):.6f}"
                        if _valid_delta(ledger[-1]["delta"]) else f"hospital {shown}: evaluation delta out of range")
            continue
        evaluated = [r for r in ledger if r["status"] == "evaluated"]
        charged = {line.get("round"): line for _, line in own}
        for record in evaluated:
            line = charged.pop(record["round"], None)
            if line is None:
                found.discrepancies.append(f"evaluation round {record['round']}, hospital {shown}: the ledger's "
                                           f"evaluation is not in evaluation odometer {path}")
            elif line.get("noise_multiplier") != record["noise_multiplier"] or line.get("delta") != record["delta"]:
                found.discrepancies.append(f"evaluation round {record['round']}, hospital {shown}: the ledger's sigma/"
                                           f"delta differ from evaluation odometer {path}'s charge")
        for round_number, line in charged.items():
            found.discrepancies.append(f"evaluation round {_short(round_number)}, hospital {shown}: evaluation "
                                       f"odometer {path} holds a charge of this run that the evaluation ledger lacks")
        if not ledger:
            continue
        shard = own[0][1].get("shard") if simulated else None
        before = [_event(line) for i, line in enumerate(lines)
                  if i < own[0][0] and not (line.get("run") == run and line.get("hospital") == hospital)
                  and shards.counts_for(shard, line)]
        prior = [_event(e) for e in ledger[0].get("prior_events", [])]
        if Counter(prior) != Counter(before):
            implied = _epsilon([e for e in before if e] + [_event(line) for _, line in own], ledger[-1]["delta"]) \
                if _valid_delta(ledger[-1]["delta"]) else None
            found.discrepancies.append(
                f"hospital {shown}: the first evaluation record's prior_events hold {len(prior)} event(s), but "
                f"evaluation odometer {path} holds {len(before)} earlier charge(s) on its held-out data: the odometer "
                f"implies evaluation epsilon {'n/a' if implied is None else f'{implied:.6f}'}, the ledger "
                f"{_short(ledger[-1]['epsilon'])}")


def format_evaluation(found: EvaluationAudit) -> list[str]:
    """The evaluation section of the audit's text output."""
    if not found.present:
        return ["Evaluation: " + found.notes[0]]
    lines = [f"Evaluation ({found.records} records in {EVALUATION_LEDGER}; a patient's epsilon is the larger of "
             "training and evaluation, the held-out patients being outside the training set):"]
    table = [["hospital", "evaluations", "unit", "training eps", "evaluation eps", "eval budget", "patient eps"]]
    for h in found.hospitals:
        patient = max([v for v in (h.training_epsilon, h.epsilon_pld) if v is not None], default=None)
        table.append([short_name(h.hospital), str(h.evaluations), str(h.unit),
                      "n/a" if h.training_epsilon is None else f"{h.training_epsilon:.6f}",
                      "n/a" if h.epsilon_pld is None else f"{h.epsilon_pld:.6f}", _short(h.max_epsilon),
                      "n/a" if patient is None else f"{patient:.6f}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in table]
    lines += [f"  evaluation discrepancy: {d}" for d in found.discrepancies]
    lines += [f"  note: {n}" for n in found.notes]
    lines.append("  evaluation: OK, every evaluation epsilon recomputes" if not found.discrepancies
                 else f"  evaluation: {len(found.discrepancies)} discrepancies")
    return lines


def to_dict(found: EvaluationAudit) -> dict:
    return json.loads(json.dumps({
        "present": found.present, "records": found.records, "discrepancies": found.discrepancies,
        "notes": found.notes,
        "hospitals": [vars(h) for h in found.hospitals]}, default=str))
