"""The audit's checks: recompute every record, compare, and number each discrepancy."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from server.audit.accounting import History, _compute_all, _dp_accounting_version, reference_epsilons
from server.audit.reading import (_hospital_key, _is_int, _is_number, _mechanism_problems, _missing,
                                  _record_problems, _valid_delta)

ACCOUNTANTS = ("pld", "rdp", "both")
REL_TOL = 1e-6                # reported vs recomputed epsilon, relative
ABS_TOL = 1e-9                # ... and absolute, for figures near zero
RDP_NOTE_MARGIN = 0.01        # note when PLD exceeds the RDP bound by more than 1%

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


@dataclass
class HospitalSummary:
    """A hospital's final state in the ledger."""

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


@dataclass
class AuditReport:
    """Rows, per-hospital summaries, numbered discrepancies (failures) and notes (not failures)."""

    rows: list[AuditRow]
    hospitals: list[HospitalSummary]
    discrepancies: list[str]
    notes: list[str]
    accountant: str

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def federation_max(self) -> HospitalSummary | None:
        """The hospital with the largest recomputed epsilon: the federation's guarantee."""
        known = [h for h in self.hospitals if h.epsilon_pld is not None]
        return max(known, key=lambda h: h.epsilon_pld) if known else None

    def to_dict(self) -> dict:
        top = self.federation_max()
        return _jsonable({
            "ok": self.ok,
            "accountant": self.accountant,
            "rows": [asdict(row) for row in self.rows],
            "hospitals": [asdict(h) for h in self.hospitals],
            "federation_max": None if top is None else
            {"hospital": top.hospital, "epsilon_pld": top.epsilon_pld, "delta": top.delta},
            "discrepancies": self.discrepancies,
            "notes": self.notes,
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


def audit_ledger(records: list[dict], accountant: str = "both", jobs: int = 1) -> AuditReport:
    """Recompute every record's epsilon and run every check; `jobs` processes for large ledgers."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    want_rdp = accountant != "pld"
    discrepancies: list[str] = []
    notes: list[str] = []
    rows: list[AuditRow] = []
    pending: list[tuple[AuditRow, History, float] | None] = []  # what to recompute per row
    state: dict[str, dict] = {}                                   # per hospital, built incrementally

    position: dict[int, int] = {}  # id(row) -> index in rows
    found: list[tuple[int, int, str]] = []  # (row index, order found, message): numbered by row at the end

    def flag(row: AuditRow, message: str) -> None:
        found.append((position[id(row)], len(found), f"round {row.round}, hospital {row.hospital}: {message}"))

    for record in records:
        hospital = _hospital_key(record.get("hospital"))
        get = record.get
        row = AuditRow(get("round"), hospital, get("status"), get("steps"), get("sampling_rate"),
                       get("noise_multiplier"), get("delta"), get("max_epsilon"), get("epsilon"))
        position[id(row)] = len(rows)
        rows.append(row)
        first = hospital not in state
        hs = state.setdefault(hospital, {"groups": {}, "broken": False, "records": 0, "trained": 0,
                                         "prior_steps": 0, "first": record, "prev_round": None})
        hs["records"] += 1
        hs["last"] = row
        missing = _missing(record, first)
        if missing:
            flag(row, f"{missing}; this and later rounds of {hospital} cannot be recomputed")
            hs["broken"] = True
            pending.append(None)
            continue

        for problem in _record_problems(record):
            flag(row, problem)
        if first:
            for index, event in enumerate(record["prior_events"]):
                for problem in _mechanism_problems(event):
                    flag(row, f"prior_events[{index}]: {problem}; {hospital} cannot be recomputed")
                    hs["broken"] = True
        elif record.get("prior_events"):
            # Canonical accounting reads prior_events on the first record only: spend listed
            # later would be silently ignored, so refuse it.
            flag(row, "prior_events on a later record are outside canonical accounting; "
                      "earlier spend belongs on the hospital's first record")
        mechanism = _mechanism_problems(record)
        for problem in mechanism:
            flag(row, f"{problem}; this and later rounds of {hospital} cannot be recomputed")
        hs["broken"] = hs["broken"] or bool(mechanism)

        # Consistency within the hospital's history.
        head = hs["first"]
        if not first:
            for name in ("delta", "max_epsilon"):
                if record[name] != head[name]:
                    flag(row, f"{name} changed from {head[name]!r} to {record[name]!r}; "
                              f"a hospital's {name} is fixed by its own configuration")
        if _is_int(record["round"]):
            if hs["prev_round"] is not None and record["round"] <= hs["prev_round"]:
                flag(row, f"round does not increase (previous record of {hospital} was round {hs['prev_round']})")
            hs["prev_round"] = record["round"]
        if record["status"] == "budget_exhausted" and record["steps"] != 0:
            flag(row, f"status budget_exhausted but steps {record['steps']!r}; an exhausted hospital runs no steps")
        if record["status"] == "trained":
            hs["trained"] += 1

        if hs["broken"]:
            pending.append(None)
            continue
        groups = hs["groups"]
        events = (record["prior_events"] + [record]) if first else [record]
        for index, event in enumerate(events):
            if event["steps"] > 0:
                key = (event["noise_multiplier"], event["sampling_rate"], event["sampling"])
                groups[key] = groups.get(key, 0) + event["steps"]
                if first and index < len(events) - 1:
                    hs["prior_steps"] += event["steps"]
        if not _valid_delta(record["delta"]):
            pending.append(None)  # already flagged; no figure at a meaningless delta
            continue
        pending.append((row, tuple(groups.items()), float(record["delta"])))

    # Recompute each distinct (history, delta) once: budget_exhausted rounds and hospitals
    # with identical settings share histories.
    unique = list(dict.fromkeys(item[1:] for item in pending if item is not None))
    figures = dict(zip(unique, _compute_all(unique, want_rdp, jobs)))
    for row, item in zip(rows, pending):
        if item is None:
            continue
        _, history, delta = item
        row.epsilon_pld, row.epsilon_rdp = figures[(history, delta)]
        if _is_number(row.max_epsilon):
            row.remaining = row.max_epsilon - row.epsilon_pld
        reported = row.epsilon_reported
        if _is_number(reported) and not _close(reported, row.epsilon_pld):
            kind = ("understated: the ledger claims less privacy loss than was spent"
                    if reported < row.epsilon_pld else "overstated")
            flag(row, f"reported epsilon {reported:.9g}, recomputed {row.epsilon_pld:.9g} (PLD): {kind}")
        if _is_number(row.max_epsilon):
            if _is_number(reported) and reported > row.max_epsilon:
                flag(row, f"reported epsilon {reported:.9g} exceeds the hospital's max_epsilon {row.max_epsilon:g}")
            elif row.epsilon_pld > row.max_epsilon * (1 + REL_TOL):
                flag(row, f"recomputed epsilon {row.epsilon_pld:.9g} exceeds the hospital's max_epsilon {row.max_epsilon:g}")
        if row.epsilon_rdp is not None and row.epsilon_pld > row.epsilon_rdp * (1 + RDP_NOTE_MARGIN):
            notes.append(f"round {row.round}, hospital {row.hospital}: PLD epsilon {row.epsilon_pld:.6g} "
                         f"exceeds the RDP upper bound {row.epsilon_rdp:.6g} by more than 1%")

    for number, (index, _, message) in enumerate(sorted(found), start=1):
        discrepancies.append(message)
        rows[index].discrepancies.append(number)
    if unique:
        _self_check(unique, figures, want_rdp, discrepancies)  # after the rows: not tied to one

    hospitals = []
    for name, hs in state.items():
        last: AuditRow = hs["last"]
        total = sum(hs["groups"].values()) if not hs["broken"] else None
        hospitals.append(HospitalSummary(
            hospital=name, records=hs["records"], trained_rounds=hs["trained"],
            prior_steps=hs["prior_steps"], total_steps=total, last_round=last.round,
            last_status=last.status, delta=last.delta, max_epsilon=last.max_epsilon,
            epsilon_reported=last.epsilon_reported, epsilon_pld=last.epsilon_pld,
            epsilon_rdp=last.epsilon_rdp, remaining=last.remaining))
    return AuditReport(rows, hospitals, discrepancies, notes, accountant)


def _self_check(unique: list, figures: dict, want_rdp: bool, discrepancies: list[str]) -> None:
    """Compare the fast path with the accountants themselves on the most complex history."""
    history, delta = max(unique, key=lambda item: (len(item[0]), sum(s for _, s in item[0])))
    reference = reference_epsilons(history, delta)
    fast = figures[(history, delta)]
    for name, mine, theirs in (("PLD", fast[0], reference[0]), ("RDP", fast[1], reference[1])):
        if (name == "PLD" or want_rdp) and mine != theirs:
            discrepancies.append(
                f"audit self-check: {name} fast path gives {mine!r} but {name}Accountant gives {theirs!r} "
                f"for {history} at delta {delta}; the installed dp_accounting "
                f"({_dp_accounting_version()}) differs from the one this audit was written for (0.6.0)")
