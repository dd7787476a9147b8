"""The ledger against the hospitals' odometers (`--odometer FILE`): the ledger must be exactly what they hold.

A hospital's odometer (client/odometer.py's file format, restated here, not imported) holds one
chained line per charge: noise_multiplier, sampling_rate, steps, sampling, hospital, run, round,
epsilon_after, delta, data_fingerprint, time, seq, prev, and in simulation the shard it was
spent on. The coordinator writes every run file, so it could edit them all consistently; only
the odometer is the hospital's. Matched by the run id (checkpoint/state.json) and then by
(hospital, round):
  - every charge of this run, of every hospital the odometer holds, is a ledger record with the
    same mechanism (sigma, q, steps), and every charged ledger record is such a charge;
  - every record's delta is the delta its hospital's odometer charged at;
  - the first record's prior_events are, as a multiset, the charges counted for that hospital's
    data from before its first charge of this run; with every added_prior_events of its records,
    they are the counted charges that are not its own in this run (charges written after its
    last charge of this run may be missing: the run may not have seen them);
  - the hospital's epsilon by its odometer (its counted charges up to its last one of this run)
    is reported beside the ledger's, and the headline takes the larger.
"Counted": in a deployment every charge in the hospital's own file; in simulation (one file for
every simulated hospital) the charges on shards that share an example with its shard.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from server.audit.accounting import _pld_epsilon
from server.audit.reading import (CHARGED, MAX_STEPS, RunContext, ShardFiles, _hospital_key, _is_int, _mechanism_problems,
                                  _short, _valid_delta, odometer_chain_problems, short_name)

NO_ODOMETER = ("not checked against any odometer (--odometer FILE): a ledger alone cannot show prior events "
               "that were dropped, records removed together with every run file that would show them, or a "
               "delta or hospital name changed in every run file")


@dataclass
class OdometerFindings:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # what could not be checked, in words


def _key(value):
    """A JSON value usable as a key: a hostile file's list or object becomes its canonical text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)


def _event(line: dict) -> tuple:
    """A charge or prior event as comparable data: (sigma, q, steps, sampling)."""
    return tuple(_key(line.get(name)) for name in ("noise_multiplier", "sampling_rate", "steps", "sampling"))


def _describe(events) -> str:
    shown = [f"{_short(steps)} steps at sigma {_short(sigma)}, q {_short(q)}" for sigma, q, steps, _ in events]
    return "; ".join(shown[:3]) + (f"; and {len(shown) - 3} more" if len(shown) > 3 else "")


def _epsilon(events: list[tuple], delta) -> float | None:
    """Epsilon of charges composed canonically (equal settings grouped, in order of first appearance);
    None for a figure that cannot be recomputed (the same bounds as a ledger record's)."""
    if not _valid_delta(delta):
        return None
    groups: dict[tuple, int] = {}
    for sigma, q, steps, sampling in events:
        if _mechanism_problems({"noise_multiplier": sigma, "sampling_rate": q, "steps": steps, "sampling": sampling}):
            return None
        if steps > 0:
            groups[(sigma, q, sampling)] = groups.get((sigma, q, sampling), 0) + steps
    if sum(groups.values()) > 10 * MAX_STEPS:
        return None
    return _pld_epsilon(tuple(groups.items()), float(delta))


def _figure(value: float | None) -> str:
    return "not recomputable" if value is None else f"{value:.6g}"


@dataclass
class _View:
    """One hospital in one odometer file: its own charges of this run and every charge counted for its data."""

    own: list[tuple[int, dict]]      # (line index, line): this hospital's charges of this run
    counted: list[tuple[int, dict]]  # every line its epsilon composes (its own included)
    delta: object                    # the delta the odometer charged it at

    def others(self, before: int | None = None) -> list[tuple]:
        """Counted charges that are not its own in this run, optionally only those before line `before`."""
        own = {index for index, _ in self.own}
        return [_event(line) for index, line in self.counted
                if index not in own and (before is None or index < before)]

    def epsilon_through(self, index: int) -> float | None:
        return _epsilon([_event(line) for i, line in self.counted if i <= index], self.delta)


def _run_of(lines: list[dict], records: list[dict], known: int | None, name: str, notes: list[str]) -> object:
    """The run id this ledger's charges carry: the run directory's, or else the run its charges match."""
    if known is not None:
        return known
    charged = {(_hospital_key(r.get("hospital")), _key(r.get("round")), _event(r)) for r in records
               if r.get("status") in CHARGED}
    votes = Counter(str(line.get("run")) for line in lines
                    if (str(line.get("hospital")), _key(line.get("round")), _event(line)) in charged)
    if not votes:
        return None
    (key, count), *rest = votes.most_common()
    run = next(line.get("run") for line in lines if str(line.get("run")) == key)
    notes.append(f"the run directory does not say which run this is (no readable checkpoint/state.json): taken as "
                 f"run {_short(run)}, whose charges in odometer {name} match {count} of the ledger's"
                 + (f" ({len(rest)} other run(s) match fewer)" if rest else "")
                 + "; a ledger copied from another run's charges would match that run")
    return run


def _views(lines: list[dict], run, shards: ShardFiles, problems: list[str], name: str) -> dict[str, _View]:
    """Every hospital of this odometer file: those with charges of this run, and those it names."""
    simulated = any("shard" in line for line in lines)
    views = {}
    for hospital in dict.fromkeys(str(line.get("hospital")) for line in lines):
        own = [(i, line) for i, line in enumerate(lines)
               if run is not None and line.get("run") == run and str(line.get("hospital")) == hospital]
        shard = own[0][1].get("shard") if own else None
        if len({str(line.get("shard")) for _, line in own}) > 1:
            problems.append(f"hospital {short_name(hospital)}: its charges of this run in odometer {name} name "
                            "more than one shard: one hospital's training data is fixed for a run")
        if simulated and not own:
            continue  # its shard, and so what counts for it, is unknown: checked as a ledger hospital below
        counted = [(i, line) for i, line in enumerate(lines) if shards.counts_for(shard if simulated else None, line)]
        mine = [line for line in lines if str(line.get("hospital")) == hospital]
        views[hospital] = _View(own, counted, (own[-1][1] if own else mine[-1]).get("delta"))
    return views


def check_odometers(records: list[dict], context: RunContext, rows: list, hospitals: list) -> OdometerFindings:
    """Every check of this module over every --odometer file; sets each hospital's odometer figure."""
    found = OdometerFindings()
    if not context.odometers:
        found.unchecked.append(NO_ODOMETER)
        return found
    status = context.status or {}
    stopped = status.get("state") not in (None, "finished")
    by_hospital: dict[str, list[tuple[dict, object]]] = {}
    for record, row in zip(records, rows):
        by_hospital.setdefault(row.hospital, []).append((record, row))
    summaries = {h.hospital: h for h in hospitals}
    covered: set[str] = set()
    simulated_file = None
    for name, lines in context.odometers.items():
        found.problems += [f"odometer {name}: {p}" for p in odometer_chain_problems(lines)]
        if any("shard" in line for line in lines):
            simulated_file = name
            if not (Path(name).parent / "shards").is_dir():
                found.notes.append(f"odometer {name} names simulated shards but has no shards/ directory beside it: "
                                   "every charge is counted for every hospital (the simulation's own rule for a "
                                   "missing shard file), so prior events may show as missing")
        run = _run_of(lines, records, context.run_id, name, found.notes)
        views = _views(lines, run, ShardFiles(Path(name)), found.problems, name)
        if not set(views) & set(by_hospital) and not any(v.own for v in views.values()):
            named = sorted({str(line.get("hospital")) for line in lines})
            found.problems.append(f"odometer {name} holds no charge of any hospital in this ledger (it names "
                                  f"{', '.join(map(short_name, named[:10])) or 'none'}): pass the odometer of a "
                                  "hospital in this run")
            continue
        for hospital, view in views.items():
            covered.add(hospital)
            ledger = by_hospital.get(hospital, [])
            _check_hospital(hospital, view, ledger, name, stopped, found)
            summary = summaries.get(hospital)
            if summary is not None:
                _set_figure(summary, view, ledger)
    for hospital, ledger in by_hospital.items():
        charged = [record for record, _ in ledger if record.get("status") in CHARGED]
        if hospital in covered or not charged:
            continue
        rounds = ", ".join(_short(r.get("round")) for r in charged[:10])
        if simulated_file is not None:
            found.problems.append(f"hospital {short_name(hospital)}: the ledger's {len(charged)} charge(s) (rounds "
                                  f"{rounds}) are not in odometer {simulated_file}, which holds every simulated "
                                  "hospital's charges: the hospital's name or its records were changed")
        else:
            found.notes.append(f"hospital {short_name(hospital)}: no --odometer given holds its charges; its records "
                               "are not checked against an odometer")
    return found


def _set_figure(summary, view: _View, ledger: list) -> None:
    """The hospital's epsilon by its odometer: its counted charges through its last one of this run."""
    last = view.own[-1][0] if view.own else max(i for i, _ in view.counted)
    events = [_event(line) for i, line in view.counted if i <= last]
    groups = Counter()
    for sigma, q, steps, sampling in events:
        groups[(sigma, q, sampling)] += steps if _is_int(steps) else 0
    ledger_groups = Counter()
    for record, _ in ledger:
        for event in record.get("prior_events", []) + record.get("added_prior_events", []) + [record]:
            sigma, q, steps, sampling = _event(event)
            ledger_groups[(sigma, q, sampling)] += steps if _is_int(steps) else 0
    if +groups == +ledger_groups and view.delta == summary.delta and summary.epsilon_pld is not None:
        summary.epsilon_odometer = summary.epsilon_pld  # the same events: the same figure, not computed twice
    else:
        summary.epsilon_odometer = _epsilon(events, view.delta)
    summary.delta_odometer = view.delta


def _check_hospital(hospital: str, view: _View, ledger: list, name: str, stopped: bool,
                    found: OdometerFindings) -> None:
    """One hospital: its charges of this run against its records, delta, prior events."""
    shown = short_name(hospital)
    charges: dict[object, list[tuple[int, dict]]] = {}
    for index, line in view.own:
        charges.setdefault(_key(line.get("round")), []).append((index, line))
    if view.own and not ledger:
        rounds = ", ".join(_short(line.get("round")) for _, line in view.own[:10])
        text = (f"hospital {shown}: odometer {name} holds {len(view.own)} charge(s) of this run (rounds {rounds}) but "
                f"the ledger has no record of {shown}: its spend is missing from the ledger (the odometer implies "
                f"epsilon {_figure(view.epsilon_through(view.own[-1][0]))} at delta {_short(view.delta)})")
        (found.notes if stopped else found.problems).append(text)
        return
    for record, row in ledger:
        at = charges.get(_key(record.get("round")))
        if record.get("status") in CHARGED:
            if not at:
                found.problems.append(
                    f"round {_short(record.get('round'))}, hospital {shown}: the ledger's charge "
                    f"({_describe([_event(record)])}) is not in odometer {name}")
                continue
            index, line = at.pop(0)
            if _event(line) != _event(record):
                found.problems.append(
                    f"round {_short(record.get('round'))}, hospital {shown}: the ledger's charge "
                    f"({_describe([_event(record)])}) is not what odometer {name} charged ({_describe([_event(line)])}); "
                    f"the odometer implies epsilon {_figure(view.epsilon_through(index))} after this round")
    for left in charges.values():
        for index, line in left:
            text = (f"round {_short(line.get('round'))}, hospital {shown}: odometer {name} holds a charge of this run "
                    f"({_short(line.get('steps'))} steps) that the ledger lacks: the hospital spent more than the "
                    f"ledger says (the odometer implies epsilon {_figure(view.epsilon_through(index))} after this "
                    "round; resume the run to ledger a cut-short round as lost)")
            (found.notes if stopped else found.problems).append(text)
    if ledger:
        _check_delta(shown, view, ledger, name, found)
        _check_prior(shown, view, ledger, name, found)


def _check_delta(shown: str, view: _View, ledger: list, name: str, found: OdometerFindings) -> None:
    """Every record's delta is the one the hospital's odometer charged at."""
    wrong = [(record, row) for record, row in ledger if record.get("delta") != view.delta]
    if not wrong:
        return
    record, row = wrong[-1]
    last = view.own[-1][0] if view.own else max(i for i, _ in view.counted)
    rounds = ", ".join(_short(r.get("round")) for r, _ in wrong[:10]) + (" ..." if len(wrong) > 10 else "")
    found.problems.append(
        f"hospital {shown}: delta {_short(record.get('delta'))} in the ledger (round(s) {rounds}), but odometer {name} "
        f"charged it at delta {_short(view.delta)}: at that delta the odometer implies epsilon "
        f"{_figure(view.epsilon_through(last))} where the ledger says {_figure(row.epsilon_pld)}")


def _check_prior(shown: str, view: _View, ledger: list, name: str, found: OdometerFindings) -> None:
    """prior_events (first record) and added_prior_events (any record) against the odometer's other charges.

    A trained round's reply carries every counted charge that is not the hospital's own in this
    run, read under the odometer's lock just before its own charge: so through each trained
    record, prior_events and the added_prior_events so far are exactly the others written before
    that record's charge. (A lost record is ledgered later, from another reply, and a declined
    one has no charge to place it: only the whole is checked for them.)"""
    charge_at = {_key(line.get("round")): index for index, line in view.own}
    known = Counter()
    for number, (record, row) in enumerate(ledger):
        known += Counter(_event(event) for event in (record.get("prior_events", []) if number == 0 else []))
        known += Counter(_event(event) for event in record.get("added_prior_events", []))
        index = charge_at.get(_key(record.get("round")))
        if record.get("status") != "trained" or index is None:
            continue
        expected = Counter(view.others(before=index))
        if known != expected:
            which, before = (("the first record's prior_events", "from before this run's first charge") if number == 0
                             else ("prior_events and added_prior_events so far", "from before this round's charge"))
            found.problems.append(_mismatch(
                f"round {_short(record.get('round'))}, hospital {shown}: {which}", known, expected, before, name, view.epsilon_through(index), row.epsilon_pld,
                f"at round {_short(record.get('round'))}"))
            return  # later rounds follow from this one
    others = view.others()
    # Charges written after the hospital's last charge of this run may or may not have been seen:
    # the ledger holds the others up to that charge, and maybe some that follow it.
    cut = len(view.others(before=view.own[-1][0])) if view.own else 0
    allowed = [Counter(others[:end]) for end in range(cut, len(others) + 1)]
    if known not in allowed:
        last = view.own[-1][0] if view.own else max(i for i, _ in view.counted)
        found.problems.append(_mismatch(
            f"hospital {shown}: prior_events and added_prior_events", known, allowed[0],
            "that are not its own charges of this run", name, view.epsilon_through(last), ledger[-1][1].epsilon_pld,
            f"after round {_short(ledger[-1][0].get('round'))}"))


def _mismatch(what: str, ledger: Counter, odometer: Counter, which: str, name: str, implied, claimed, when: str) -> str:
    missing, extra = odometer - ledger, ledger - odometer
    parts = []
    if missing:
        parts.append(f"{sum(missing.values())} missing ({_describe(missing.elements())})")
    if extra:
        parts.append(f"{sum(extra.values())} not in the odometer ({_describe(extra.elements())})")
    return (f"{what} hold {sum(ledger.values())} event(s), but odometer {name} holds {sum(odometer.values())} "
            f"charge(s) on this hospital's data {which} ({', '.join(parts)}): the odometer implies epsilon "
            f"{_figure(implied)} {when}, the ledger {_figure(claimed)}")
