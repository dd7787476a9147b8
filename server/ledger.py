"""The privacy ledger: JSON Lines, append-only, one object per hospital per round.

Fields of every record (the public contract; `python -m server.audit` reads only these):
  round, hospital, status ("trained" | "budget_exhausted" | "lost"), noise_multiplier,
  sampling_rate (Poisson rate per step), steps (DP-SGD steps this round), sampling
  ("poisson"), epsilon (cumulative after this round), delta, max_epsilon (the hospital's
  own budget), accountant ("pld"), num_examples (units of privacy), unit ("image" or
  "patient": what num_examples counts and each epsilon protects); and on each hospital's first record,
  prior_events: [{noise_multiplier, sampling_rate, steps, sampling}, ...] for spend on the
  same data before this ledger began. Optional on any record: added_prior_events, the same
  kind of list for charges that entered the hospital's odometer view during the run (a
  concurrent run on the same odometer, a simulated shard sharing images), first carried by
  that round's reply. A hospital's epsilon at a record composes its first record's
  prior_events, every added_prior_events up to that record, and its own records with
  steps > 0 up to it (`history`); common/privacy.py documents the canonical composition.

Status "lost" marks a charge the hospital made for a round whose reply never counted (it
failed, timed out or was rejected after the odometer was charged, or the coordinator stopped
before recording it): the hospital's later epsilon, or its odometer file in simulation,
shows the spend, so the ledger carries it with the round's mechanism and steps > 0 and it
composes like any trained round. Replies rejected before ledgering are listed, with their
reason, in rejected.jsonl beside the ledger, not here.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from common.durable import append_line
from common.privacy import PrivacyEvent

FIELDS = ("round", "hospital", "status", "noise_multiplier", "sampling_rate", "steps", "sampling",
          "epsilon", "delta", "max_epsilon", "accountant", "num_examples", "unit")


class PrivacyLedger:
    """Appends records durably; remembers which hospitals already have their prior_events."""

    fields = FIELDS
    kind = "ledger"
    defaults = {"unit": "image"}  # a record of an older ledger (resumed): images were the unit

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, record: dict, prior_events: list[dict], added_prior_events: list[dict] = ()) -> dict:
        """Write one record (adding prior_events on the hospital's first) and fsync it."""
        record = self.defaults | record
        missing = [name for name in self.fields if name not in record]
        if missing:
            raise ValueError(f"{self.kind} record lacks {missing}")
        record = {name: record[name] for name in self.fields}
        if not any(r["hospital"] == record["hospital"] for r in self.records):
            record["prior_events"] = prior_events
        if added_prior_events:
            record["added_prior_events"] = list(added_prior_events)
        append_line(self.path, json.dumps(record))
        self.records.append(record)
        return record

    def first(self, hospital: str) -> dict | None:
        """The hospital's first record (the one carrying prior_events), or None."""
        return next((r for r in self.records if r["hospital"] == hospital), None)

    def latest(self) -> dict[str, dict]:
        """Each hospital's most recent record."""
        return {record["hospital"]: record for record in self.records}

    def known_prior(self, hospital: str) -> list[PrivacyEvent]:
        """The spend not of this hospital's own rounds that the ledger holds: prior and added events."""
        events = []
        for record in self.records:
            if record["hospital"] == hospital:
                events += [PrivacyEvent.from_dict(e) for e in record.get("prior_events", [])]
                events += [PrivacyEvent.from_dict(e) for e in record.get("added_prior_events", [])]
        return events

    def history(self, hospital: str) -> list[PrivacyEvent]:
        """Every event the hospital's latest epsilon composes: known prior spend and its own rounds."""
        own = [PrivacyEvent.from_dict(r) for r in self.records if r["hospital"] == hospital and r["steps"] > 0]
        return self.known_prior(hospital) + own


def added_events(reported: list[PrivacyEvent], known: list[PrivacyEvent]) -> list[PrivacyEvent] | None:
    """The reported prior events beyond the known ones (as multisets); None when some known one is missing.

    An odometer only grows: a reply whose prior events lack one the ledger already holds did not
    come from the hospital's odometer."""
    extra = Counter(reported)
    extra.subtract(Counter(known))
    if any(count < 0 for count in extra.values()):
        return None
    added = []
    for event in reported:  # in the reply's order, each extra occurrence once
        if extra[event] > 0:
            extra[event] -= 1
            added.append(event)
    return added


EVALUATION_LEDGER = "evaluation_ledger.jsonl"
EVALUATION_FIELDS = ("round", "hospital", "status", "mechanism", "noise_multiplier", "queries", "sensitivity",
                     "epsilon", "delta", "max_epsilon", "accountant", "num_examples", "unit")


class EvaluationLedger(PrivacyLedger):
    """The evaluation half of the privacy ledger: `evaluation_ledger.jsonl` beside `privacy_ledger.jsonl`.

    One object per hospital per evaluation it answered (common/eval_privacy.py has the
    mechanism): round, hospital, status ("evaluated" | "declined"), mechanism
    ("gaussian-counts"), noise_multiplier (sigma: noise std on each count, sensitivity 1 per
    unit), queries (1 when evaluated, 0 when declined), sensitivity, epsilon (the hospital's
    cumulative evaluation epsilon), delta, max_epsilon (its own evaluation budget), accountant
    ("pld"), num_examples (held-out units), unit; prior_events on each hospital's first record and
    optional added_prior_events, as in the training ledger but of evaluation charges. One
    evaluation is the event {noise_multiplier: sigma, sampling_rate: 1.0, steps: queries,
    sampling: "poisson"} (the Gaussian mechanism: sampling at rate 1 is none), so a record's
    epsilon composes its hospital's prior and added events and its evaluated records up to
    it, exactly as training records do. Kept in its own file so that every reader of the
    training ledger reads what it always did.
    """

    fields = EVALUATION_FIELDS
    kind = "evaluation ledger"
    defaults = {}

    def history(self, hospital: str) -> list[PrivacyEvent]:
        """Every evaluation event the hospital's latest evaluation epsilon composes."""
        own = [evaluation_event(r) for r in self.records if r["hospital"] == hospital and r["queries"] > 0]
        return self.known_prior(hospital) + own


def evaluation_event(record: dict) -> PrivacyEvent:
    """The accounting event of one evaluation ledger record (or odometer charge)."""
    return PrivacyEvent(float(record["noise_multiplier"]), 1.0, int(record["queries"]))
