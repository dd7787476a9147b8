"""A full disk wherever the run writes (issue 26 item 3): one line naming the file and "no space
left", status.json saying so (or the terminal when even it cannot be written), no traceback,
no temporary file left, and a resume that repeats the rounds the model lacks.

A real ENOSPC without root: writes to /dev/full fail with it (Linux), so a run directory's file
made a link to /dev/full is a file on a full disk. tests/test_disk_full_run.py fills a real
(tmpfs) file system under a whole simulation.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from server import server_app, simulation
from server.flower_launch import Simulation
from server.ledger import PrivacyLedger
from server.run_dir import RunDirectory

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
FULL = "no space left on the device"


def _on_full_disk(path: Path) -> Path:
    """`path` appended to lands on a full disk."""
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/full")
    return path


def _replacement_on_full_disk(path: Path) -> None:
    """The next replace_file(path) of this process lands on a full disk (its temporary file does)."""
    _on_full_disk(path.with_name(f".{path.name}.{os.getpid()}.tmp"))


def test_metrics_on_a_full_disk_name_the_file(tmp_path):
    run = RunDirectory(tmp_path)
    _on_full_disk(run.metrics)
    with pytest.raises(OSError) as caught:
        run.append_metrics({"round": 2, "accuracy": 0.5})
    assert server_app.is_disk_full(caught.value) and caught.value.filename == str(run.metrics)


def test_the_transcript_on_a_full_disk_is_one_line_not_a_traceback(tmp_path, capsys):
    config = SimpleNamespace(hospitals=2)
    launch = Simulation(config, {}, tmp_path, resume=False, verbose=False)
    try:
        launch.transcript = ["INFO : Starting", "Round 1/2 | accuracy 0.5"]
        _on_full_disk(tmp_path / "flower.log")
    finally:
        launch.cleanup()  # ends the processes, then saves the transcript
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot write {tmp_path / 'flower.log'}: {FULL}; Flower's log of this run is not saved"]


def _strategy():
    return SimpleNamespace(failed={}, rejected={})


def test_a_stop_on_a_full_disk_says_so_in_one_line_and_in_status_json(tmp_path, capsys):
    run = RunDirectory(tmp_path)
    error = OSError(28, os.strerror(28), str(run.metrics))
    server_app._stop_on_full_disk(run, error, 1, _strategy())
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"error: cannot write {run.metrics}: {FULL}; the run stopped"), out
    assert f"--resume {tmp_path}" in out[0]
    status = json.loads(run.status.read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1 and status["rounds_completed"] == 1
    assert f"cannot write {run.metrics}: {FULL}" in status["reason"]
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary left


def test_when_status_json_cannot_be_written_either_a_second_line_says_so(tmp_path, capsys):
    run = RunDirectory(tmp_path)
    run.status.write_text('{"state": "running"}')
    _replacement_on_full_disk(run.status)
    server_app._stop_on_full_disk(run, OSError(28, os.strerror(28), str(run.metrics)), 1, _strategy())
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[1] == f"error: {run.status} could not be written either (cannot write {run.status}: {FULL})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no temporary left
    assert json.loads(run.status.read_text()) == {"state": "running"}  # the old file stands


def test_status_json_keeps_room_to_say_the_disk_is_full(tmp_path, capsys):
    # Every copy of status.json is padded, so that on a full disk (no room for a new copy) the
    # reason can still be written over the old one in place.
    run = RunDirectory(tmp_path)
    run.write_status({"state": "running", "rounds_completed": 1, "exit_code": 1, "reason": "the run has not finished"})
    _replacement_on_full_disk(run.status)
    server_app._stop_on_full_disk(run, OSError(28, os.strerror(28), str(run.metrics)), 1, _strategy())
    assert len(capsys.readouterr().out.strip().splitlines()) == 1  # status.json said it: no second line
    status = json.loads(run.status.read_text())
    assert status["state"] == "failed" and FULL in status["reason"], status
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def _record(round_number: int, hospital: str) -> dict:
    return {"round": round_number, "hospital": hospital, "status": "trained", "noise_multiplier": 1.0,
            "sampling_rate": 0.1, "steps": 10, "sampling": "poisson", "epsilon": 0.5 * round_number, "delta": 1e-5,
            "max_epsilon": 3.0, "accountant": "pld", "num_examples": 300}


def test_rounds_ledgered_after_the_checkpoint_are_the_ones_a_resume_repeats(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    for round_number in (1, 2):
        for hospital in ("hospital-0", "hospital-1"):
            ledger.append(_record(round_number, hospital), prior_events=[])
    assert server_app.unsaved_rounds(2, ledger) == []
    assert server_app.unsaved_rounds(1, ledger) == [2]  # charged and ledgered, never in the model
    assert server_app.unsaved_rounds(0, ledger) == [1, 2]


class _FullDiskSimulation:
    """Stands in for Flower: the ServerApp stopped on a full disk and could not rewrite status.json."""

    stalled = False

    def __init__(self, config, resolved, out, resume, verbose):
        self.out, self.stop_requests = out, 0
        self.transcript = []

    def start_superlink(self):
        pass

    def wait_for_superlink(self):
        pass

    def stream(self, show):
        (self.out / "status.json").write_text(json.dumps({"state": "running", "exit_code": 1, "rounds_completed": 1}))
        line = f"error: cannot write {self.out / 'metrics.jsonl'}: {FULL}; the run stopped."
        self.transcript.append(line)
        show(line)

    def cleanup(self):
        pass

    def run_succeeded(self):
        return None

    def disk_filled(self):
        return Simulation.disk_filled(self)


def test_simulate_records_a_full_disk_not_a_killed_coordinator(tmp_path, monkeypatch, capsys):
    from common.config import load_config

    config = load_config(simulation.default_config_path(), [])
    monkeypatch.setattr(simulation, "prepare", lambda args: (config, {}, tmp_path))
    monkeypatch.setattr(simulation, "Simulation", _FullDiskSimulation)
    monkeypatch.setattr(simulation, "Progress", lambda rounds: type("P", (), {"show": print, "close": lambda s: None})())
    assert simulation.main([]) == 1
    captured = capsys.readouterr()
    assert "out of memory" not in captured.out + captured.err and "Traceback" not in captured.out + captured.err
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1 and FULL in status["reason"], status


def test_simulate_says_on_stderr_when_status_json_cannot_record_the_full_disk(tmp_path, monkeypatch, capsys):
    from common.config import load_config

    class StatusOnFullDisk(_FullDiskSimulation):
        def stream(self, show):
            super().stream(show)
            _replacement_on_full_disk(self.out / "status.json")

    config = load_config(simulation.default_config_path(), [])
    monkeypatch.setattr(simulation, "prepare", lambda args: (config, {}, tmp_path))
    monkeypatch.setattr(simulation, "Simulation", StatusOnFullDisk)
    monkeypatch.setattr(simulation, "Progress", lambda rounds: type("P", (), {"show": print, "close": lambda s: None})())
    assert simulation.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'status.json'} still says running") and FULL in err[0]
