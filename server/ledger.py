"""The privacy ledger: JSON Lines, append-only, one object per hospital per round.

Fields of every record (the public contract; `python -m server.audit` reads only these):
  round, hospital, status ("trained" | "budget_exhausted" | "lost"), noise_multiplier,
  sampling_rate (Poisson rate per step), steps (DP-SGD steps this round), sampling
  ("poisson"), epsilon (cumulative after this round), delta, max_epsilon (the hospital's
  own budget), accountant ("pld"), num_examples; and on each hospital's first record,
  prior_events: [{noise_multiplier, sampling_rate, steps, sampling}, ...] for spend on the
  same data before this ledger began. common/privacy.py documents the canonical composition.

Status "lost" marks a charge the hospital made for a round whose reply never counted (it
failed, timed out or was rejected after the odometer was charged, or the coordinator stopped
before recording it): the hospital's later epsilon, or its odometer file in simulation,
shows the spend, so the ledger carries it with the round's mechanism and steps > 0 and it
composes like any trained round. Replies rejected before ledgering are listed, with their
reason, in rejected.jsonl beside the ledger, not here.
"""
from __future__ import annotations

import json
from pathlib import Path

from common.durable import append_line

FIELDS = ("round", "hospital", "status", "noise_multiplier", "sampling_rate", "steps", "sampling",
          "epsilon", "delta", "max_epsilon", "accountant", "num_examples")


class PrivacyLedger:
    """Appends records durably; remembers which hospitals already have their prior_events."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, record: dict, prior_events: list[dict]) -> dict:
        """Write one record (adding prior_events on the hospital's first) and fsync it."""
        missing = [name for name in FIELDS if name not in record]
        if missing:
            raise ValueError(f"ledger record lacks {missing}")
        record = {name: record[name] for name in FIELDS}
        if not any(r["hospital"] == record["hospital"] for r in self.records):
            record["prior_events"] = prior_events
        append_line(self.path, json.dumps(record))
        self.records.append(record)
        return record

    def first(self, hospital: str) -> dict | None:
        """The hospital's first record (the one carrying prior_events), or None."""
        return next((r for r in self.records if r["hospital"] == hospital), None)

    def latest(self) -> dict[str, dict]:
        """Each hospital's most recent record."""
        return {record["hospital"]: record for record in self.records}
