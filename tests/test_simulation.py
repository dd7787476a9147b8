"""End to end through Flower's simulation engine: run directory, ledger, odometer, budgets."""
import json
import re
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
import yaml

pytestmark = pytest.mark.slow  # every test here runs a real simulation

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--set", "hospitals=2", "--set", "train.batch_size=32", "--set", "model.filters=[8,16]",
         "--set", "model.dense_units=16"]


def _simulate(*args, exit_code=0):
    result = subprocess.run([sys.executable, "simulate.py", *SMALL, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == exit_code, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _recompute(records, hospital, upto_round):
    """Epsilon from the ledger's own fields, with dp-accounting directly (not the project's code)."""
    own = [r for r in records if r["hospital"] == hospital and r["round"] <= upto_round]
    events = list(own[0].get("prior_events", [])) + [e for r in own for e in r.get("added_prior_events", [])]
    events += [r for r in own if r["steps"] > 0]
    steps = {}
    for event in events:
        key = (event["noise_multiplier"], event["sampling_rate"])
        steps[key] = steps.get(key, 0) + event["steps"]
    accountant = dp_accounting.pld.PLDAccountant()
    for (sigma, q), count in steps.items():
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count))
    return accountant.get_epsilon(own[-1]["delta"]) if steps else 0.0


def _ledger(run):
    return [json.loads(line) for line in (run / "privacy_ledger.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    odometer = tmp_path_factory.mktemp("odometer")
    run = tmp_path_factory.mktemp("runs") / "first"
    stdout = _simulate("--set", "rounds=2", "--set", f"privacy.odometer_dir={odometer}", "--out", str(run))
    return run, stdout


def test_two_hospitals_two_rounds_write_the_run_directory(first_run):
    run, stdout = first_run
    for name in ("config.yaml", "metrics.jsonl", "privacy_ledger.jsonl", "model.keras", "accuracy.png", "epsilon.png"):
        assert (run / name).is_file(), name
    assert "Round 1/2" in stdout and "Round 2/2" in stdout and "hospital-1" in stdout
    # Planned noise spends each budget over the 2 rounds: a finished plan, not a run cut short by its budget.
    assert "Budget spent as planned over the 2 rounds" in stdout and "Ended on budget" not in stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(0 <= m["accuracy"] <= 1 and m["loss"] > 0 for m in metrics)
    from common.model import load_model

    model = load_model(run / "model.keras")
    assert model.output_shape == (None, 10)
    assert json.loads((run / "status.json").read_text())["simulated"] is True  # budgets are config.yaml's
    # Flower's own lines, kept as plain text with the time each arrived (issue 27 item 3).
    flower_log = (run / "flower.log").read_text()
    assert "\x1b[" not in flower_log and "Starting Flower Simulation" in flower_log
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", line) for line in flower_log.splitlines()), \
        flower_log[:2000]


def test_every_ledger_epsilon_recomputes_from_its_fields(first_run):
    run, _ = first_run
    records = _ledger(run)
    assert len(records) == 4 and {r["hospital"] for r in records} == {"hospital-0", "hospital-1"}
    for record in records:
        assert record["sampling"] == "poisson" and record["accountant"] == "pld"
        assert record["status"] == "trained" and record["steps"] > 0
        assert record["epsilon"] == pytest.approx(_recompute(records, record["hospital"], record["round"]), rel=1e-9)
    assert "train_loss" not in json.dumps(records)
    audit = subprocess.run([sys.executable, "-m", "server.audit", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_a_reshuffled_rerun_plans_charges_ledgers_and_audits_the_same_earlier_spend(first_run, tmp_path):
    """Another seed and number of hospitals over the same images, on the first run's odometer."""
    run, _ = first_run
    odometer = Path(yaml.safe_load((run / "config.yaml").read_text())["privacy"]["odometer_dir"])
    before = [json.loads(line) for line in (odometer / "simulation.jsonl").read_text().splitlines()]
    second = tmp_path / "reshuffled"
    # Each new shard shares images with both earlier ones and counts both hospitals' charges
    # (3.86 at the first run's budget of 3): a larger budget lets it train on top of them.
    stdout = _simulate("--set", "hospitals=3", "--set", "seed=1", "--set", "rounds=1", "--set", "privacy.max_epsilon=20",
                       "--set", f"privacy.odometer_dir={odometer}", "--out", str(second))
    records = _ledger(second)
    charges = [json.loads(line) for line in (odometer / "simulation.jsonl").read_text().splitlines()]
    shards = {p.stem: set(json.loads(p.read_text())["hashes"]) for p in (odometer / "shards").glob("*.json")}
    assert {r["hospital"] for r in records} == {"hospital-0", "hospital-1", "hospital-2"}
    for record in records:
        assert record["status"] == "trained" and not record.get("added_prior_events")
        mine = next(c for c in charges[len(before):] if c["hospital"] == record["hospital"])
        # What the odometer counts for this shard, found independently: earlier charges on any
        # shard sharing an image with it (iid over the same digits: all of the first run's).
        expected = [c for c in before if shards[c["shard"]] & shards[mine["shard"]]]
        assert expected == before
        key = lambda e: (e["noise_multiplier"], e["sampling_rate"], e["steps"])  # noqa: E731
        assert sorted(map(key, record["prior_events"])) == sorted(map(key, expected))
        assert record["epsilon"] == pytest.approx(_recompute(records, record["hospital"], 1), rel=1e-9)
        assert record["epsilon"] == pytest.approx(mine["epsilon_after"], rel=1e-9)
    prior_epsilon = _recompute([dict(records[0], steps=0)], records[0]["hospital"], 1)
    assert f"{prior_epsilon:.3f}" in stdout  # the plan's "epsilon now" column
    audit = subprocess.run([sys.executable, "-m", "server.audit", str(second), "--odometer",
                            str(odometer / "simulation.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_budget_of_one_stops_early_and_a_second_run_trains_nothing(tmp_path):
    odometer = tmp_path / "odometer"
    cheap_rounds = ["--set", "dp.noise_multiplier=2.0", "--set", "rounds=30", "--set", "privacy.max_epsilon=1.0",
                    "--set", f"privacy.odometer_dir={odometer}"]
    first = tmp_path / "first"
    stdout = _simulate(*cheap_rounds, "--out", str(first))
    records = _ledger(first)
    trained_rounds = {r["round"] for r in records if r["status"] == "trained"}
    assert trained_rounds and max(r["round"] for r in records) < 30
    assert "no hospital can afford another round" in stdout
    assert all(r["epsilon"] <= 1.0 for r in records)
    for record in records:
        assert record["epsilon"] == pytest.approx(_recompute(records, record["hospital"], record["round"]), rel=1e-9)
    spent = {r["hospital"]: r["epsilon"] for r in records}

    # A restart on the same data and odometer starts from the first run's epsilon, trains nothing
    # and says so with a failing exit: a run that trained nobody is not "finished".
    second = tmp_path / "second"
    stdout = _simulate(*cheap_rounds, "--out", str(second), exit_code=1)
    records = _ledger(second)
    assert all(r["status"] == "budget_exhausted" and r["steps"] == 0 for r in records)
    assert max(r["round"] for r in records) == 1
    for record in records:
        assert record["prior_events"], "the first run's spend must be carried as prior_events"
        assert record["epsilon"] == pytest.approx(spent[record["hospital"]], rel=1e-9)
        assert record["epsilon"] == pytest.approx(_recompute(records, record["hospital"], 1), rel=1e-9)
    assert "Ended on budget" in stdout
    assert "error: no hospital trained in this run" in stdout
    assert json.loads((second / "status.json").read_text())["state"] == "failed"
    audit = subprocess.run([sys.executable, "-m", "server.audit", str(second)], cwd=ROOT, capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_each_hospital_carries_its_momentum_into_its_next_round(first_run):
    """The momentum a hospital's round leaves is kept in its node's Flower state, not sent."""
    run, _ = first_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    log = Path(config["privacy"]["odometer_dir"]) / "simulation.train-log.jsonl"
    rounds = [json.loads(line) for line in log.read_text().splitlines()]
    rounds = [r for r in rounds if r["run"] == rounds[0]["run"]]  # the reshuffle test reruns on this odometer
    assert [r["momentum_carried"] for r in rounds if r["round"] == 1] == [False, False]
    assert [r["momentum_carried"] for r in rounds if r["round"] == 2] == [True, True]
    assert "momentum" not in (run / "privacy_ledger.jsonl").read_text()
