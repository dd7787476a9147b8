"""What produced a run: the project's and its libraries' versions, Flower's app bundle, when.

    provenance()       -> {"versions": {...}, "python": ..., "flower_run": {...}, "started_at", "written_at"}
    note_flower_run(grid)  # once, at the ServerApp's start: remembers Flower's run (the FAB hash)

status.json carries `provenance()` (server/server_app.py) and report.md prints it
(server/report_md.py). Flower 1.42 gives the app bundle's hash to the ServerApp through its
Grid: `grid.run` (public, `flwr.serverapp.Grid.run`) is a `flwr.supercore.run.Run` whose
`fab_hash` is the SHA-256 of the FAB that `flwr run` built and sent to the SuperLink (the same
bundle every SuperNode installs), with `fab_id` (publisher/name), `fab_version` and Flower's
run id. `Context` has no such field. Only the standard library is imported here: the
versions are read from the installed distributions' metadata, without importing them.
"""
from __future__ import annotations

import importlib.metadata
import platform
import time

# Distribution names, in the order a report lists them. tensorflow-privacy is a test-only
# dependency (pyproject's dev group): an installed copy without it says "not installed".
PACKAGES = ("hospital-fl", "flwr", "tensorflow", "tf-keras", "dp-accounting", "tensorflow-privacy")

_STARTED = time.time()  # this process's start, until note_flower_run marks the run's own
_FLOWER_RUN: dict = {}


def now_utc(seconds: float | None = None) -> str:
    """ISO 8601 in UTC to the second, e.g. 2026-12-02T16:29:02Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if seconds is None else seconds))


def versions() -> dict[str, str | None]:
    """{distribution: installed version, or None when it is not installed}."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def flower_run_facts(grid) -> dict:
    """Flower's own record of the run, from a ServerApp's Grid: {} when it has none (a test's stand-in)."""
    try:
        run = grid.run
    except Exception:  # noqa: BLE001 - a Grid not yet bound to a run, or not a Flower Grid at all
        return {}
    facts = {"run_id": getattr(run, "run_id", None), "fab_id": getattr(run, "fab_id", ""),
             "fab_version": getattr(run, "fab_version", ""), "fab_hash": getattr(run, "fab_hash", ""),
             "pending_at": getattr(run, "pending_at", ""),
             "running_at": getattr(run, "running_at", "") or getattr(run, "starting_at", "")}
    return {key: value for key, value in facts.items() if value not in (None, "")}


def note_flower_run(grid) -> None:
    """Remember the Flower run this process serves (its FAB hash) and when it started, for `provenance()`."""
    global _STARTED
    _STARTED = time.time()
    _FLOWER_RUN.clear()
    _FLOWER_RUN.update(flower_run_facts(grid))


def provenance(grid=None) -> dict:
    """What status.json's "provenance" holds: versions, Python, the Flower run and its FAB hash, times.

    `grid`: a ServerApp's Grid to read Flower's run from; without it, what `note_flower_run`
    remembered. `started_at` is when note_flower_run was called (else this process started);
    `written_at` is now, so the last status.json written says when the run ended."""
    flower = flower_run_facts(grid) if grid is not None else dict(_FLOWER_RUN)
    return {"versions": versions(), "python": platform.python_version(), "platform": platform.platform(terse=True),
            "flower_run": flower, "started_at": now_utc(_STARTED), "written_at": now_utc()}
