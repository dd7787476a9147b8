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
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.odometer import SIMULATION_ODOMETER
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


def ledger_lost_charges(ledger: PrivacyLedger, odometer_dir: Path, flower_runs: list[int]) -> list[dict]:
    """Ledger, as "lost", every odometer charge of `flower_runs` that has no ledger record.

    Simulation only: the simulated hospitals share `<odometer_dir>/simulation.jsonl`, each
    charge naming its hospital. Only hospitals already in the ledger are looked up (their
    name, delta and budget are known).
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
    return written


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
