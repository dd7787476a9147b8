"""The hospital's privacy odometer: a durable record of every DP-SGD run on its data.

It lives next to the data (one JSON Lines file per hospital), is written before any update
leaves the node, and is never reset by a new run or a restart: epsilon composes over all
of it. The budget (max_epsilon, delta) is the hospital's own setting, never the server's.

Guarantees, and their limits:
- Read, budget check and charge happen under one exclusive lock (`fcntl.flock` on the
  sidecar `<file>.lock`), so two runs, two SuperNodes or two simulations sharing the file
  cannot both spend the same remaining budget. flock works across processes and on file
  systems that support it (local disks, NFSv4); not on every network share.
- Every charge carries a sequence number and the SHA-256 of the line before it (a hash
  chain), and the sidecar `<file>.head` holds the number and hash of the last line. An
  edited line, a truncated tail, an emptied file or a deleted file whose `.head` remains
  is detected and training is refused (fail closed). Within one process, the odometer
  also remembers how many charges it has seen, so a file deleted mid-run is refused too.
  What cannot be detected: the file deleted together with its `.head` before a new
  process starts. The README says how operators guard against that (backups, read-only
  snapshots, the audit's `--odometer` check against past ledgers).
- Every charge records the fingerprint of the data it was spent on (`data_fingerprint`,
  see `fingerprint`), so the record says which examples it accounts for.
- A view (`shard_filter`) restricts the charges that count to those on data that shares
  examples with this hospital's: a simulation keeps one file for every simulated hospital
  and charges each shard for every earlier charge on a shard that shared an image with it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.durable import append_line, replace_file
from common.errors import UserError
from common.privacy import PrivacyEvent, epsilon

SIMULATION_ODOMETER = "simulation.jsonl"  # one file for every simulated hospital, charges tagged by shard

# Highest sequence number seen per odometer file in this process: a file that later holds
# fewer charges was deleted or truncated under us (an odometer restarting at zero mid-run).
_SEEN: dict[str, int] = {}


class OdometerError(UserError):
    """The odometer cannot be read, trusted or written: training is refused."""

    category = "odometer"


class BudgetError(UserError):
    """The hospital's budget settings (max-epsilon, delta) are invalid: training is refused."""

    category = "budget"


def example_hashes(x: np.ndarray, y: np.ndarray) -> list[str]:
    """One SHA-256 (128 bits, hex) per example over its bytes, shape, dtype and label."""
    x = np.ascontiguousarray(x)
    y = np.asarray(y)
    form = f"{x.dtype.str}{x.shape[1:]}|{y.dtype.str}".encode()
    return [hashlib.sha256(form + x[i].tobytes() + y[i].tobytes()).hexdigest()[:32] for i in range(len(x))]


def fingerprint(hashes: list[str]) -> str:
    """The data set's fingerprint: independent of example order (the hashes are sorted)."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


@dataclass
class Reservation:
    """What `reserve` decided, read under the lock."""

    charged: bool  # False: the round would pass the budget and nothing was written
    epsilon_after: float  # epsilon with this round's event (whether charged or not)
    spent: float  # epsilon after the decision (== epsilon_after when charged)
    prior: list[PrivacyEvent]  # counted charges that are not this hospital's own in this run (prior_events)


class PrivacyOdometer:
    """Events charged so far on one hospital's data, with its budget."""

    def __init__(self, path: str | Path, hospital: str, max_epsilon: float, delta: float,
                 data_fingerprint: str = "", shard_filter: Callable[[dict], bool] | None = None,
                 extra: dict | None = None):
        for name, value, ok in (("max-epsilon", max_epsilon, lambda v: v > 0),
                                ("delta", delta, lambda v: 0 < v < 1)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and ok(value)):
                raise BudgetError(f"{hospital}: {name} must be a finite number "
                                    f"{'> 0' if name == 'max-epsilon' else 'in (0, 1)'}, got {value!r}")
        self.path = Path(path).absolute()
        self.hospital = hospital
        self.max_epsilon = float(max_epsilon)
        self.delta = float(delta)
        self.data_fingerprint = data_fingerprint
        self.shard_filter = shard_filter  # which records count for this data (None: all)
        self.extra = dict(extra or {})  # fields written with every charge (e.g. the shard id)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.head_path = self.path.with_name(self.path.name + ".head")
        self._all: list[dict] = []
        self._tail = (0, "")  # (sequence number, SHA-256) of the last line
        self.records = self._reload()

    # ------------------------------------------------------------------ reading

    def _reload(self) -> list[dict]:
        self._all = self._read()
        key = str(self.path)
        if len(self._all) < _SEEN.get(key, 0):
            raise OdometerError(
                f"privacy odometer {self.path} now holds {len(self._all)} charges but this process saw "
                f"{_SEEN[key]}: it was deleted or truncated while in use; restore it from backup")
        _SEEN[key] = max(_SEEN.get(key, 0), len(self._all))
        self.records = [r for r in self._all if self.shard_filter is None or self.shard_filter(r)]
        return self.records

    def _read(self) -> list[dict]:
        head = self._read_head()
        if not self.path.exists():
            if head is not None and head["seq"] > 0:
                raise OdometerError(f"privacy odometer {self.path} is missing but {self.head_path.name} records "
                                    f"{head['seq']} charges: restore it from backup; training is refused")
            self._tail = (0, "")
            return []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            raise OdometerError(f"privacy odometer {self.path} cannot be read: check its permissions "
                                "or restore it from backup; training is refused") from None
        records, previous, seq = [], "", 0
        self._tail = (0, "")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            bad = OdometerError(f"privacy odometer {self.path} line {number} is unreadable or was edited: "
                                "restore it from backup; training is refused until it is valid")
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
                PrivacyEvent.from_dict(record)
                # json reads NaN and Infinity: such a charge would crash or fool the accountant.
                numbers = [v for v in record.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if not all(np.isfinite(float(v)) for v in numbers):
                    raise ValueError
            except (ValueError, KeyError, TypeError, RecursionError, OverflowError):  # Overflow: int(inf), float(10**400)
                raise bad from None
            if "seq" in record:  # chained record
                if record["seq"] != seq + 1 or record.get("prev") != previous:
                    raise bad
                seq = record["seq"]
            elif seq:  # an unchained line after the chain began: inserted by hand
                raise bad
            previous = hashlib.sha256(line.encode()).hexdigest()
            records.append(record)
        self._tail = (seq, previous)  # the chain continues from the last line's number and hash
        if head is not None and (seq < head["seq"] or (seq == head["seq"] and seq and previous != head["last"])):
            raise OdometerError(f"privacy odometer {self.path} holds {seq} charges but {self.head_path.name} records "
                                f"{head['seq']}: it was truncated or edited; restore it from backup")
        return records

    def _read_head(self) -> dict | None:
        if not self.head_path.exists():
            return None
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
            if not (isinstance(head, dict) and isinstance(head.get("seq"), int) and isinstance(head.get("last"), str)):
                raise ValueError
            return head
        except (OSError, ValueError, UnicodeDecodeError):
            raise OdometerError(f"{self.head_path} is unreadable: restore it with the odometer from backup") from None

    # ------------------------------------------------------------------ accounting

    def events(self) -> list[PrivacyEvent]:
        """Every event counted for this data: what its epsilon composes."""
        return [PrivacyEvent.from_dict(r) for r in self.records]

    def prior_events(self, run: int) -> list[PrivacyEvent]:
        """Every counted event except this hospital's own charges of `run`.

        One accounting view: this is exactly what the plan starts from, what a reply carries
        as its prior events and what the coordinator and the audit compose with the run's own
        rounds. It holds earlier runs, and also charges that appear while the run goes on (a
        concurrent run on this odometer, or another simulated shard that shares images), so
        it may grow between rounds but never shrinks: the odometer is append-only.
        """
        return [PrivacyEvent.from_dict(r) for r in self.records if not self._own(r, run)]

    def own_records(self, run: int) -> list[dict]:
        """This hospital's own charges of `run`, in order."""
        return [r for r in self.records if self._own(r, run)]

    def _own(self, record: dict, run: int) -> bool:
        return record.get("run") == run and record.get("hospital") == self.hospital

    def spent(self) -> float:
        """Epsilon of everything charged so far."""
        return epsilon(self.events(), self.delta)

    def epsilon_after(self, event: PrivacyEvent) -> float:
        """Epsilon the hospital would have after also running `event`."""
        return epsilon(self.events() + [event], self.delta)

    @contextlib.contextmanager
    def locked(self):
        """Hold the exclusive lock and see the file as it is now (re-read under the lock)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.lock_path, "a")
        except OSError as error:
            raise self._unwritable(error) from None
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                self._reload()
                yield self
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _unwritable(self, error: OSError) -> OdometerError:
        # A full disk, a read-only or immutable file: the charge is not on disk, so nothing trains.
        return OdometerError(f"privacy odometer {self.path} cannot be written ({error.strerror or error}): "
                             "free space or fix its permissions; training is refused until a charge can be recorded")

    def reserve(self, event: PrivacyEvent, run: int, round_number: int) -> Reservation:
        """Under the lock: re-read, check the budget, and charge `event` if it fits."""
        with self.locked():
            prior = self.prior_events(run)
            after = self.epsilon_after(event)
            # `not (after <= max)`: a NaN figure is refused, never treated as within budget.
            if not after <= self.max_epsilon:
                return Reservation(False, after, self.spent(), prior)
            self._append(event, run, round_number, after)
            return Reservation(True, after, after, prior)

    def charge(self, event: PrivacyEvent, run: int, round_number: int, epsilon_after: float) -> None:
        """Append `event` under the lock, without a budget check (use `reserve` to train)."""
        with self.locked():
            self._append(event, run, round_number, epsilon_after)

    def _append(self, event: PrivacyEvent, run: int, round_number: int, epsilon_after: float) -> None:
        """Write one chained record and force it to disk before any update can leave the node."""
        seq, previous = self._tail[0] + 1, self._tail[1]
        record = event.to_dict() | self.extra | {
            "hospital": self.hospital,
            "run": run,
            "round": round_number,
            "epsilon_after": epsilon_after,
            "delta": self.delta,
            "data_fingerprint": self.data_fingerprint,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seq": seq,
            "prev": previous,
        }
        line = json.dumps(record)
        try:
            append_line(self.path, line)  # a failed append leaves no partial line (common/durable.py)
        except OSError as error:
            raise self._unwritable(error) from None
        self._all.append(record)
        self._tail = (seq, hashlib.sha256(line.encode()).hexdigest())
        _SEEN[str(self.path)] = len(self._all)
        if self.shard_filter is None or self.shard_filter(record):
            self.records.append(record)
        self._write_head(*self._tail)

    def _write_head(self, seq: int, last: str) -> None:
        # The charge itself is on disk: a head that cannot follow makes the next read refuse (the
        # file then holds more charges than the head, which reads as valid), never undercount.
        try:
            replace_file(self.head_path, json.dumps({"seq": seq, "last": last}).encode())
        except OSError as error:
            raise self._unwritable(error) from None
