"""Fault injection with real processes: Flower's simulation engine, real ClientApps, DP-SGD and
accountants. Each test checks the outcome a person sees (round lines, exit code, no
traceback), that every ledger epsilon recomputes (dp-accounting directly and the audit),
and that every odometer charge appears in the ledger.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import dp_accounting
import psutil
import pytest

from common.sampling import sampling_rate_for, steps_for
from tests.test_simulation import _recompute  # the ledger's epsilon, recomputed with dp-accounting directly

pytestmark = pytest.mark.slow  # every test here runs a real simulation

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--set", "train.batch_size=32", "--set", "model.filters=[8,16]", "--set", "model.dense_units=16",
         "--set", "train.local_epochs=1"]
TIMEOUT = 1200


def _start(args, tmp_path, name, app=None):
    """simulate.py (or the test-only harness loading `app`) as a process of its own."""
    command = [sys.executable, "simulate.py", *args] if app is None else \
        [sys.executable, "-m", "tests.apps.simulate_with", app, *args]
    stdout, stderr = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr, start_new_session=True)


def _finish(process, tmp_path, name):
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        raise
    return code, (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()


def _kill_tree(pid):
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def _checkpointed_round(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return -1


def _status_round(run: Path) -> int:
    try:
        return json.loads((run / "status.json").read_text())["rounds_completed"]
    except (OSError, ValueError, KeyError):
        return -1


def _wait_for_round(process, run: Path, round_number: int) -> None:
    # The checkpoint is written first, status.json just after it: wait for both, so that a kill
    # right after this finds the round in each.
    while min(_checkpointed_round(run), _status_round(run)) < round_number:
        assert process.poll() is None, f"the run ended before round {round_number}"
        time.sleep(0.2)


def _ledger(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "privacy_ledger.jsonl").read_text().splitlines() if line.strip()]


def _odometer_charges(odometer: Path) -> dict[str, list[dict]]:
    """Every charge in the simulated hospitals' shared odometer, by hospital."""
    charges = {}
    for line in (odometer / "simulation.jsonl").read_text().splitlines():
        charge = json.loads(line)
        charges.setdefault(charge["hospital"], []).append(charge)
    return charges


def _check_ledger(run: Path, odometer: Path) -> list[dict]:
    """Every epsilon recomputes; every odometer charge is in the ledger; the audit agrees."""
    records = _ledger(run)
    for record in records:
        assert record["epsilon"] == pytest.approx(_recompute(records, record["hospital"], record["round"]), rel=1e-9)
    for hospital, charges in _odometer_charges(odometer).items():
        ledgered = sorted((r["round"], r["steps"]) for r in records if r["hospital"] == hospital and r["steps"] > 0)
        assert ledgered == sorted((c["round"], c["steps"]) for c in charges), hospital
    audit = subprocess.run([sys.executable, "-m", "server.audit", str(run), "--odometer",
                            str(odometer / "simulation.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr  # "lost" charges compose like trained ones
    return records


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def test_one_hospital_failing_and_one_rejected_every_round_are_named_and_every_charge_is_ledgered(tmp_path):
    odometer, run = tmp_path / "odometer", tmp_path / "run"
    # hospital-2 plans, then fails every training round (tests/apps/failing_client.py): it never
    # sends a training reply, and is still named, from its plan, in every round line. hospital-1
    # is charged and then rejected every round: it never reaches the ledger by a reply, so its
    # charges are ledgered from the odometer as "lost" (issue 26 item 1) and the audit agrees.
    process = _start([*SMALL, "--set", "hospitals=3", "--set", "rounds=4", "--set", f"privacy.odometer_dir={odometer}",
                      "--out", str(run)], tmp_path, "failing", app="tests.apps.failing_client:app")
    code, out, err = _finish(process, tmp_path, "failing")
    assert code == 1, out + err
    assert "Traceback" not in out + err and "unreadable" not in out + err  # the category only, never the text
    lines = [line for line in out.splitlines() if line.startswith("Round ") and " | accuracy" in line]
    assert len(lines) == 4 and all("hospital-2 failed (data)" in line for line in lines), lines
    assert all("hospital-1 rejected" in line for line in lines), lines
    assert "node " not in out
    assert "hospital-2" in (run / "run.log").read_text()
    status = _status(run)
    assert status["state"] == "finished" and status["exit_code"] == 1 and status["failed_hospitals"] == ["hospital-2"]
    records = _check_ledger(run, odometer)  # every odometer charge, hospital-1's too, and the audit exits 0
    trained = {(r["round"], r["hospital"]) for r in records if r["status"] == "trained"}
    assert {(n, "hospital-0") for n in range(1, 5)} == trained
    lost = [r for r in records if r["hospital"] == "hospital-1"]
    assert [(r["round"], r["status"]) for r in lost] == [(n, "lost") for n in range(1, 5)]
    assert lost[0]["prior_events"] == [] and lost[-1]["epsilon"] <= lost[-1]["max_epsilon"]
    charges = _odometer_charges(odometer)["hospital-1"]
    assert lost[-1]["epsilon"] == pytest.approx(charges[-1]["epsilon_after"], rel=1e-9)


def test_stop_file_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    odometer, run = tmp_path / "odometer", tmp_path / "run"
    args = [*SMALL, "--set", "hospitals=2", "--set", "rounds=6", "--set", "train.fraction_evaluate=0",
            "--set", f"privacy.odometer_dir={odometer}"]
    process = _start([*args, "--out", str(run)], tmp_path, "stopped")
    _wait_for_round(process, run, 2)
    (run / "STOP").touch()  # what simulate.py does on the first Ctrl-C
    code, out, err = _finish(process, tmp_path, "stopped")
    assert code == 130, out + err
    status = _status(run)
    assert status["state"] == "interrupted" and status["exit_code"] == 130
    stopped_after = status["rounds_completed"]
    assert 2 <= stopped_after < 6 and (run / "model.keras").is_file()
    assert "Traceback" not in out + err

    process = _start(["--resume", str(run)], tmp_path, "resumed")
    code, out, err = _finish(process, tmp_path, "resumed")
    assert code == 0, out + err
    assert f"Resuming {run} after round {stopped_after}" in out
    assert f"Finished 6 round(s), {6 - stopped_after} of them since the resume, in " in out  # its own time only
    status = _status(run)
    assert status["state"] == "finished" and status["rounds_completed"] == 6

    # As an uninterrupted 6-round run: one record per hospital per round, six charges each,
    # and the final epsilon of six rounds of the same mechanism.
    records = _check_ledger(run, odometer)
    assert sorted((r["round"], r["hospital"]) for r in records) == \
        [(n, h) for n in range(1, 7) for h in ("hospital-0", "hospital-1")]
    charges = _odometer_charges(odometer)
    assert sorted(charges) == ["hospital-0", "hospital-1"]
    for hospital, own in charges.items():
        examples = records[0]["num_examples"] if records[0]["hospital"] == hospital else records[1]["num_examples"]
        q = sampling_rate_for(32, examples)
        assert [c["steps"] for c in own] == [steps_for(1.0, q)] * 6
        last = [r for r in records if r["hospital"] == hospital][-1]
        accountant = dp_accounting.pld.PLDAccountant().compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(last["noise_multiplier"])),
            6 * steps_for(1.0, q)))
        assert last["epsilon"] == pytest.approx(accountant.get_epsilon(last["delta"]), rel=1e-9)
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_a_hostile_hospital_is_rejected_and_named_every_round_and_the_run_completes(tmp_path):
    from tests.apps.hostile_client import ATTACKS

    odometer, run = tmp_path / "odometer", tmp_path / "run"
    rounds = len(ATTACKS) + 2
    process = _start([*SMALL, "--set", "hospitals=3", "--set", f"rounds={rounds}", "--set", "train.fraction_evaluate=0",
                      "--set", f"privacy.odometer_dir={odometer}", "--out", str(run)], tmp_path, "hostile",
                     app="tests.apps.hostile_client:app")
    code, out, err = _finish(process, tmp_path, "hostile")
    assert code == 1, out + err
    assert "Traceback" not in out + err
    lines = [line for line in out.splitlines() if line.startswith("Round ") and " | accuracy" in line]
    assert len(lines) == rounds, out
    for number, line in enumerate(lines, start=1):
        assert ("hospital-0 rejected (" in line) == (2 <= number < rounds), line
    rejected = [json.loads(line) for line in (run / "rejected.jsonl").read_text().splitlines()]
    assert [(r["round"], r["hospital"]) for r in rejected] == [(n, "hospital-0") for n in range(2, rounds)]
    status = _status(run)
    assert status["state"] == "finished" and status["rejected_hospitals"] == ["hospital-0"]
    records = _check_ledger(run, odometer)
    for hospital in ("hospital-1", "hospital-2"):
        assert [r["round"] for r in records if r["hospital"] == hospital and r["status"] == "trained"] == \
            list(range(1, rounds + 1))
    # The weights of 1e30 never reached the global model: it still classifies.
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] < 100 for m in metrics), metrics


def test_a_coordinator_killed_under_simulate_is_a_failure_with_one_line_not_a_silent_exit(tmp_path):
    # What the kernel's out-of-memory killer does to a run at too large an image size.
    odometer, run = tmp_path / "odometer", tmp_path / "run"
    process = _start([*SMALL, "--set", "hospitals=2", "--set", "rounds=30", "--set", "train.fraction_evaluate=0",
                      "--set", f"privacy.odometer_dir={odometer}", "--out", str(run)], tmp_path, "coordinator")
    _wait_for_round(process, run, 2)
    coordinators = [child for child in psutil.Process(process.pid).children(recursive=True)
                    if any("flwr-simulation" in part for part in child.cmdline()[:2])]
    assert len(coordinators) == 1, coordinators
    coordinators[0].kill()
    code, out, err = _finish(process, tmp_path, "coordinator")
    assert code == 1 and "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("error: the coordinator's process ended before the run did")
    status = _status(run)
    assert status["state"] == "failed" and status["exit_code"] == 1 and status["rounds_completed"] >= 2


def test_a_killed_run_says_so_and_resumes_with_every_charge_ledgered(tmp_path):
    odometer, run = tmp_path / "odometer", tmp_path / "run"
    process = _start([*SMALL, "--set", "hospitals=2", "--set", "rounds=6", "--set", "train.fraction_evaluate=0",
                      "--set", f"privacy.odometer_dir={odometer}", "--out", str(run)], tmp_path, "killed")
    _wait_for_round(process, run, 3)
    _kill_tree(process.pid)  # SIGKILL: no handler runs, whatever round 4 had charged stays charged
    process.wait(timeout=60)
    status = _status(run)
    assert status["state"] == "running" and status["exit_code"] != 0  # the directory says it did not finish
    assert status["rounds_completed"] >= 3

    process = _start(["--resume", str(run)], tmp_path, "resumed")
    code, out, err = _finish(process, tmp_path, "resumed")
    assert code == 0, out + err
    assert "Traceback" not in out + err
    # A round charged but cut short before its model was saved is repeated under a new number.
    repeated = re.search(r"repeats that work in (\d+) more round", out)
    assert _status(run)["state"] == "finished"
    # (the budget may end the run before the extra round: the plan paid for 6)
    assert 6 <= _status(run)["rounds_completed"] <= 6 + (int(repeated.group(1)) if repeated else 0), out
    records = _check_ledger(run, odometer)  # every charge, including any of the cut-short round
    pairs = [(r["round"], r["hospital"]) for r in records]
    assert len(pairs) == len(set(pairs))  # no duplicate
    assert {(n, h) for n in (1, 2, 3, 6) for h in ("hospital-0", "hospital-1")} <= set(pairs)
