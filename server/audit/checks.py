"""The audit's checks: recompute every record, compare, and number each discrepancy."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from server.audit.accounting import History, _dp_accounting_version, compute_chains, reference_epsilons
from server.audit.odometer import check_odometers
from server.audit.reading import (CHARGED, MAX_STEPS, RunContext, _hospital_key, _is_int, _is_number, _mechanism_problems,
                                  _missing, _record_problems, _short, _valid_delta, short_name, unit_of)

ACCOUNTANTS = ("pld", "rdp", "both")
REL_TOL = 1e-6                # reported vs recomputed epsilon, relative
ABS_TOL = 1e-9                # ... and absolute, for figures near zero
RDP_NOTE_MARGIN = 0.01        # note when PLD exceeds the RDP bound by more than 1%
SELF_CHECK_REL_TOL = 1e-8     # the fast PLD path against PLDAccountant (measured: ~1e-10 after 20 rounds)

# --------------------------------------------------------------------------- audit

@dataclass
class AuditRow:
    """One ledger record with its recomputed figures."""

    round: object
    hospital: str
    status: object
    steps: object
    sampling_rate: object
    noise_multiplier: object
    delta: object
    max_epsilon: object
    epsilon_reported: object
    epsilon_pld: float | None = None      # None: could not be recomputed (see discrepancies)
    epsilon_rdp: float | None = None      # None: not requested or not recomputable
    remaining: float | None = None        # max_epsilon - epsilon_pld
    discrepancies: list[int] = field(default_factory=list)  # numbers in AuditReport.discrepancies
    unit: object = "image"                # what num_examples counts: "image" or "patient"


@dataclass
class HospitalSummary:
    """A hospital's final state in the ledger (and, with --odometer, in its odometer)."""

    hospital: str
    records: int
    trained_rounds: int
    prior_steps: int
    total_steps: int
    last_round: object
    last_status: object
    delta: object
    max_epsilon: object
    epsilon_reported: object
    epsilon_pld: float | None
    epsilon_rdp: float | None
    remaining: float | None
    unit: object = "image"
    epsilon_odometer: float | None = None  # what its odometer's charges compose to (None: no odometer)
    delta_odometer: float | None = None    # ... at the delta the odometer charged at
    discrepancies: list[int] = field(default_factory=list)  # every numbered discrepancy naming it

    def guarantee(self) -> tuple[float, object] | None:
        """(epsilon, delta): the larger of the ledger's recomputed figure and the odometer's."""
        figures = [(e, d) for e, d in ((self.epsilon_pld, self.delta), (self.epsilon_odometer, self.delta_odometer))
                   if e is not None]
        return max(figures, key=lambda figure: figure[0]) if figures else None


@dataclass
class AuditReport:
    """Rows, per-hospital summaries, numbered discrepancies (failures) and notes (not failures)."""

    rows: list[AuditRow]
    hospitals: list[HospitalSummary]  # sorted by name
    discrepancies: list[str]
    notes: list[str]
    accountant: str
    unchecked: list[str] = field(default_factory=list)  # what this audit could not check, in words

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def federation_max(self) -> HospitalSummary | None:
        """The hospital with the largest epsilon (ledger or odometer, whichever is larger): the federation's guarantee."""
        known = [h for h in self.hospitals if h.guarantee() is not None]
        return max(known, key=lambda h: h.guarantee()[0]) if known else None

    def to_dict(self) -> dict:
        top = self.federation_max()
        return _jsonable({
            "ok": self.ok,
            "accountant": self.accountant,
            "rows": [asdict(row) for row in self.rows],
            "hospitals": [asdict(h) for h in self.hospitals],
            "federation_max": None if top is None else
            {"hospital": top.hospital, "epsilon_pld": top.guarantee()[0], "delta": top.guarantee()[1],
             "from": "odometer" if top.guarantee()[0] != top.epsilon_pld else "ledger"},
            "discrepancies": self.discrepancies,
            "notes": self.notes,
            "unchecked": self.unchecked,
        })


def _jsonable(value):
    # Strict JSON has no Infinity/NaN: write them as strings a reader can still parse.
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _close(reported: float, recomputed: float) -> bool:
    if math.isinf(reported) or math.isinf(recomputed):
        return reported == recomputed
    return abs(reported - recomputed) <= max(REL_TOL * abs(recomputed), ABS_TOL)


class _Findings:
    """Discrepancies found while reading the rows, numbered by row at the end."""

    def __init__(self):
        self.position: dict[int, int] = {}  # id(row) -> index in rows
        self.found: list[tuple[int, int, str]] = []  # (row index, order found, message)

    def add_row(self, row: AuditRow, index: int) -> None:
        self.position[id(row)] = index

    def flag(self, row: AuditRow, message: str) -> None:
        shown = _short(row.round) if _is_int(row.round) else row.round  # a 400-digit round, cut short
        name = short_name(row.hospital) if row.hospital else '""'  # a blanked name still shows where it is
        self.found.append((self.position[id(row)], len(self.found), f"round {shown}, hospital {name}: {message}"))


def _new_state(record: dict) -> dict:
    return {"groups": {}, "broken": False, "records": 0, "trained": 0, "prior_steps": 0, "first": record,
            "prev_round": None, "unit": unit_of(record)}


def _events_of(record: dict, first: bool, hs: dict, row: AuditRow, findings: _Findings) -> list[dict]:
    """The events this record adds to its hospital's history: the first record's prior_events, any
    added_prior_events (earlier charges that entered the hospital's odometer view during the run),
    then the record itself. A bad event makes the hospital not recomputable."""
    hospital = row.hospital
    earlier = []
    if first:
        earlier += [("prior_events", index, event) for index, event in enumerate(record["prior_events"])]
    elif record.get("prior_events"):
        # Canonical accounting reads prior_events on the first record only: spend listed
        # later would be silently ignored, so refuse it (later spend is added_prior_events).
        findings.flag(row, "prior_events on a later record are outside canonical accounting; earlier spend belongs "
                           "on the hospital's first record, spend that appeared during the run in added_prior_events")
    earlier += [("added_prior_events", index, event) for index, event in enumerate(record.get("added_prior_events", []))]
    for name, index, event in earlier:
        for problem in _mechanism_problems(event):
            findings.flag(row, f"{name}[{index}]: {problem}; {short_name(hospital)} cannot be recomputed")
            hs["broken"] = True
    return [event for _, _, event in earlier] + [record]


def _consistency(record: dict, first: bool, hs: dict, row: AuditRow, findings: _Findings,
                 config: dict | None) -> None:
    """Checks of a record against its hospital's earlier records and the run's config.yaml."""
    head = hs["first"]
    if not first:
        for name in ("delta", "max_epsilon"):
            if record[name] != head[name]:
                findings.flag(row, f"{name} changed from {_short(head[name])} to {_short(record[name])}; "
                                   f"a hospital's {name} is fixed by its own configuration")
        if unit_of(record) != hs["unit"]:
            findings.flag(row, f"unit changed from {_short(hs['unit'])} to {_short(unit_of(record))}: a hospital's "
                               "unit of privacy (and what num_examples counts) is fixed for the run")
    if _is_int(record["round"]):
        if hs["prev_round"] is not None and record["round"] <= hs["prev_round"]:
            findings.flag(row, f"round does not increase (previous record of {short_name(row.hospital)} was round "
                               f"{_short(hs['prev_round'])})")
        hs["prev_round"] = record["round"]
    if record["status"] == "budget_exhausted" and record["steps"] != 0:
        findings.flag(row, f"status budget_exhausted but steps {_short(record['steps'])}; an exhausted hospital "
                           "runs no steps")
    if record["status"] in CHARGED:
        hs["trained"] += 1
        if record["steps"] == 0:
            findings.flag(row, f"status {record['status']} but steps 0: a charged round runs at least one DP-SGD step")
    for problem in _config_problems(record, config, hs):
        findings.flag(row, problem)


def _compose(events: list[dict], hs: dict) -> None:
    """Add the record's events to the hospital's groups: equal (sigma, q, sampling) sum their steps."""
    groups = hs["groups"]
    for index, event in enumerate(events):
        if event["steps"] > 0:
            key = (event["noise_multiplier"], event["sampling_rate"], event["sampling"])
            groups[key] = groups.get(key, 0) + event["steps"]
            if index < len(events) - 1:  # prior or added events: spend outside this run's rounds
                hs["prior_steps"] += event["steps"]


def audit_ledger(records: list[dict], accountant: str = "both", jobs: int = 1,
                 context: RunContext | None = None) -> AuditReport:
    """Recompute every record's epsilon and run every check; `jobs` processes for large ledgers.

    With a `context` (the run's config.yaml, metrics.jsonl, status.json, odometers) the ledger
    is also compared with those: see `_config_problems`, `_run_problems` and server/audit/odometer.py."""
    context = context or RunContext()
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    want_rdp = accountant != "pld"
    discrepancies: list[str] = []
    notes: list[str] = []
    rows: list[AuditRow] = []
    pending: list[tuple[AuditRow, History, float] | None] = []  # what to recompute per row
    state: dict[str, dict] = {}                                   # per hospital, built incrementally
    findings = _Findings()

    for record in records:
        hospital = _hospital_key(record.get("hospital"))
        get = record.get
        row = AuditRow(get("round"), hospital, get("status"), get("steps"), get("sampling_rate"),
                       get("noise_multiplier"), get("delta"), get("max_epsilon"), get("epsilon"), unit=unit_of(record))
        findings.add_row(row, len(rows))
        rows.append(row)
        first = hospital not in state
        hs = state.setdefault(hospital, _new_state(record))
        hs["records"] += 1
        hs["last"] = row
        missing = _missing(record, first)
        if missing:
            findings.flag(row, f"{missing}; this and later rounds of {short_name(hospital)} cannot be recomputed")
            hs["broken"] = True
            pending.append(None)
            continue

        for problem in _record_problems(record):
            findings.flag(row, problem)
        events = _events_of(record, first, hs, row, findings)
        mechanism = _mechanism_problems(record)
        for problem in mechanism:
            findings.flag(row, f"{problem}; this and later rounds of {short_name(hospital)} cannot be recomputed")
        hs["broken"] = hs["broken"] or bool(mechanism)
        _consistency(record, first, hs, row, findings, context.config)

        if hs["broken"]:
            pending.append(None)
            continue
        _compose(events, hs)
        if sum(hs["groups"].values()) > 10 * MAX_STEPS:
            findings.flag(row, f"{short_name(hospital)} has run more than {10 * MAX_STEPS:.0e} steps, beyond what "
                               "can be recomputed")
            hs["broken"] = True
            pending.append(None)
            continue
        if not _valid_delta(record["delta"]):
            pending.append(None)  # already flagged; no figure at a meaningless delta
            continue
        pending.append((row, tuple(hs["groups"].items()), float(record["delta"])))

    figures = _recompute(pending, want_rdp, jobs)
    for row, item in zip(rows, pending):
        if item is not None:
            row.epsilon_pld, row.epsilon_rdp = figures[item[1:]]
            _check_figures(row, findings, notes)

    for number, (index, _, message) in enumerate(sorted(findings.found), start=1):
        discrepancies.append(message)
        rows[index].discrepancies.append(number)
    if figures:
        _self_check(list(figures), figures, want_rdp, discrepancies)  # after the rows: not tied to one
    hospitals = sorted((_summary(name, hs) for name, hs in state.items()), key=lambda h: h.hospital)
    run_problems, run_notes = _run_problems(records, context)
    discrepancies += run_problems
    notes += run_notes
    odometer = check_odometers(records, context, rows, hospitals)
    discrepancies += odometer.problems
    notes += odometer.notes
    _number_by_hospital(hospitals, rows, discrepancies)
    return AuditReport(rows, hospitals, discrepancies, notes, accountant, odometer.unchecked)


def _recompute(pending: list, want_rdp: bool, jobs: int) -> dict:
    """{(history, delta): (PLD, RDP)}: each distinct history once, each hospital's composed onto its last."""
    chains: dict[str, list] = {}
    for item in pending:
        if item is not None:
            chain = chains.setdefault(item[0].hospital, [])
            if item[1:] not in chain:
                chain.append(item[1:])
    # Hospitals with identical histories (same settings, no prior spend) share one chain.
    unique = list(dict.fromkeys(tuple(chain) for chain in chains.values()))
    figures: dict = {}
    for chain, results in zip(unique, compute_chains([list(c) for c in unique], want_rdp, jobs)):
        figures.update(zip(chain, results))
    return figures


def _check_figures(row: AuditRow, findings: _Findings, notes: list[str]) -> None:
    """A row's reported epsilon against its recomputation and its budget."""
    if _is_number(row.max_epsilon):
        row.remaining = row.max_epsilon - row.epsilon_pld
    reported = row.epsilon_reported
    if _is_number(reported) and not _close(reported, row.epsilon_pld):
        kind = ("understated: the ledger claims less privacy loss than was spent"
                if reported < row.epsilon_pld else "overstated")
        findings.flag(row, f"reported epsilon {reported:.9g}, recomputed {row.epsilon_pld:.9g} (PLD): {kind}")
    if _is_number(row.max_epsilon):
        if _is_number(reported) and reported > row.max_epsilon:
            findings.flag(row, f"reported epsilon {reported:.9g} exceeds the hospital's max_epsilon {row.max_epsilon:g}")
        elif row.epsilon_pld > row.max_epsilon * (1 + REL_TOL):
            findings.flag(row, f"recomputed epsilon {row.epsilon_pld:.9g} exceeds the hospital's max_epsilon "
                               f"{row.max_epsilon:g}")
    if row.epsilon_rdp is not None and row.epsilon_pld > row.epsilon_rdp * (1 + RDP_NOTE_MARGIN):
        notes.append(f"round {_short(row.round)}, hospital {short_name(row.hospital)}: PLD epsilon "
                     f"{row.epsilon_pld:.6g} exceeds the RDP upper bound {row.epsilon_rdp:.6g} by more than 1%")


def _summary(name: str, hs: dict) -> HospitalSummary:
    last: AuditRow = hs["last"]
    total = sum(hs["groups"].values()) if not hs["broken"] else None
    return HospitalSummary(
        hospital=name, records=hs["records"], trained_rounds=hs["trained"],
        prior_steps=hs["prior_steps"], total_steps=total, last_round=last.round,
        last_status=last.status, delta=last.delta, max_epsilon=last.max_epsilon,
        epsilon_reported=last.epsilon_reported, epsilon_pld=last.epsilon_pld,
        epsilon_rdp=last.epsilon_rdp, remaining=last.remaining, unit=hs["unit"])


def _number_by_hospital(hospitals: list[HospitalSummary], rows: list[AuditRow], discrepancies: list[str]) -> None:
    """Each hospital's discrepancy numbers: its rows' and every run-level one that names it."""
    for h in hospitals:
        mine = {n for row in rows if row.hospital == h.hospital for n in row.discrepancies}
        label = f"hospital {short_name(h.hospital)}"
        mine |= {n for n, text in enumerate(discrepancies, start=1)
                 if text.startswith(label + ":") or f", {label}:" in text}
        h.discrepancies = sorted(mine)


def _self_check(unique: list, figures: dict, want_rdp: bool, discrepancies: list[str]) -> None:
    """Compare the fast path with the accountants themselves on the most complex history.

    PLD: within SELF_CHECK_REL_TOL (incremental composition rounds differently in the tenth
    digit); RDP: bit for bit (the same sum of the same terms)."""
    history, delta = max(unique, key=lambda item: (len(item[0]), sum(s for _, s in item[0])))
    reference = reference_epsilons(history, delta)
    fast = figures[(history, delta)]
    for name, mine, theirs in (("PLD", fast[0], reference[0]), ("RDP", fast[1], reference[1])):
        if name == "RDP" and not want_rdp:
            continue
        same = mine == theirs if name == "RDP" or math.isinf(theirs) else \
            abs(mine - theirs) <= SELF_CHECK_REL_TOL * max(abs(theirs), 1e-12)
        if not same:
            discrepancies.append(
                f"audit self-check: {name} fast path gives {mine!r} but {name}Accountant gives {theirs!r} "
                f"for {history} at delta {delta}; the installed dp_accounting "
                f"({_dp_accounting_version()}) differs from the one this audit was written for (0.6.0)")


# --------------------------------------------------------------------------- against the run's other files

def _setting(config: dict | None, section: str, name: str):
    value = (config or {}).get(section)
    return value.get(name) if isinstance(value, dict) else None


def _expected_batch(batch_size, n: int) -> int:
    """train.batch_size, or for "auto" the largest power of two up to n / 4 within 16..128, at most n.

    The documented rule (README, "train.batch_size"), restated here on purpose: the audit
    imports nothing of the code that trains, so a bug there cannot hide itself here.
    """
    if batch_size != "auto":
        return int(batch_size)
    return int(min(n, 128, max(16, 2 ** math.floor(math.log2(max(1.0, n / 4))))))


def _config_problems(record: dict, config: dict | None, hs: dict) -> list[str]:
    """The record's mechanism against config.yaml: sigma, q x n = batch size, steps from local epochs.

    The training side computes q = min(1, batch / n) (batch: `_expected_batch`) and steps = max(1, ceil(local_epochs / q)).
    With `dp.noise_multiplier: auto` each hospital plans its own sigma: it is then not compared
    with the config, but must stay the same for a hospital throughout the run."""
    problems = []
    sigma, q, steps, n = (record.get(k) for k in ("noise_multiplier", "sampling_rate", "steps", "num_examples"))
    configured_sigma = _setting(config, "dp", "noise_multiplier")
    if _is_number(sigma):
        if _is_number(configured_sigma):
            if sigma != configured_sigma:
                problems.append(f"noise_multiplier {sigma!r} differs from config.yaml's dp.noise_multiplier {configured_sigma!r}")
        elif configured_sigma is not None and hs.get("sigma") is not None and sigma != hs["sigma"]:
            problems.append(f"noise_multiplier changed from {hs['sigma']!r} to {sigma!r} within the run "
                            "(a planned sigma is fixed for a hospital's whole run)")
        hs.setdefault("sigma", sigma)
    batch = _setting(config, "train", "batch_size")
    if (batch == "auto" or (_is_int(batch) and batch > 0)) and _is_number(q) and 0 < q <= 1 and _is_int(n) and n > 0:
        expected = min(1.0, _expected_batch(batch, n) / n)
        if abs(q - expected) > 1e-9 * expected:
            problems.append(f"sampling_rate {q!r} x num_examples {n} = {q * n:.6g}, but config.yaml's "
                            f"train.batch_size is {batch} (expected sampling_rate {expected:.9g})")
        epochs = _setting(config, "train", "local_epochs")
        if record.get("status") in CHARGED and _is_number(epochs) and epochs > 0 and _is_int(steps):
            planned = max(1, math.ceil(epochs / q))
            if steps != planned:
                problems.append(f"steps {steps} differ from config.yaml's train.local_epochs {epochs!r} / "
                                f"sampling_rate = {planned} steps")
    return problems


def _count(value) -> int:
    """A count that a metrics or status record may give as a number or as a list of names."""
    if isinstance(value, list):
        return len(value)
    return value if _is_int(value) else 0


def _run_problems(records: list[dict], context: RunContext) -> tuple[list[str], list[str]]:
    """(discrepancies, notes) about the run as a whole: missing records, metrics, odometers."""
    problems, notes = _examples_problems(records), []
    rounds = [r["round"] for r in records if _is_int(r.get("round"))]
    metrics = [m for m in context.metrics or [] if _is_int(m.get("round"))]
    last_round = max(rounds + [m["round"] for m in metrics], default=None)
    config, status = context.config, context.status or {}
    if context.missing:
        notes.append(f"{', '.join(context.missing)} not found beside the ledger: not cross-checked (a removed round "
                     "or hospital shows only against them, or against the hospitals' odometers)")
    if status and status.get("state") != "finished":
        notes.append(f"the run is incomplete: status.json says {status.get('state')!r} "
                     f"({status.get('reason', 'no reason given')}); the ledger covers the rounds that ran")
    excused = set(map(str, status.get("failed_hospitals") or [])) | set(map(str, status.get("rejected_hospitals") or []))
    fraction = _setting(config, "train", "fraction_train")
    everyone_asked = config is not None and (fraction is None or fraction == 1)  # None: the schema's default, 1

    # A hospital asked every round leaves a record every round until it declines.
    last_of: dict[str, dict] = {}
    for record in records:
        last_of[_hospital_key(record.get("hospital"))] = record
    if everyone_asked and last_round is not None:
        for hospital, record in last_of.items():
            if (_is_int(record.get("round")) and record["round"] < last_round
                    and record.get("status") != "budget_exhausted" and hospital not in excused):
                problems.append(f"hospital {short_name(hospital)}: records stop at round {_short(record['round'])} but "
                                f"the run went on to round {_short(last_round)}, without a declined (budget_exhausted) record: "
                                "records may have been removed")
        hospitals = config.get("hospitals") if isinstance(config, dict) else None
        if _is_int(hospitals) and len(last_of) + len(excused - set(last_of)) < hospitals:
            problems.append(f"config.yaml has {hospitals} hospitals but the ledger has records of only "
                            f"{len(last_of)}: a hospital's whole history may have been removed")

    # metrics.jsonl counts the hospitals whose update was averaged each round.
    trained: dict[int, int] = {}
    for record in records:
        if record.get("status") == "trained" and _is_int(record.get("round")):
            trained[record["round"]] = trained.get(record["round"], 0) + 1
    for metric in metrics:
        claimed = metric.get("hospitals_trained")
        if not _is_int(claimed):
            continue
        ledger = trained.get(metric["round"], 0)
        if ledger < claimed:
            problems.append(f"round {_short(metric['round'])}: metrics.jsonl says {claimed} hospitals trained but the "
                            f"ledger has {ledger} trained records: charges are missing from the ledger")
        elif ledger > claimed + _count(metric.get("hospitals_rejected")):
            notes.append(f"round {_short(metric['round'])}: the ledger has {ledger} trained (charged) records but "
                         f"metrics.jsonl averaged {claimed} updates (rejected replies are charged, not averaged)")

    budget_problems, budget_notes = _budget_problems(records, config, status.get("simulated"), context.plans)
    problems += budget_problems
    notes += budget_notes
    return problems, notes


def _examples_problems(records: list[dict]) -> list[str]:
    """A hospital whose num_examples changes within the run: its training set is fixed for a run
    (the split is the hospital's), and q = batch / n and the guarantee's unit depend on n."""
    problems, seen = [], {}  # hospital -> (num_examples, round) of its latest record
    for record in records:
        hospital, n, number = _hospital_key(record.get("hospital")), record.get("num_examples"), record.get("round")
        if not _is_int(n):
            continue  # already a discrepancy of its record
        if hospital in seen and n != seen[hospital][0]:
            was, since = seen[hospital]
            problems.append(f"hospital {short_name(hospital)}: num_examples changed from {_short(was)} (round {_short(since)}) "
                            f"to {_short(n)} (round {_short(number)}); a hospital's training set is fixed within a "
                            "run: a record was edited, or the hospital's data changed mid-run")
        seen[hospital] = (n, number)
    return problems


def _budget_problems(records: list[dict], config: dict | None, simulated,
                     plans: dict | None = None) -> tuple[list[str], list[str]]:
    """(discrepancies, notes): each hospital's ledgered max_epsilon and delta against config.yaml's privacy,
    and against the privacy plan the hospital sent before round 1 (plan.json).

    Simulated hospitals (status.json "simulated": true) take both from config.yaml, so any
    difference is a discrepancy. Deployed hospitals set their own in their node config: a
    budget above the coordinator's is only a note, for the officer who reads config.yaml as
    the federation's budget. Run directories from before status.json said so get notes. A
    budget other than the hospital's own plan is always a discrepancy."""
    problems, notes = [], []
    seen = set()
    for record in records:
        hospital = _hospital_key(record.get("hospital"))
        plan = (plans or {}).get(hospital)
        for key in ("max_epsilon", "delta"):
            value, configured = record.get(key), _setting(config, "privacy", key)
            planned = plan.get(key.replace("_", "-")) if isinstance(plan, dict) else None
            if _is_number(value) and _is_number(planned) and value != planned and (hospital, key) not in seen:
                seen.add((hospital, key))
                problems.append(f"hospital {short_name(hospital)}: {key} {_short(value)} in the ledger, {_short(planned)} in the privacy plan "
                                "it sent before round 1 (plan.json)")
            if not (_is_number(value) and _is_number(configured)) or value == configured or (hospital, key, value) in seen:
                continue
            seen.add((hospital, key, value))
            said = (f"hospital {short_name(hospital)}: {key} {_short(value)} in the ledger, config.yaml's privacy.{key} "
                    f"is {_short(configured)}")
            if simulated is True:
                problems.append(f"{said}; a simulated hospital's budget is the config's")
            elif simulated is not False or value > configured:
                notes.append(f"{said} (a deployed hospital's node config sets its own)")
    return problems, notes
