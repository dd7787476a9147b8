"""Two simulations at once on one odometer (issue 26 item 1): the hospitals of each run plan and
report against what the odometer really holds at charge time, so honest replies are never
rejected, each ledger shows the other run's spend where it appeared, and both audits agree
with the odometer."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_simulations_on_one_odometer_at_once_reject_no_honest_reply_and_both_audits_agree(tmp_path):
    odometer = tmp_path / "odometer"
    common = ["--set", "hospitals=2", "--set", "rounds=5", "--set", "privacy.max_epsilon=1000", "--set", "dp.noise_multiplier=1.5",
              "--set", "train.fraction_evaluate=0", "--set", f"privacy.odometer_dir={odometer}"]
    runs = [tmp_path / "run-a", tmp_path / "run-b"]
    procs = [subprocess.Popen([sys.executable, "simulate.py", *common, "--out", str(run)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for run in runs]
    outputs = [proc.communicate(timeout=1500) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        assert "rejected" not in out, out[-3000:]
    charges = [json.loads(line) for line in (odometer / "simulation.jsonl").read_text().splitlines()]
    assert len({c["run"] for c in charges}) == 2 and len(charges) == 2 * 2 * 5  # both ran, every round charged
    grown = 0
    for run in runs:
        records = [json.loads(line) for line in (run / "privacy_ledger.jsonl").read_text().splitlines()]
        assert [r["status"] for r in records] == ["trained"] * 10
        grown += sum(len(r.get("added_prior_events", [])) for r in records)
        audit = subprocess.run([sys.executable, "-m", "server.audit", str(run), "--odometer",
                                str(odometer / "simulation.jsonl")], cwd=ROOT, capture_output=True, text=True)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        run_id = json.loads((run / "checkpoint" / "state.json").read_text())["flower_runs"][0]
        for record in records:  # each epsilon is what the odometer held when that charge was written
            charge = next(c for c in charges if (c["hospital"], c["round"], c["run"]) ==
                          (record["hospital"], record["round"], run_id))
            assert record["epsilon"] == pytest.approx(charge["epsilon_after"], rel=1e-9)
    # When the runs' charges interleaved in time (they share the same shards), a hospital saw the
    # other run's charges appear mid-run and ledgered them as added prior spend.
    windows = [sorted(c["seq"] for c in charges if c["run"] == run) for run in {c["run"] for c in charges}]
    if windows[0][0] < windows[1][-1] and windows[1][0] < windows[0][-1]:
        assert grown >= 1
