"""Fault injection on the processes of a simulation: a hospital's Ray worker SIGKILLed while it
trains, and SIGTERM sent to simulate.py. Real Flower, Ray, TensorFlow and DP-SGD; each test
checks what a person sees (round lines, exit code, status.json, no traceback), that every
ledger epsilon recomputes and the audit passes, and that every odometer charge is ledgered.

What Flower 1.42 does with a dead worker: its Ray actor pool puts the dead actor back and
every later message sent to it fails at once (the actors are created without restarts, and
the simulation's federation config has no setting for it). So once a worker is killed, the
hospitals it would serve fail as `crash` until the run stops ("no hospital could train");
`simulate.py --resume RUN_DIR` then continues with a fresh pool.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from common.cpus import usable_cpus
from tests.test_faults import SMALL, _check_ledger, _finish, _kill_tree, _odometer_charges, _start, _status, \
    _wait_for_round

pytestmark = pytest.mark.slow  # every test here runs a real simulation

ROUNDS = 4
ROUND_LINE = " | accuracy"


def _round_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Round ") and ROUND_LINE in line]


def _charged(odometer: Path, round_number: int) -> list[str]:
    """Hospitals whose odometer holds a charge for `round_number` (written before they train)."""
    try:
        return sorted(h for h, charges in _odometer_charges(odometer).items()
                      if any(c["round"] == round_number for c in charges))
    except (OSError, ValueError):
        return []


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def _ray_workers(pid: int) -> list[psutil.Process]:
    """The simulation's ClientApp workers (Ray actors) below the simulate.py process."""
    return [proc for proc in psutil.Process(pid).children(recursive=True)
            if _command(proc).startswith("ray::ClientAppActor")]


def _poll(predicate, process, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_a_ray_worker_killed_mid_round_is_named_and_the_run_resumes_with_every_charge_ledgered(tmp_path):
    odometer, run = tmp_path / "odometer", tmp_path / "run"
    # One Ray worker (it reserves every CPU): both hospitals train on it, one after the other,
    # so the worker is certainly busy with a hospital's round when it is killed.
    # Twenty local epochs make a hospital's round last seconds, not a fraction of one: the kill
    # lands while the charged hospital still trains, not after it has replied.
    args = [*SMALL, "--set", "train.local_epochs=20", "--set", "hospitals=2", "--set", f"rounds={ROUNDS}",
            "--set", "train.fraction_evaluate=0",
            "--set", f"simulation.cpus_per_client={usable_cpus()}", "--set", f"privacy.odometer_dir={odometer}"]
    process = _start([*args, "--out", str(run)], tmp_path, "killed-worker")
    try:
        _wait_for_round(process, run, 1)
        # A round-2 charge is written before that hospital trains: its worker is busy now.
        victims = _poll(lambda: _charged(odometer, 2), process, 600, "a round-2 charge")
        workers = _poll(lambda: _ray_workers(process.pid), process, 60, "the Ray worker")
        assert len(workers) == 1, [_command(w) for w in workers]
        workers[0].kill()  # SIGKILL: the hospital's worker process is gone
        victims = _charged(odometer, 2)  # whoever was charged for round 2 by the time of the kill
    except BaseException:
        _kill_tree(process.pid)
        raise
    code, out, err = _finish(process, tmp_path, "killed-worker")

    # The run neither hangs nor crashes: the failures are named, by category only, and once no
    # hospital could train (Flower's pool keeps the dead worker) the run stops and says why.
    assert code == 1, out + err
    assert "Traceback" not in out + err and "A worker died" not in out + err  # Ray's details: flower.log
    lines = _round_lines(out)
    stopped = len(lines)
    assert stopped in (2, 3) and "failed" not in lines[0], out
    assert f"Stopping after round {stopped}: no hospital could train in round {stopped}" in out
    assert all(f"{h} failed (crash)" in lines[-1] for h in ("hospital-0", "hospital-1")), out
    assert "failed (out of memory)" not in out
    status = _status(run)
    assert status["state"] == "finished" and status["exit_code"] == 1 and status["rounds_completed"] == stopped
    assert status["failed_hospitals"] == ["hospital-0", "hospital-1"], status
    assert "hospital-0" in (run / "run.log").read_text() and (run / "model.keras").is_file()
    # The killed round's charge stands: in the odometer, and in the ledger as "lost".
    records = _check_ledger(run, odometer)
    lost = [(r["round"], r["hospital"]) for r in records if r["status"] == "lost"]
    assert len(lost) == 1 and lost[0][0] == 2 and lost[0][1] in victims, (lost, victims)
    assert f"{lost[0][1]} failed (crash)" in lines[1], out

    # A fresh Ray pool: the run continues after round 2 and ends with every charge ledgered.
    process = _start(["--resume", str(run)], tmp_path, "resumed")
    code, out, err = _finish(process, tmp_path, "resumed")
    assert code == 1, out + err  # finished, with a hospital that failed on the way (README's table)
    assert "Traceback" not in out + err
    assert f"Resuming {run} after round {stopped}" in out
    lines = _round_lines(out)
    assert [line.split(" |")[0] for line in lines] == [f"Round {n}/{ROUNDS}" for n in range(stopped + 1, ROUNDS + 1)]
    assert not any("failed" in line for line in lines), out
    status = _status(run)
    assert status["state"] == "finished" and status["rounds_completed"] == ROUNDS, status
    records = _check_ledger(run, odometer)
    pairs = [(r["round"], r["hospital"]) for r in records]
    assert len(pairs) == len(set(pairs))  # no duplicate
    hospitals = ("hospital-0", "hospital-1")
    assert {(n, h) for n in (1, *range(stopped + 1, ROUNDS + 1)) for h in hospitals} <= \
        {(r["round"], r["hospital"]) for r in records if r["status"] == "trained"}
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, ROUNDS + 1))


def test_sigterm_stops_at_the_round_boundary_leaves_no_process_and_resumes_like_an_uninterrupted_run(tmp_path):
    odometer, run = tmp_path / "odometer", tmp_path / "run"
    args = [*SMALL, "--set", "hospitals=2", "--set", f"rounds={ROUNDS}", "--set", "train.fraction_evaluate=0",
            "--set", f"privacy.odometer_dir={odometer}"]
    process = _start([*args, "--out", str(run)], tmp_path, "terminated")
    try:
        _wait_for_round(process, run, 1)
        started = psutil.Process(process.pid).children(recursive=True)  # SuperLink, simulation, Ray ...
        assert any(_command(p).startswith("ray::") for p in started)
        os.kill(process.pid, signal.SIGTERM)  # what a service manager or `kill` sends
    except BaseException:
        _kill_tree(process.pid)
        raise
    code, out, err = _finish(process, tmp_path, "terminated")
    assert code == 130, out + err
    assert "stopping after this round" in err and "Traceback" not in out + err
    status = _status(run)
    assert status["state"] == "interrupted" and status["exit_code"] == 130, status
    stopped_after = status["rounds_completed"]
    assert 1 <= stopped_after < ROUNDS, status
    assert f"Stopping after round {stopped_after} as asked; resume with --resume {run}" in out
    assert "Privacy: maximum epsilon" in out  # the summary
    assert (run / "model.keras").is_file()
    assert json.loads((run / "checkpoint" / "state.json").read_text())["round"] == stopped_after
    _, alive = psutil.wait_procs(started, timeout=30)
    assert alive == [], [_command(p) for p in alive]  # no SuperLink, simulation or Ray process left

    process = _start(["--resume", str(run)], tmp_path, "resumed")
    code, out, err = _finish(process, tmp_path, "resumed")
    assert code == 0, out + err
    assert f"Resuming {run} after round {stopped_after}" in out
    status = _status(run)
    assert status["state"] == "finished" and status["rounds_completed"] == ROUNDS, status
    # As an uninterrupted run: one trained record per hospital per round, one charge each.
    records = _check_ledger(run, odometer)
    assert sorted((r["round"], r["hospital"], r["status"]) for r in records) == \
        [(n, h, "trained") for n in range(1, ROUNDS + 1) for h in ("hospital-0", "hospital-1")]
    assert {h: len(c) for h, c in _odometer_charges(odometer).items()} == {"hospital-0": ROUNDS, "hospital-1": ROUNDS}
