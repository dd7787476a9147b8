"""The audit with --odometer: the ledger must be exactly what the hospitals' odometers hold (issue 25
item 1, issue 26 item 1). The coordinator writes every run file, so it can edit them all
consistently; these ledgers are self-consistent (every epsilon recomputed from PLDAccountant)
and only the odometer shows what they hide."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client.odometer import PrivacyOdometer
from common.privacy import PrivacyEvent
from server import audit
from tests.test_audit import DELTA, ROOT, event, true_epsilon
from tests.test_simulation import first_run  # noqa: F401 - a fixture: one small real simulation

RUN, EARLIER, CONCURRENT = 9, 5, 11  # run ids: this run, one before it, one during it
CONFIG = {"hospitals": 2, "rounds": 3, "train": {"batch_size": 64, "local_epochs": 0.4, "fraction_train": 1.0},
          "dp": {"noise_multiplier": "auto"}, "privacy": {"max_epsilon": 8.0, "delta": DELTA}}
EARLIER_SPEND = [event(2.0, 0.02, 30), event(2.0, 0.02, 30)]  # hospital a, two rounds of run 5
CONCURRENT_SPEND = event(2.5, 0.02, 20)                         # hospital a, run 11, between our rounds 1 and 2
# sigma, q, steps (q x n = 64, steps = ceil(0.4 / q)); b spends less than a, so a's figure is the headline.
ROUNDS = {"a": (2.0, 0.02, 20), "b": (3.0, 0.04, 10)}


def write_ledger(path: Path, prior: dict, added: dict, delta: float = DELTA, rename: dict | None = None,
                 unit: dict | None = None) -> list[dict]:
    """This run's ledger: three rounds of a and b; prior[h] on h's first record, added[(h, round)] on that record."""
    records, history = [], {}
    for rnd in (1, 2, 3):
        for hospital, (sigma, q, steps) in ROUNDS.items():
            events = history.setdefault(hospital, list(prior.get(hospital, [])))
            events += added.get((hospital, rnd), [])
            events.append(event(sigma, q, steps))
            record = {"round": rnd, "hospital": (rename or {}).get(hospital, hospital), "status": "trained",
                      "noise_multiplier": sigma, "sampling_rate": q, "steps": steps, "sampling": "poisson",
                      "epsilon": true_epsilon(events, delta), "delta": delta, "max_epsilon": 8.0,
                      "accountant": "pld", "num_examples": round(64 / q)}
            if rnd == 1:
                record["prior_events"] = list(prior.get(hospital, []))
            if added.get((hospital, rnd)):
                record["added_prior_events"] = added[(hospital, rnd)]
            if unit and (hospital, rnd) in unit:
                record["unit"] = unit[(hospital, rnd)]
            records.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def charge(odometer: PrivacyOdometer, spend: dict, run: int, rnd: int) -> None:
    odometer.charge(PrivacyEvent(spend["noise_multiplier"], spend["sampling_rate"], spend["steps"]), run=run,
                    round_number=rnd, epsilon_after=0.0)


def make_odometers(directory: Path, concurrent: bool) -> dict[str, Path]:
    """Each hospital's own odometer (as deployed): a's holds an earlier run, and maybe a concurrent one."""
    paths = {h: directory / f"{h}.jsonl" for h in ROUNDS}
    files = {h: PrivacyOdometer(paths[h], h, 8.0, DELTA) for h in ROUNDS}
    for rnd, spend in enumerate(EARLIER_SPEND, start=1):
        charge(files["a"], spend, EARLIER, rnd)
    for rnd in (1, 2, 3):
        for hospital, (sigma, q, steps) in ROUNDS.items():
            charge(files[hospital], event(sigma, q, steps), RUN, rnd)
        if rnd == 1 and concurrent:
            charge(files["a"], CONCURRENT_SPEND, CONCURRENT, 1)  # a's round-2 reply reports it
    return paths


@pytest.fixture(scope="module")
def odometers(tmp_path_factory) -> dict[str, Path]:
    return make_odometers(tmp_path_factory.mktemp("odometers"), concurrent=True)


@pytest.fixture(scope="module")
def plain_odometers(tmp_path_factory) -> dict[str, Path]:
    """No concurrent run: the issue-25 reproductions, which the audit before it passed (exit 0)."""
    return make_odometers(tmp_path_factory.mktemp("plain"), concurrent=False)


HONEST = {"prior": {"a": EARLIER_SPEND}, "added": {("a", 2): [CONCURRENT_SPEND]}}
PLAIN = {"prior": {"a": EARLIER_SPEND}, "added": {}}


def run_directory(path: Path, config: dict | None = None, **ledger) -> Path:
    """A run directory as the coordinator writes it: ledger, config.yaml, metrics, status, checkpoint."""
    path.mkdir(parents=True)
    records = write_ledger(path / audit.LEDGER_NAME, **({"prior": {}, "added": {}} | ledger))
    (path / "config.yaml").write_text(yaml.safe_dump(config or CONFIG))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "hospitals_trained": 2}) + "\n"
                                                for r in (1, 2, 3)))
    (path / "status.json").write_text(json.dumps({"state": "finished", "simulated": False}))
    (path / "checkpoint").mkdir()
    (path / "checkpoint" / "state.json").write_text(json.dumps({"round": 3, "flower_runs": [RUN]}))
    assert audit.audit_ledger(records, accountant="pld").ok  # self-consistent: the ledger alone passes
    return path


def audit_cli(run: Path, *odometers: Path) -> subprocess.CompletedProcess:
    extra = [arg for path in odometers for arg in ("--odometer", str(path))]
    return subprocess.run([sys.executable, "-m", "server.audit", str(run), *extra, "--jobs", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def findings(run: Path, *odometers: Path) -> audit.AuditReport:
    return audit.audit_ledger(audit.read_ledger(run), accountant="pld",
                              context=audit.read_context(run, [str(p) for p in odometers]))


def test_the_honest_ledger_matches_both_odometers(tmp_path, odometers, plain_odometers):
    assert findings(run_directory(tmp_path / "plain", **PLAIN), *plain_odometers.values()).ok
    run = run_directory(tmp_path / "run", **HONEST)
    result = audit_cli(run, *odometers.values())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every figure recomputes and matches the odometers" in result.stdout
    report = findings(run, *odometers.values())
    a = next(h for h in report.hospitals if h.hospital == "a")
    assert a.epsilon_odometer == pytest.approx(a.epsilon_pld, rel=1e-6)


def test_dropped_prior_events_fail_with_the_figure_the_odometer_implies(tmp_path, plain_odometers):
    # Issue 25: the first record's prior_events dropped and every epsilon recomputed without them.
    honest = write_ledger(tmp_path / "honest.jsonl", **PLAIN)
    run = run_directory(tmp_path / "run", prior={}, added={})
    result = audit_cli(run, *plain_odometers.values())
    assert result.returncode == 1, result.stdout + result.stderr
    implied = honest[0]["epsilon"]  # a's round 1, counting the earlier run
    assert (f"round 1, hospital a: the first record's prior_events hold 0 event(s), but odometer {plain_odometers['a']} "
            "holds 2 charge(s) on this hospital's data from before this run's first charge (2 missing") in result.stdout
    assert f"the odometer implies epsilon {implied:.6g} at round 1" in result.stdout
    # The headline is the odometer's figure, not the ledger's smaller one.
    top = max(r["epsilon"] for r in honest)
    assert f"federation maximum: epsilon {top:.6f} at delta 1e-05, hospital a (by its odometer" in result.stdout


def test_a_delta_raised_in_every_run_file_fails(tmp_path, plain_odometers):
    # Issue 25: delta 1e-3 in the ledger, config.yaml and plan.json; the odometers charged at 1e-5.
    config = copy.deepcopy(CONFIG)
    config["privacy"]["delta"] = 1e-3
    run = run_directory(tmp_path / "run", config, delta=1e-3, **PLAIN)
    (run / "plan.json").write_text(json.dumps({h: {"max-epsilon": 8.0, "delta": 1e-3} for h in ROUNDS}))
    assert findings(run).ok  # the run files alone agree with each other
    result = audit_cli(run, *plain_odometers.values())
    assert result.returncode == 1, result.stdout + result.stderr
    honest = write_ledger(tmp_path / "honest.jsonl", **PLAIN)
    at_odometer_delta = [r["epsilon"] for r in honest if r["hospital"] == "a"][-1]
    assert (f"hospital a: delta 0.001 in the ledger (round(s) 1, 2, 3), but odometer {plain_odometers['a']} charged it at "
            f"delta 1e-05: at that delta the odometer implies epsilon {at_odometer_delta:.6g}") in result.stdout
    assert f"federation maximum: epsilon {at_odometer_delta:.6f} at delta 1e-05, hospital a (by its odometer" in result.stdout


def test_a_charge_that_appeared_during_the_run_must_be_ledgered(tmp_path, odometers):
    # A concurrent run's charge on a's data: a ledger that never adds it understates a's spend.
    run = run_directory(tmp_path / "run", prior=HONEST["prior"], added={})
    report = findings(run, *odometers.values())
    assert [d for d in report.discrepancies if d.startswith("round 2, hospital a: prior_events and added_prior_events "
                                                            "so far hold 2 event(s)") and "1 missing (20 steps at sigma 2.5" in d], \
        report.discrepancies
    # Reported in the wrong round (before the charge was written) is caught too.
    early = run_directory(tmp_path / "early", prior=HONEST["prior"], added={("a", 1): [CONCURRENT_SPEND]})
    assert not findings(early, *odometers.values()).ok


def test_every_hospital_of_the_odometer_must_be_in_the_ledger(tmp_path, odometers):
    run = run_directory(tmp_path / "run", rename={"a": "hospital-X"}, **{"prior": {"a": EARLIER_SPEND},
                                                                        "added": {}})
    report = findings(run, *odometers.values())
    assert any(d.startswith(f"hospital a: odometer {odometers['a']} holds 3 charge(s) of this run (rounds 1, 2, 3) "
                            "but the ledger has no record of a") for d in report.discrepancies), report.discrepancies


def test_the_run_id_decides_which_charges_are_this_runs(tmp_path, odometers):
    # The checkpoint names another run: none of the ledger's charges is that run's.
    run = run_directory(tmp_path / "run", **HONEST)
    (run / "checkpoint" / "state.json").write_text(json.dumps({"round": 3, "flower_runs": [EARLIER]}))
    report = findings(run, odometers["b"])
    assert any(d.startswith("round 1, hospital b: the ledger's charge") for d in report.discrepancies)
    # Without a checkpoint the run is inferred from the matching charges, and the report says so.
    shutil.rmtree(run / "checkpoint")
    report = findings(run, *odometers.values())
    assert report.ok, report.discrepancies
    assert any("taken as run 9" in note for note in report.notes)


def test_without_an_odometer_the_verdict_says_what_was_not_checked(tmp_path, odometers):
    run = run_directory(tmp_path / "run", **HONEST)
    result = audit_cli(run)
    assert result.returncode == 0
    assert "OK: every figure recomputes from the ledger alone (see 'Not checked')" in result.stdout
    assert "a ledger alone cannot show prior events that were dropped, records removed" in result.stdout


def test_the_unit_is_shown_and_fixed_per_hospital(tmp_path):
    records = write_ledger(tmp_path / "l.jsonl", {}, {}, unit={("a", r): "patient" for r in (1, 2, 3)})
    report = audit.audit_ledger(records, accountant="pld")
    assert report.ok and {h.hospital: h.unit for h in report.hospitals} == {"a": "patient", "b": "image"}
    assert "Unit: one image / one patient" in audit.format_report(report)
    changed = write_ledger(tmp_path / "m.jsonl", {}, {}, unit={("a", 3): "patient"})
    assert any(d.startswith("round 3, hospital a: unit changed from 'image' to 'patient'")
               for d in audit.audit_ledger(changed, accountant="pld").discrepancies)
    bad = write_ledger(tmp_path / "n.jsonl", {}, {}, unit={("b", 1): "x-ray"})
    assert any("unit 'x-ray' must be one of image, patient" in d
               for d in audit.audit_ledger(bad, accountant="pld").discrepancies)


def test_the_summary_comes_first_sorted_and_the_table_only_with_rounds(tmp_path, odometers, capsys):
    run = run_directory(tmp_path / "run", **HONEST)
    lines = (run / audit.LEDGER_NAME).read_text().splitlines()
    (run / audit.LEDGER_NAME).write_text("\n".join(lines[1::2] + lines[0::2]) + "\n")  # b's records first
    assert audit.main([str(run), "--jobs", "1", "--accountant", "pld"]) == 0
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if line.split()[:1] in (["a"], ["b"])]
    assert [line.split()[0] for line in summary] == ["a", "b"]
    assert "eps reported" not in out
    assert audit.main([str(run), "--jobs", "1", "--accountant", "pld", "--rounds"]) == 0
    out = capsys.readouterr().out
    assert "eps reported" in out and out.index("  1  a ") < out.index("  1  b ")


# ------------------------------------------------------------------ a real simulation

def _tampered(run: Path, target: Path, change) -> Path:
    """A copy of a run directory whose ledger `change` edits, every epsilon recomputed to match."""
    shutil.copytree(run, target)
    path = target / audit.LEDGER_NAME
    records = change([json.loads(line) for line in path.read_text().splitlines()])
    for record, row in zip(records, audit.audit_ledger(records, accountant="pld").rows):
        record["epsilon"] = row.epsilon_pld
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return target


def _simulation_odometer(run: Path) -> Path:
    config = yaml.safe_load((run / "config.yaml").read_text())
    return Path(config["privacy"]["odometer_dir"]) / "simulation.jsonl"


@pytest.mark.slow
def test_an_honest_simulation_matches_its_odometer(first_run):
    run, _ = first_run
    result = audit_cli(run, _simulation_odometer(run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every figure recomputes and matches the odometers" in result.stdout


@pytest.mark.slow
def test_a_renamed_simulated_hospital_fails(first_run, tmp_path):
    run, _ = first_run

    def rename(records):
        for record in records:
            if record["hospital"] == "hospital-0":
                record["hospital"] = "hospital-X"
        return records

    tampered = _tampered(run, tmp_path / "renamed", rename)
    plans = json.loads((tampered / "plan.json").read_text())
    plans["hospital-X"] = plans.pop("hospital-0", None)
    (tampered / "plan.json").write_text(json.dumps(plans))
    result = audit_cli(tampered, _simulation_odometer(run))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "hospital hospital-0: odometer" in result.stdout and "but the ledger has no record of hospital-0" in result.stdout
    assert "hospital hospital-X: the ledger's 2 charge(s) (rounds 1, 2) are not in odometer" in result.stdout


@pytest.mark.slow
def test_a_simulation_with_its_delta_raised_fails(first_run, tmp_path):
    run, _ = first_run

    def raise_delta(records):
        for record in records:
            record["delta"] = 1e-3
        return records

    tampered = _tampered(run, tmp_path / "delta", raise_delta)
    result = audit_cli(tampered, _simulation_odometer(run))
    assert result.returncode == 1, result.stdout + result.stderr
    honest = [json.loads(line) for line in (run / audit.LEDGER_NAME).read_text().splitlines()]
    assert "in the ledger (round(s) 1, 2), but odometer" in result.stdout
    assert f"federation maximum: epsilon {max(r['epsilon'] for r in honest):.6f} at delta 1e-05, hospital " in result.stdout
