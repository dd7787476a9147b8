"""The hospital's privacy odometer: a durable record of every DP-SGD run on its data.

It lives next to the data (one JSON Lines file per hospital), is written before any update
leaves the node, and is never reset by a new run or a restart: epsilon composes over all
of it. The budget (max_epsilon, delta) is the hospital's own setting, never the server's.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common.errors import UserError
from common.privacy import PrivacyEvent, epsilon


class PrivacyOdometer:
    """Events charged so far on one hospital's data, with its budget."""

    def __init__(self, path: str | Path, hospital: str, max_epsilon: float, delta: float):
        self.path = Path(path)
        self.hospital = hospital
        self.max_epsilon = max_epsilon
        self.delta = delta
        self.records = self._read()

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                PrivacyEvent.from_dict(record)
            except (ValueError, KeyError, TypeError):
                # Fail closed: an unreadable odometer could hide spend.
                raise UserError(
                    f"privacy odometer {self.path} line {number} is unreadable: restore it from backup; "
                    "training is refused until it is valid"
                ) from None
            records.append(record)
        return records

    def events(self, exclude_run: int | None = None) -> list[PrivacyEvent]:
        """Every event charged, optionally without those of one run."""
        return [PrivacyEvent.from_dict(r) for r in self.records if exclude_run is None or r.get("run") != exclude_run]

    def spent(self) -> float:
        """Epsilon of everything charged so far."""
        return epsilon(self.events(), self.delta)

    def epsilon_after(self, event: PrivacyEvent) -> float:
        """Epsilon the hospital would have after also running `event`."""
        return epsilon(self.events() + [event], self.delta)

    def charge(self, event: PrivacyEvent, run: int, round_number: int, epsilon_after: float) -> None:
        """Append `event` and force it to disk before any update can leave the node."""
        record = event.to_dict() | {
            "hospital": self.hospital,
            "run": run,
            "round": round_number,
            "epsilon_after": epsilon_after,
            "delta": self.delta,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)
