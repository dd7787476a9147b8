"""Reading the audit's inputs: the ledger and the run's other files, and field checks.

Standard library only; every problem is a LedgerError naming the file and line, or a
per-record list of problems that the checks number.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

LEDGER_NAME = "privacy_ledger.jsonl"
RECORD_FIELDS = ("round", "hospital", "status", "noise_multiplier", "sampling_rate", "steps",
                 "sampling", "epsilon", "delta", "max_epsilon", "accountant", "num_examples")
EVENT_FIELDS = ("noise_multiplier", "sampling_rate", "steps", "sampling")
EVENT_LISTS = ("prior_events", "added_prior_events")  # optional lists of earlier charges on a record
UNITS = ("image", "patient")  # the unit of privacy that num_examples counts; a record without one: "image"
STATUSES = ("trained", "budget_exhausted", "lost")  # lost: charged, but its reply never reached the ledger
CHARGED = ("trained", "lost")  # statuses whose steps were charged (and compose)
SAMPLING = "poisson"          # the only sampling the training code runs
# Bounds that keep a hostile ledger from making the audit allocate or run without end. The
# PLD of one step grows like 1/sigma^2 (sigma 0.1 already takes ~25 s and gives epsilon ~600),
# and self-composition grows with the step count (1e7 steps: ~6 s).
MAX_STEPS = 10**7
MIN_SIGMA = 0.1
# Sane ranges for the other numbers, far beyond any real run, so that a tampered figure (a
# round of 10**400, a sigma of 1e300 that overflows the accountant) is named, not passed on.
MAX_ROUND = 10**6
MAX_EXAMPLES = 10**9          # per hospital; with a batch of at least 1, q >= 1 / MAX_EXAMPLES
MIN_SAMPLING_RATE = 1 / MAX_EXAMPLES
MAX_SIGMA = 1e6               # epsilon is already ~0 far below this
MAX_EPSILON = 1e6             # a finite epsilon or budget beyond this protects no one (inf: no noise)
MIN_DELTA = 1e-30
CONFIG_NAME, METRICS_NAME, STATUS_NAME, PLAN_NAME = "config.yaml", "metrics.jsonl", "status.json", "plan.json"
CHECKPOINT_STATE = Path("checkpoint") / "state.json"
SHARD_ID = re.compile(r"[0-9a-f]{32}")


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
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LedgerError(f"{file} line {number}: not valid JSON ({err.msg}); "
                              "each line must be one complete JSON object (repair or remove a truncated line)") from None
        except (ValueError, RecursionError):  # a number with thousands of digits, nesting thousands deep
            raise LedgerError(f"{file} line {number}: a value is too large or too deeply nested to read; "
                              "this is not a ledger record the training code writes") from None
        if not isinstance(record, dict):
            raise LedgerError(f"{file} line {number}: expected a JSON object, got {type(record).__name__}")
        # Only what makes a line no ledger record at all. A first record without prior_events, or
        # a record without a hospital, is a tampered ledger: audit_ledger reports it (exit 1).
        problem = _structure(record)
        if problem:
            raise LedgerError(f"{file} line {number}: {problem}")
        records.append(record)
    if not records:
        raise LedgerError(f"{file}: the ledger has no records; point at the ledger of a run that trained at least one round")
    return records


def _hospital_key(hospital) -> str:
    # JSON values can be unhashable (lists); the canonical dump keys any of them.
    return hospital if isinstance(hospital, str) else json.dumps(hospital, sort_keys=True)


def _missing(record: dict, first: bool) -> str | None:
    """Why a record cannot be recomputed as its hospital's (first) record, or None."""
    problem = _structure(record)
    if problem:
        return problem
    hospital = record["hospital"]
    if not (isinstance(hospital, str) and hospital):
        # Checked before prior_events: a record whose name was blanked would otherwise be
        # reported as some hospital's first record lacking its earlier spend.
        return f"hospital {_short(hospital)} must be a non-empty string: no hospital's spend can be counted here"
    if first and "prior_events" not in record:
        # The training code writes prior_events on every hospital's first record.
        return (f"{hospital}'s first record (round {_short(record['round'])}) has no prior_events: "
                "records were removed or reordered (or an earlier record's hospital was changed)")
    return None


def _structure(record: dict) -> str | None:
    """Why a record lacks the structure every ledger line has (fields, prior_events' shape), or None."""
    absent = [name for name in RECORD_FIELDS if name not in record]
    if absent:
        return f"missing field(s) {', '.join(absent)}; every record needs {', '.join(RECORD_FIELDS)}"
    for name in EVENT_LISTS:
        events = record.get(name, [])
        if not isinstance(events, list):
            return f"{name} must be a list of {{noise_multiplier, sampling_rate, steps, sampling}}"
        for index, event in enumerate(events):
            if not isinstance(event, dict) or any(key not in event for key in EVENT_FIELDS):
                return f"{name}[{index}] needs the fields {', '.join(EVENT_FIELDS)}"
    return None


def unit_of(record: dict):
    """The record's unit of privacy: "image" when the field is absent (ledgers before units)."""
    return record.get("unit", "image")


# --------------------------------------------------------------------------- field checks

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # An int beyond float range (JSON allows 400 digits) is no figure a ledger holds.
    return abs(value) < 1e300 if isinstance(value, int) else not math.isnan(value)


def _mechanism_problems(event: dict) -> list[str]:
    """Type and range problems of the fields accounting depends on."""
    problems = []
    sigma, q, steps = event.get("noise_multiplier"), event.get("sampling_rate"), event.get("steps")
    if not (_is_number(sigma) and math.isfinite(sigma) and sigma >= 0):
        problems.append(f"noise_multiplier {_short(sigma)} must be a finite number >= 0")
    elif sigma > MAX_SIGMA:
        problems.append(f"noise_multiplier {sigma!r} is above {MAX_SIGMA:g}: no run uses such noise")
    if not (_is_number(q) and 0 < q <= 1):
        problems.append(f"sampling_rate {_short(q)} must be a number in (0, 1]")
    elif q < MIN_SAMPLING_RATE:
        problems.append(f"sampling_rate {q!r} is below {MIN_SAMPLING_RATE:g} (one example in {MAX_EXAMPLES:.0e})")
    if not (_is_int(steps) and steps >= 0):
        problems.append(f"steps {_short(steps)} must be an integer >= 0")
    elif steps > MAX_STEPS:
        problems.append(f"steps {_short(steps)} is beyond what can be recomputed (at most {MAX_STEPS:.0e} "
                        "per record); no real round runs that many, so the record is suspect")
    if _is_number(sigma) and 0 < sigma < MIN_SIGMA:
        problems.append(f"noise_multiplier {sigma!r} is below {MIN_SIGMA}: its epsilon is in the hundreds per "
                        "step and cannot be recomputed in bounded time; count this hospital as unprotected")
    if event.get("sampling") != SAMPLING:
        problems.append(f"unsupported sampling {event.get('sampling')!r}: only {SAMPLING!r} is accounted")
    return problems


def _record_problems(record: dict) -> list[str]:
    """Type and range problems of a record's other fields."""
    problems = []
    if not (_is_int(record["round"]) and 1 <= record["round"] <= MAX_ROUND):
        problems.append(f"round {_short(record['round'])} must be an integer from 1 to {MAX_ROUND:.0e}")
    if not (isinstance(record["hospital"], str) and record["hospital"]):
        problems.append(f"hospital {_short(record['hospital'])} must be a non-empty string")
    if record["status"] not in STATUSES:
        problems.append(f"status {_short(record['status'])} must be one of {', '.join(STATUSES)}")
    epsilon = record["epsilon"]
    if not (_is_number(epsilon) and 0 <= epsilon and (epsilon <= MAX_EPSILON or math.isinf(epsilon))):
        problems.append(f"epsilon {_short(epsilon)} must be a number from 0 to {MAX_EPSILON:.0e} (or inf: no noise)")
    delta = record["delta"]
    if not (_is_number(delta) and 0 < delta < 1):
        problems.append(f"delta {_short(delta)} must be a number in (0, 1)")
    elif delta < MIN_DELTA:
        problems.append(f"delta {delta!r} is below {MIN_DELTA:g}: no setting a run uses")
    if not (_is_number(record["max_epsilon"]) and 0 < record["max_epsilon"] <= MAX_EPSILON):
        problems.append(f"max_epsilon {_short(record['max_epsilon'])} must be a number in (0, {MAX_EPSILON:.0e}]")
    if record["accountant"] != "pld":
        problems.append(f"accountant {_short(record['accountant'])}: the canonical figure is 'pld'")
    if not (_is_int(record["num_examples"]) and 0 <= record["num_examples"] <= MAX_EXAMPLES):
        problems.append(f"num_examples {_short(record['num_examples'])} must be an integer from 0 to {MAX_EXAMPLES:.0e}")
    if unit_of(record) not in UNITS:
        problems.append(f"unit {_short(unit_of(record))} must be one of {', '.join(UNITS)}")
    return problems


def _short(value) -> str:
    """repr, cut short: a hostile ledger's 400-digit number must not flood the report."""
    text = repr(value)
    return text if len(text) <= 40 else text[:20] + f"...({len(text)} characters)"


def short_name(name: str) -> str:
    """A hospital name as shown: whole when it is of a sane length, cut short otherwise."""
    return name if len(name) <= 60 else name[:40] + f"...({len(name)} characters)"


def _valid_delta(delta) -> bool:
    return _is_number(delta) and MIN_DELTA <= delta < 1


# --------------------------------------------------------------------------- the run's other files

@dataclass
class RunContext:
    """What else the audit compares the ledger with (each None when absent)."""

    config: dict | None = None      # config.yaml of the run directory
    metrics: list[dict] | None = None  # metrics.jsonl: one record per round
    status: dict | None = None      # status.json: how the run ended
    odometers: dict[str, list[dict]] = field(default_factory=dict)  # --odometer FILE -> its records
    plans: dict | None = None       # plan.json: each hospital's privacy plan (its budget) before round 1
    missing: list[str] = field(default_factory=list)  # which of the run's files were not there to compare
    run_id: int | None = None       # the run id every charge of this run carries (checkpoint/state.json)


def _json_lines(path: Path) -> list[dict]:
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(f"{path}: cannot read ({err.__class__.__name__}); check the file") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise LedgerError(f"{path} line {number}: not a readable JSON object; repair or restore the file") from None
        if not isinstance(record, dict):
            raise LedgerError(f"{path} line {number}: expected a JSON object")
        records.append(record)
    return records


def read_context(ledger: str | os.PathLike, odometers: list[str] = ()) -> RunContext:
    """config.yaml, metrics.jsonl and status.json beside the ledger, and the given odometer files."""
    directory = Path(ledger) if Path(ledger).is_dir() else Path(ledger).parent
    context = RunContext()
    config = directory / CONFIG_NAME
    if config.is_file():
        import yaml  # only when there is a config to read

        try:
            context.config = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
            raise LedgerError(f"{config}: not readable YAML; restore the run's config.yaml or move it away") from None
        if not isinstance(context.config, dict):
            raise LedgerError(f"{config}: expected a mapping of settings")
    if (directory / METRICS_NAME).is_file():
        context.metrics = _json_lines(directory / METRICS_NAME)
    if (directory / STATUS_NAME).is_file():
        try:
            context.status = json.loads((directory / STATUS_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            raise LedgerError(f"{directory / STATUS_NAME}: not readable JSON") from None
        if not isinstance(context.status, dict):
            raise LedgerError(f"{directory / STATUS_NAME}: expected a JSON object")
    plan = directory / PLAN_NAME
    if plan.is_file():
        try:
            context.plans = json.loads(plan.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            raise LedgerError(f"{plan}: not readable JSON") from None
        if not isinstance(context.plans, dict):
            raise LedgerError(f"{plan}: expected a JSON object")
    context.missing = [name for name in (CONFIG_NAME, METRICS_NAME, STATUS_NAME) if not (directory / name).is_file()]
    context.run_id = read_run_id(directory)
    for name in odometers:
        path = Path(name)
        if not path.is_file():
            raise LedgerError(f"--odometer {name}: no such file; pass a hospital's odometer JSON Lines file")
        context.odometers[str(path)] = _json_lines(path)
    return context


def read_run_id(directory: Path) -> int | None:
    """The run id the hospitals charged this run under, or None when the run directory does not say.

    The coordinator sends its first Flower run id with every round ("coordinator-run"), each
    charge carries it as "run", and the checkpoint keeps the run's Flower run ids, the first
    one first (server/checkpoint.py's state.json: "flower_runs"). Read from the file format,
    not imported: the audit trusts no training code. An unreadable checkpoint is no error here:
    the odometer check then says the run id was inferred."""
    try:
        state = json.loads((directory / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        runs = state["flower_runs"]
        first = runs[0]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, IndexError, TypeError):
        return None
    return first if _is_int(first) else None


class ShardFiles:
    """The simulation's shard files beside an odometer (`shards/<id>.json`: source, form, hashes).

    Restated from client/shards.py's file format and rule, not imported: two simulated shards
    share accounting when they share an example's hash; shards stored in another form count as
    sharing when they come from the same source (the same resolved path, or the same content
    identity); a missing or unreadable shard file counts as
    sharing with everything (the conservative side)."""

    def __init__(self, odometer: Path):
        self.directory = Path(odometer).parent / "shards"
        self._loaded: dict[str, dict | None] = {}

    def _load(self, shard_id: str) -> dict | None:
        if shard_id not in self._loaded:
            info = None
            if SHARD_ID.fullmatch(shard_id):  # never a path elsewhere
                try:
                    raw = json.loads((self.directory / f"{shard_id}.json").read_text(encoding="utf-8"))
                    info = {"source": str(raw["source"]), "content": str(raw.get("content", "")),
                            "form": str(raw["form"]), "hashes": frozenset(map(str, raw["hashes"]))}
                except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
                    info = None
            self._loaded[shard_id] = info
        return self._loaded[shard_id]

    def counts_for(self, own: str | None, line: dict) -> bool:
        """Whether the charge `line` counts for the data of shard `own` (None: an odometer of one hospital)."""
        other = line.get("shard")
        if own is None or not isinstance(other, str) or other == own:
            return True
        mine, theirs = self._load(own), self._load(other)
        if mine is None or theirs is None:
            return True
        if mine["form"] != theirs["form"]:  # the same source by its resolved path or by its content
            return mine["source"] == theirs["source"] or bool(mine["content"]) and mine["content"] == theirs["content"]
        return not mine["hashes"].isdisjoint(theirs["hashes"])


def odometer_chain_problems(lines: list[dict]) -> list[str]:
    """Breaks in an odometer's hash chain (sequence numbers and each line's SHA-256 of the one before).

    Re-derived here from the file format (client/odometer.py), not imported: the audit trusts
    no training code. The hash is over the exact line, so this works on re-serialised records
    only when they keep json.dumps' default spacing, as the odometer writes them."""
    problems, previous, seq = [], "", 0
    for number, record in enumerate(lines, start=1):
        if "seq" in record:
            if record.get("seq") != seq + 1 or record.get("prev") != previous:
                problems.append(f"record {number} breaks the hash chain (a line was removed, inserted or edited)")
                return problems
            seq = record["seq"]
        elif seq:
            problems.append(f"record {number} has no sequence number after the chain began")
            return problems
        previous = hashlib.sha256(json.dumps(record).encode()).hexdigest()
    return problems
