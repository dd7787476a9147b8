"""A deployed hospital's own split between training and evaluation examples.

The coordinator must not be able to move an example into the evaluation split (which it
scores, uncharged, with weights of its choosing) or out of it. So the split depends only on
the hospital's node config and its data, and is stored beside the odometer the first time:
`<odometer>.split.json` lists the hashes of the evaluation and training examples, and every
later run keeps each known example on its side, whatever its settings say.

An example's side is decided by its own content: evaluation when
SHA-256(seed, example hash) / 2^256 < fraction. Examples added later are placed by the same
rule with the stored seed and fraction, so adding data never moves an earlier example.

An example's hash is taken from its pixels as loaded, and how they are loaded (image size,
colour) comes from the run config. A coordinator that changed those would make every
example look new, to be placed afresh: some trained examples would land in evaluation. So
the file also records how the images were prepared, and a run that prepares them otherwise
is refused before anything is charged.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from common.durable import replace_file
from common.errors import UserError

log = logging.getLogger("hospital")
VERSION = 1
_WARNED: set[str] = set()  # split files already warned about in this process


def _is_eval(example_hash: str, seed: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\n{example_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


class PreparationChanged(UserError):
    """The run prepares the images otherwise than when the split was made: refused, uncharged."""

    category = "settings"


def hospital_split(hashes: list[str], path: str | Path, fraction: float, seed: str,
                   prepared: dict, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices) of the examples with `hashes`, stored in/reused from `path`.

    `prepared` says how the images were loaded (image size, colour); it must match the file's.
    `groups` (one id per example: identical images, one patient's images; common/duplicates.py)
    keeps a group on one side: a new example joins the side of a known member of its group,
    and a wholly new group is placed by the smallest example hash among its members."""
    path = Path(path)
    stored = _read(path)
    if stored is None:
        stored = {"version": VERSION, "eval_fraction": fraction, "split_seed": seed, "eval": [], "train": [],
                  "prepared": prepared}
    elif "prepared" not in stored:
        # A file from before "prepared" was recorded: adopt this run's preparation only if the
        # examples are the known ones (the same preparation); else they would all be placed anew.
        known = set(stored["eval"]) | set(stored["train"])
        if known and sum(h in known for h in hashes) < 0.5 * len(hashes):
            raise PreparationChanged(f"most examples are not in the hospital's split {path}: the images are "
                                     "prepared differently from when it was made (data.image_size or data.color)")
        stored["prepared"] = prepared
        _write(path, stored)
    elif stored["prepared"] != prepared:
        raise PreparationChanged(f"the hospital's split {path} was made from images prepared as "
                                 f"{stored['prepared']}; this run asks for {prepared}, under which every "
                                 "example would be placed anew (trained ones into evaluation)")
    elif (stored["eval_fraction"], stored["split_seed"]) != (fraction, seed) and str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning("%s keeps the split it was made with (eval-fraction %s): examples never move between "
                    "training and evaluation, and new examples are placed with the stored settings",
                    path, stored["eval_fraction"])
    evaluation, training = set(stored["eval"]), set(stored["train"])
    groups = list(hashes) if groups is None else [int(g) for g in groups]
    side: dict = {}  # group -> True (evaluation) / False (training), from members already placed
    key: dict = {}  # group -> the smallest hash among its members: what places a new group
    for h, g in zip(hashes, groups):
        if h in evaluation or h in training:
            side.setdefault(g, h in evaluation)
        key[g] = min(key.get(g, h), h)
    new = [(h, g) for h, g in dict.fromkeys(zip(hashes, groups)) if h not in evaluation and h not in training]
    for h, g in new:
        if g not in side:
            side[g] = _is_eval(key[g], stored["split_seed"], stored["eval_fraction"])
        (evaluation if side[g] else training).add(h)
    if new:
        stored["eval"], stored["train"] = sorted(evaluation), sorted(training)
        _write(path, stored)
    in_eval = np.array([h in evaluation for h in hashes], dtype=bool)
    return np.flatnonzero(~in_eval), np.flatnonzero(in_eval)


def _read(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(stored, dict) and stored.get("version") == VERSION
                and isinstance(stored.get("eval"), list) and isinstance(stored.get("train"), list)
                and isinstance(stored.get("split_seed"), str)
                and isinstance(stored.get("eval_fraction"), (int, float))
                and isinstance(stored.get("prepared", {}), dict)):
            raise ValueError
        return stored
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise UserError(f"the hospital's split file {path} is unreadable: restore it from backup "
                        "(a new split could move training examples into evaluation)") from None


def _write(path: Path, stored: dict) -> None:
    replace_file(path, json.dumps(stored).encode())
