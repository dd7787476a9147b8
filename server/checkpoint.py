"""The coordinator's checkpoint: everything needed to continue a run after its last complete round.

`<run-dir>/checkpoint/` holds `weights-<round>.npz` (the global model after that round) and
`state.json` (round, the weights file's name, the strategy's state, the metrics so far, the
Flower run ids that wrote to this run directory). Each file is written to a temporary name,
fsynced and renamed; state.json is replaced last and names its weights file, so a crash at
any moment leaves the previous checkpoint whole. Older weights files are removed afterwards.

Resuming (`resume-dir`): the ledger is never rewritten. Records written after the
checkpoint (a round cut short) stay, and the resumed run continues after the highest round
either holds, so no (round, hospital) appears twice. Charges a simulated hospital made in
this run directory's Flower runs that the ledger does not hold (its reply was lost when the
run stopped) are read from its odometer file and ledgered as status "lost": they stand.
In deployment the coordinator cannot read odometers; there the hospital's next reply shows
the spend and server/strategy.py ledgers the lost rounds it explains. For that, the
coordinator writes `started.json` (the round number) before it sends a round's messages: a
deployed run cut short in that round (the SuperLink or the coordinator killed) resumes after
it, with the round marked as possibly charged for every hospital, so a charge made then is
ledgered as lost when the hospital next replies, and the round is not asked for twice.
"""
from __future__ import annotations

import io
import json
import math
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.odometer import SIMULATION_ODOMETER
from common.config import HOSPITAL_NAME
from common.durable import replace_file
from common.errors import UserError
from common.privacy import PrivacyEvent, epsilon
from server.ledger import PrivacyLedger

FORMAT = 1


@dataclass
class Checkpoint:
    round: int
    weights: list[np.ndarray]
    strategy: dict
    metrics: list[dict]
    flower_runs: list[int]


def save(directory: Path, checkpoint: Checkpoint) -> None:
    """Write the weights, then state.json naming them; drop older weights files."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"weights-{checkpoint.round:05d}.npz"
    buffer = io.BytesIO()
    np.savez(buffer, *checkpoint.weights)
    replace_file(directory / name, buffer.getvalue())
    state = {"format": FORMAT, "round": checkpoint.round, "weights": name, "strategy": checkpoint.strategy,
             "metrics": checkpoint.metrics, "flower_runs": checkpoint.flower_runs}
    replace_file(directory / "state.json", json.dumps(state).encode())
    for old in directory.glob("weights-*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)


def mark_started(directory: Path, round_number: int) -> None:
    """Before a round's messages leave: the round that may have charged the hospitals."""
    directory.mkdir(parents=True, exist_ok=True)
    replace_file(directory / "started.json", json.dumps({"round": round_number}).encode())


def started_round(directory: Path) -> int:
    """The last round whose messages were sent (0 if none, or unreadable)."""
    try:
        value = json.loads((directory / "started.json").read_text())["round"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def load(directory: Path) -> Checkpoint:
    """The checkpoint in `directory`. A damaged one (truncated, edited) is a UserError naming the
    file and what is wrong: resuming from it must not start Flower only to fail in the coordinator."""
    path = directory / "state.json"
    advice = "restore the run directory from a backup, or start a new run (the odometers keep what was spent)"
    try:
        state = json.loads(path.read_text())
    except OSError as error:
        raise UserError(f"cannot read the checkpoint {path}: {error.strerror or error}") from None
    except ValueError as error:  # truncated or not UTF-8 / JSON
        raise UserError(f"the checkpoint {path} is damaged (not whole JSON: {error}); {advice}") from None
    problem = _state_problem(state)
    if problem:
        raise UserError(f"the checkpoint {path} is damaged ({problem}); {advice}")
    weights_path = directory / state["weights"]
    try:
        with np.load(weights_path, allow_pickle=False) as archive:
            weights = [archive[f"arr_{index}"] for index in range(len(archive.files))]
    except FileNotFoundError:
        raise UserError(f"the checkpoint {path} names {weights_path.name}, which is missing; {advice}") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        # np.load of a cut-short .npz: BadZipFile; of an empty one: EOFError; of other bytes: ValueError
        raise UserError(f"the checkpoint's weights {weights_path} are damaged ({type(error).__name__}: {error}); "
                        f"{advice}") from None
    if not weights or not all(np.issubdtype(w.dtype, np.number) and np.isfinite(w).all() for w in weights):
        raise UserError(f"the checkpoint's weights {weights_path} are damaged (no arrays, or values that are not "
                        f"finite numbers); {advice}")
    return Checkpoint(state["round"], weights, state["strategy"], state["metrics"], state["flower_runs"])


def _state_problem(state) -> str | None:
    """What is wrong with state.json's content (None if it is what save() writes)."""
    def whole(value, least=0):
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    if not isinstance(state, dict):
        return "not a JSON object"
    missing = [key for key in ("format", "round", "weights", "strategy", "metrics", "flower_runs") if key not in state]
    if missing:
        return f"no {', '.join(missing)}"
    if state["format"] != FORMAT:
        return f"format {state['format']!r}, not {FORMAT}"
    if not whole(state["round"]):
        return f"round {state['round']!r} is not a whole number >= 0"
    if not (isinstance(state["weights"], str) and re.fullmatch(r"weights-\d+\.npz", state["weights"])):
        return f"weights {state['weights']!r} is not a weights-<round>.npz file name"  # never a path elsewhere
    if not isinstance(state["strategy"], dict):
        return "strategy is not a JSON object"
    if not (isinstance(state["metrics"], list)
            and all(isinstance(m, dict) and whole(m.get("round"), 1) for m in state["metrics"])):
        return "metrics is not a list of per-round records"
    if not (isinstance(state["flower_runs"], list) and all(whole(run) for run in state["flower_runs"])):
        return "flower_runs is not a list of Flower run ids"
    return None


def ledger_lost_charges(ledger: PrivacyLedger, odometer_dir: Path, flower_runs: list[int],
                        max_epsilon: float | None = None, batch_size: int | str = "auto") -> list[dict]:
    """Ledger, as "lost", every odometer charge of `flower_runs` that has no ledger record.

    Simulation only: the simulated hospitals share `<odometer_dir>/simulation.jsonl`, each
    charge naming its hospital. A hospital already in the ledger continues its records. One
    that never reached it (every reply rejected: the spend is real all the same) gets its
    records from the odometer alone when the run's `max_epsilon` is given: its prior events are
    the charges counted for its shard before its first of this run, its example count the one
    its sampling rate was computed from (`batch_size`: the run's train.batch_size).
    """
    written = []
    runs = set(flower_runs)
    path = Path(odometer_dir) / SIMULATION_ODOMETER
    charges = _readable_charges(path) if path.is_file() else []
    for hospital in sorted({r["hospital"] for r in ledger.records}):
        recorded = {r["round"] for r in ledger.records if r["hospital"] == hospital and r["steps"] > 0}
        for charge in charges:
            if charge.get("hospital") != hospital or charge.get("run") not in runs or charge.get("round") in recorded:
                continue
            last = [r for r in ledger.records if r["hospital"] == hospital][-1]
            if charge["round"] <= last["round"]:
                continue  # cannot be placed in order; the audit's odometer check will name it
            event = PrivacyEvent.from_dict(charge)
            record = dict(last) | event.to_dict() | {
                "round": int(charge["round"]), "status": "lost",
                "epsilon": epsilon(ledger.history(hospital) + [event], last["delta"]),
            }
            record.pop("prior_events", None)
            record.pop("added_prior_events", None)
            written.append(ledger.append(record, prior_events=[]))
            recorded.add(charge["round"])
    if max_epsilon is not None:
        written += _ledger_unseen_hospitals(ledger, Path(odometer_dir), charges, runs, max_epsilon, batch_size)
    return written


def _ledger_unseen_hospitals(ledger, odometer_dir, charges, runs, max_epsilon, batch_size) -> list[dict]:
    from client.shards import ShardRegistry  # the hospitals' own rule of which charges count for a shard

    registry, written = ShardRegistry(odometer_dir), []
    known = {r["hospital"] for r in ledger.records}
    for hospital in sorted({str(c.get("hospital")) for c in charges if c.get("run") in runs} - known):
        if not HOSPITAL_NAME.fullmatch(hospital):
            continue  # not a name a ledger may carry; the audit's odometer check names it
        own = [(i, c) for i, c in enumerate(charges) if c.get("run") in runs and c.get("hospital") == hospital]
        shard = own[0][1].get("shard")
        counts = registry.overlap_filter(shard) if isinstance(shard, str) else (lambda charge: True)
        mine = {i for i, _ in own}
        others = [(i, PrivacyEvent.from_dict(c)) for i, c in enumerate(charges) if i not in mine and counts(c)]
        n = _examples_for(float(own[0][1]["sampling_rate"]), batch_size, registry, shard)
        history, previous = [], -1
        for k, (index, charge) in enumerate(own):
            before = [e for i, e in others if previous < i < index]
            event = PrivacyEvent.from_dict(charge)
            history += before + [event]
            record = event.to_dict() | {"round": int(charge["round"]), "hospital": hospital, "status": "lost",
                                        "epsilon": epsilon(history, float(charge["delta"])),
                                        "delta": float(charge["delta"]), "max_epsilon": float(max_epsilon),
                                        "accountant": "pld", "num_examples": n, "unit": "image"}
            events = [e.to_dict() for e in before]
            written.append(ledger.append(record, prior_events=events if k == 0 else [],
                                         added_prior_events=events if k else ()))
            previous = index
    return written


def _examples_for(q: float, batch_size, registry, shard) -> int:
    """The example count n whose sampling rate is q (q = batch / n), nearest the shard's size."""
    from common.sampling import AUTO_BATCH_SIZES, sampling_rate_for

    size = (registry.distinct_examples(shard) if isinstance(shard, str) else None) or round(1 / q)
    low, high = AUTO_BATCH_SIZES
    batches = [batch_size] if batch_size != "auto" else [b for b in (2 ** k for k in range(11)) if low <= b <= high] + [size]
    candidates = [n for b in batches for n in {max(1, math.floor(int(b) / q)), max(1, math.ceil(int(b) / q))}
                  if sampling_rate_for(batch_size, n) == q]
    return min(candidates, key=lambda n: abs(n - size), default=size)


def _readable_charges(path: Path) -> list[dict]:
    """The odometer's well-formed charges; a damaged line is the hospital's to repair (it refuses to train)."""
    charges = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            charge = json.loads(line)
            PrivacyEvent.from_dict(charge)
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(charge.get("round"), int):
            charges.append(charge)
    return charges
