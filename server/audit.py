"""Independent audit of a privacy ledger: re-derive every epsilon from the mechanism fields alone.

    python -m server.audit runs/RUN_DIR                      # table; exit 0 if every figure recomputes
    python -m server.audit runs/RUN_DIR/privacy_ledger.jsonl --accountant pld
    python -m server.audit runs/RUN_DIR --json               # one JSON object instead of the table
    python -m server.audit runs/RUN_DIR --plot epsilon.png   # cumulative epsilon per hospital

Exit status: 0 every check passes; 1 discrepancies (listed, numbered); 2 bad input (missing
file, malformed JSON line, missing field: one line on stderr, no traceback).

Trust boundary. This file is for a privacy officer who does not trust the training code, so it
imports only the standard library, numpy, matplotlib and dp_accounting: nothing that trains
(no tensorflow, no common.*, client.* or other server.* module). It reads the ledger's public
mechanism fields (noise multiplier, Poisson sampling rate, steps) and recomputes.

Privacy unit: one example of one hospital's training set, add-or-remove-one adjacency. The
mechanism is DP-SGD with Poisson subsampling; anything else is refused ("unsupported sampling").

Canonical accounting (the training side computes it the same way):
  1. A hospital's events are its `prior_events` (spend on the same data before this ledger,
     written on its first record) followed by each of its records with steps > 0, up to and
     including the round in question. Events with 0 steps compose nothing and are dropped
     (dp_accounting also refuses a count of 0).
  2. Events with identical (noise_multiplier, sampling_rate, sampling) form one group whose
     steps are summed: composition is commutative, and one self-composition per group keeps
     PLD exact (a single FFT power) and fast.
  3. Each group is SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps);
     the groups are composed, in order of first appearance, into
     dp_accounting.pld.PLDAccountant() with default arguments, and get_epsilon(delta) is the
     figure. A hospital with no steps has epsilon 0; any group with sigma == 0 gives inf.
  4. Cross-check: dp_accounting.rdp.RdpAccountant() with default orders, same events. RDP is
     an upper bound, so PLD above RDP by more than 1% is noted (it should not happen).

Speed. PLDAccountant rebuilds the subsampled-Gaussian PLD for every call (0.2-0.5 s each), so
the audit builds that PLD once per (sigma, q) with the very call and arguments the accountant
uses, and repeats the accountant's own steps (identity, compose each group's self_compose,
get_epsilon_for_delta); RDP likewise sums count * RDP(q, sigma) over groups. Every audit then
checks that this path equals PLDAccountant/RdpAccountant bit for bit on its most complex
history, so a changed dp_accounting is caught rather than trusted. Identical histories are
computed once, and large ledgers are spread over processes (--jobs). What remains is
dp_accounting's own self-composition and epsilon search, about 0.15 s of CPU per distinct
history: a 50 x 30 ledger takes ~6 s when hospitals share settings and ~2 min of CPU when
every hospital has its own sampling rate.

Checks, each failure one numbered discrepancy:
  - reported epsilon equals the PLD recomputation (relative 1e-6, absolute 1e-9 near zero);
    an understated figure is the serious case, an overstated one is still a mismatch;
  - no epsilon (reported or recomputed) exceeds the hospital's max_epsilon;
  - max_epsilon and delta never change for a hospital; steps == 0 when budget_exhausted;
    rounds strictly increase per hospital; types and ranges: 0 < q <= 1, sigma >= 0,
    steps >= 0, 0 < delta < 1, sampling "poisson", accountant "pld".
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

LEDGER_NAME = "privacy_ledger.jsonl"
RECORD_FIELDS = ("round", "hospital", "status", "noise_multiplier", "sampling_rate", "steps",
                 "sampling", "epsilon", "delta", "max_epsilon", "accountant", "num_examples")
EVENT_FIELDS = ("noise_multiplier", "sampling_rate", "steps", "sampling")
STATUSES = ("trained", "budget_exhausted")
SAMPLING = "poisson"          # the only sampling the training code runs
ACCOUNTANTS = ("pld", "rdp", "both")
REL_TOL = 1e-6                # reported vs recomputed epsilon, relative
ABS_TOL = 1e-9                # ... and absolute, for figures near zero
RDP_NOTE_MARGIN = 0.01        # note when PLD exceeds the RDP bound by more than 1%
PARALLEL_MIN_HISTORIES = 16   # below this, starting processes costs more than it saves

# Read the accountant's own defaults so "PLDAccountant() with default arguments" stays true.
_PLD_DEFAULTS = inspect.signature(PLDAccountant.__init__).parameters
PLD_DISCRETIZATION = _PLD_DEFAULTS["value_discretization_interval"].default
PLD_RELATION = _PLD_DEFAULTS["neighboring_relation"].default

# A group: ((noise_multiplier, sampling_rate, sampling), steps). A history: the tuple of a
# hospital's groups in order of first appearance; with delta it fully determines epsilon.
History = tuple


class LedgerError(ValueError):
    """Input the audit cannot read: the message names the file/line and how to fix it."""


# --------------------------------------------------------------------------- reading

def ledger_path(path: str | os.PathLike) -> Path:
    """The ledger file for a run directory or a path to the file itself."""
    path = Path(path)
    return path / LEDGER_NAME if path.is_dir() else path


def read_ledger(path: str | os.PathLike) -> list[dict]:
    """Parse a ledger (run directory or file) into records; LedgerError on anything malformed."""
    file = ledger_path(path)
    if not file.is_file():
        where = f"{path} has no {LEDGER_NAME}" if Path(path).is_dir() else f"{file}: no such file"
        raise LedgerError(f"{where}; pass a run directory containing {LEDGER_NAME} or the ledger file itself")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(f"{file}: cannot read ({err}); check the file's permissions and that it is UTF-8 JSON Lines") from None
    records, seen = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LedgerError(f"{file} line {number}: not valid JSON ({err.msg}); "
                              "each line must be one complete JSON object (repair or remove a truncated line)") from None
        if not isinstance(record, dict):
            raise LedgerError(f"{file} line {number}: expected a JSON object, got {type(record).__name__}")
        first = _hospital_key(record.get("hospital")) not in seen
        problem = _missing(record, first)
        if problem:
            raise LedgerError(f"{file} line {number}: {problem}")
        seen.add(_hospital_key(record["hospital"]))
        records.append(record)
    if not records:
        raise LedgerError(f"{file}: the ledger has no records; point at the ledger of a run that trained at least one round")
    return records


def _hospital_key(hospital) -> str:
    # JSON values can be unhashable (lists); the canonical dump keys any of them.
    return hospital if isinstance(hospital, str) else json.dumps(hospital, sort_keys=True)


def _missing(record: dict, first: bool) -> str | None:
    """Why a record lacks required structure, or None."""
    absent = [name for name in RECORD_FIELDS if name not in record]
    if absent:
        return f"missing field(s) {', '.join(absent)}; every record needs {', '.join(RECORD_FIELDS)}"
    if first and "prior_events" not in record:
        return (f"first record of hospital {record['hospital']!r} has no prior_events; "
                "write \"prior_events\": [] when there was no earlier spend")
    events = record.get("prior_events", [])
    if not isinstance(events, list):
        return "prior_events must be a list of {noise_multiplier, sampling_rate, steps, sampling}"
    for index, event in enumerate(events):
        if not isinstance(event, dict) or any(name not in event for name in EVENT_FIELDS):
            return f"prior_events[{index}] needs the fields {', '.join(EVENT_FIELDS)}"
    return None


# --------------------------------------------------------------------------- field checks

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _mechanism_problems(event: dict) -> list[str]:
    """Type and range problems of the fields accounting depends on."""
    problems = []
    sigma, q, steps = event.get("noise_multiplier"), event.get("sampling_rate"), event.get("steps")
    if not (_is_number(sigma) and math.isfinite(sigma) and sigma >= 0):
        problems.append(f"noise_multiplier {sigma!r} must be a finite number >= 0")
    if not (_is_number(q) and 0 < q <= 1):
        problems.append(f"sampling_rate {q!r} must be a number in (0, 1]")
    if not (_is_int(steps) and steps >= 0):
        problems.append(f"steps {steps!r} must be an integer >= 0")
    if event.get("sampling") != SAMPLING:
        problems.append(f"unsupported sampling {event.get('sampling')!r}: only {SAMPLING!r} is accounted")
    return problems


def _record_problems(record: dict) -> list[str]:
    """Type and range problems of a record's other fields."""
    problems = []
    if not _is_int(record["round"]):
        problems.append(f"round {record['round']!r} must be an integer")
    if not (isinstance(record["hospital"], str) and record["hospital"]):
        problems.append(f"hospital {record['hospital']!r} must be a non-empty string")
    if record["status"] not in STATUSES:
        problems.append(f"status {record['status']!r} must be one of {', '.join(STATUSES)}")
    if not (_is_number(record["epsilon"]) and record["epsilon"] >= 0):
        problems.append(f"epsilon {record['epsilon']!r} must be a number >= 0")
    if not _valid_delta(record["delta"]):
        problems.append(f"delta {record['delta']!r} must be a number in (0, 1)")
    if not (_is_number(record["max_epsilon"]) and record["max_epsilon"] > 0):
        problems.append(f"max_epsilon {record['max_epsilon']!r} must be a number > 0")
    if record["accountant"] != "pld":
        problems.append(f"accountant {record['accountant']!r}: the canonical figure is 'pld'")
    if not (_is_int(record["num_examples"]) and record["num_examples"] >= 0):
        problems.append(f"num_examples {record['num_examples']!r} must be an integer >= 0")
    return problems


def _valid_delta(delta) -> bool:
    return _is_number(delta) and 0 < delta < 1


# --------------------------------------------------------------------------- accounting

@functools.lru_cache(maxsize=8)
def _subsampled_gaussian_pld(sigma: float, q: float):
    """The PLD PLDAccountant builds for PoissonSampled(q, Gaussian(sigma)): same call, same arguments."""
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=PLD_DISCRETIZATION,
        sampling_prob=q,
        neighboring_relation=PLD_RELATION,
    )


@functools.lru_cache(maxsize=256)
def _subsampled_gaussian_rdp(sigma: float, q: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at RdpAccountant's default orders."""
    return rdp_lib._compute_rdp_poisson_subsampled_gaussian(
        q=q, noise_multiplier=sigma, orders=np.array(rdp_lib.DEFAULT_RDP_ORDERS))


@functools.lru_cache(maxsize=4096)  # pure; repeated audits in one process reuse figures
def _pld_epsilon(history: History, delta: float) -> float:
    """PLDAccountant's figure for `history`, repeating its steps with the cached base PLD."""
    if not history:
        return 0.0
    if any(sigma == 0 for (sigma, _, _), _ in history):
        return math.inf  # PLDAccountant: a non-DP event makes epsilon infinite
    composed = pld_lib.identity(value_discretization_interval=PLD_DISCRETIZATION)
    for (sigma, q, _), steps in history:
        composed = composed.compose(_subsampled_gaussian_pld(float(sigma), float(q)).self_compose(steps))
    return float(composed.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(history: History, delta: float) -> float:
    """RdpAccountant's figure for `history`: the same sum of count * RDP, then compute_epsilon."""
    if not history:
        return 0.0
    if any(sigma == 0 for (sigma, _, _), _ in history):
        return math.inf
    rdp = np.zeros(len(rdp_lib.DEFAULT_RDP_ORDERS), dtype=np.float64)
    for (sigma, q, _), steps in history:
        rdp += steps * _subsampled_gaussian_rdp(float(sigma), float(q))
    return float(rdp_lib.compute_epsilon(np.array(rdp_lib.DEFAULT_RDP_ORDERS), rdp, delta)[0])


def _dp_event(history: History) -> dp_accounting.DpEvent:
    """The canonical dp_accounting event for a history."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(sigma))), steps)
        for (sigma, q, _), steps in history
    ])


@functools.lru_cache(maxsize=32)
def reference_epsilons(history: History, delta: float) -> tuple[float, float]:
    """(PLD, RDP) straight from PLDAccountant() and RdpAccountant(): the slow, plain definition."""
    if not history:
        return 0.0, 0.0
    event = _dp_event(history)
    return (float(PLDAccountant().compose(event).get_epsilon(delta)),
            float(RdpAccountant().compose(event).get_epsilon(delta)))


def _compute_chunk(jobs: list[tuple[History, float]], want_rdp: bool) -> list[tuple[float, float | None]]:
    """Epsilons for a list of (history, delta); runs in a worker process for large ledgers."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    return [(_pld_epsilon(h, d), _rdp_epsilon(h, d) if want_rdp else None) for h, d in jobs]


def _compute_all(jobs: list[tuple[History, float]], want_rdp: bool, workers: int) -> list:
    # Histories with the same settings next to each other: the base PLD cache holds a few
    # (sigma, q) only, and a ledger written round by round interleaves hospitals.
    order = sorted(range(len(jobs)), key=lambda i: (repr([key for key, _ in jobs[i][0]]), jobs[i][1],
                                                    [steps for _, steps in jobs[i][0]]))
    ordered = [jobs[i] for i in order]
    if workers <= 1 or len(jobs) < PARALLEL_MIN_HISTORIES:
        results = _compute_chunk(ordered, want_rdp)
    else:
        size = math.ceil(len(ordered) / workers)  # contiguous chunks: each base is built once
        chunks = [ordered[i:i + size] for i in range(0, len(ordered), size)]
        with ProcessPoolExecutor(max_workers=len(chunks)) as pool:
            results = [r for part in pool.map(_compute_chunk, chunks, [want_rdp] * len(chunks)) for r in part]
    unsorted = [None] * len(jobs)
    for position, result in zip(order, results):
        unsorted[position] = result
    return unsorted


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


def _dp_accounting_version() -> str:
    try:
        return metadata.version("dp-accounting")
    except metadata.PackageNotFoundError:
        return "unknown version"


# --------------------------------------------------------------------------- output

def _fmt(value, spec: str = ".6f") -> str:
    if value is None:
        return "n/a"
    if _is_number(value):
        return "inf" if math.isinf(value) else format(value, spec)
    return repr(value)


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
            "add-or-remove-one adjacency; DP-SGD with Poisson sampling; epsilon recomputed with "
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


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """Parse arguments, audit, print; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m server.audit",
        description="Recompute every epsilon in a privacy ledger from its mechanism fields alone.")
    parser.add_argument("ledger", help=f"a run directory (containing {LEDGER_NAME}) or the ledger file")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="both",
                        help="which recomputed columns to show; the checks always use PLD (default: both)")
    parser.add_argument("--plot", metavar="FILE.png", help="write cumulative epsilon per hospital to this PNG")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes for large ledgers (default: all cores)")
    args = parser.parse_args(argv)
    # RDP drops fractional orders that do not converge and logs each; the bound stays valid.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        records = read_ledger(args.ledger)
        if args.plot and not Path(args.plot).resolve().parent.is_dir():
            raise LedgerError(f"--plot {args.plot}: the directory does not exist; create it or choose another path")
    except LedgerError as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    report = audit_ledger(records, accountant=args.accountant, jobs=max(1, args.jobs))
    if args.plot:
        try:
            plot_report(report, args.plot)
        except (OSError, ValueError) as err:
            print(f"audit: cannot write --plot {args.plot}: {err}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(format_report(report, str(ledger_path(args.ledger))))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
