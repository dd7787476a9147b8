"""A Flower run starts once, and soon after it was submitted: otherwise the ServerApp refuses it.

Flower's SuperLink keeps a submitted run until it has run. Ctrl-C on `flwr run --stream` stops
only the log stream; a run whose process Flower could not start is retried; and the local
SuperLink that `flwr run` manages keeps its state in a database, so when it restarts it starts
again a run that was cut short. Any of these would start a run by itself, maybe hours later,
and spend every hospital's budget with nobody watching. So before it writes anything the
ServerApp refuses a run that
  - already started once on this machine (a marker per Flower run id in the user's data
    folder): continue its run directory with `resume-dir` instead, which is a new run;
  - waited more than STALE_RUN_SECONDS between its submission and its start.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

STALE_RUN_SECONDS = 1800  # long enough for a busy machine whose Ray takes minutes to start (measured: 8)


def refusal(flower_run: dict, markers: Path | None = None, now: datetime | None = None) -> str | None:
    """Why this run must not go on (None: it may). `flower_run`: server.provenance.flower_run_facts."""
    waited = _waited(flower_run.get("pending_at", ""), now or datetime.now(timezone.utc))
    if waited is not None and waited > STALE_RUN_SECONDS:
        return (f"this run was submitted {waited / 60:.0f} minutes ago and only now started: a run that waited more "
                f"than {STALE_RUN_SECONDS // 60} minutes is refused, so that one its user gave up on never spends "
                "a budget by itself; submit it again (flwr run), or continue a run directory with resume-dir")
    run_id = flower_run.get("run_id")
    if not isinstance(run_id, int):
        return None  # Flower did not say which run this is: nothing to remember it by
    marker = (markers or _markers()) / str(run_id)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "x", encoding="utf-8") as handle:  # exclusive: only the first start creates it
            handle.write((now or datetime.now(timezone.utc)).isoformat() + "\n")
    except FileExistsError:
        return (f"Flower started run {run_id} a second time (its SuperLink restarted with the run unfinished): a run "
                "starts once, so nothing is spent again unattended; continue its run directory with resume-dir")
    except OSError:
        return None  # the marker is a safeguard; a read-only home must not stop honest runs
    return None


def _waited(pending_at: str, now: datetime) -> float | None:
    try:
        submitted = datetime.fromisoformat(str(pending_at))
    except ValueError:
        return None  # Flower did not say when
    if submitted.tzinfo is None:
        submitted = submitted.replace(tzinfo=timezone.utc)
    return (now - submitted).total_seconds()


def _markers() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("hospital-fl", appauthor=False)) / "flower-runs-started"
