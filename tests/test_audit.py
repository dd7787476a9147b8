"""The privacy audit (server/audit.py) against ledgers whose figures come from dp_accounting itself.

The test's own writer computes every epsilon with PLDAccountant() straight from the canonical
events, independently of the audit's cached fast path, so a pass means the audit reproduces the
accountant; the tampered copies must then fail with the right hospital and round.
"""
from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from server import audit

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5


def true_epsilon(events: list[dict], delta: float = DELTA, accountant=PLDAccountant) -> float:
    """Canonical accounting written out plainly: group, self-compose, compose in first-seen order."""
    groups: dict[tuple, int] = {}
    for event in events:
        if event["steps"] > 0:
            key = (event["noise_multiplier"], event["sampling_rate"])
            groups[key] = groups.get(key, 0) + event["steps"]
    return _composed_epsilon(tuple(groups.items()), delta, accountant)


@functools.cache
def _composed_epsilon(groups: tuple, delta: float, accountant) -> float:
    if not groups:
        return 0.0
    tracker = accountant()
    for (sigma, q), steps in groups:
        tracker.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return tracker.get_epsilon(delta)


def event(sigma: float, q: float, steps: int) -> dict:
    return {"noise_multiplier": sigma, "sampling_rate": q, "steps": steps, "sampling": "poisson"}


def write_ledger(path: Path, plan: list[tuple]) -> list[dict]:
    """plan: (round, hospital, sigma, q, steps, max_epsilon, prior_events); budget-checked like a client."""
    history: dict[str, list[dict]] = {}
    records = []
    for rnd, hospital, sigma, q, steps, max_eps, prior in plan:
        first = hospital not in history
        events = history.setdefault(hospital, list(prior))
        spent = true_epsilon(events)
        # A client refuses a round that would take it past its budget.
        if true_epsilon(events + [event(sigma, q, steps)]) > max_eps:
            status, steps, eps = "budget_exhausted", 0, spent
        else:
            events.append(event(sigma, q, steps))
            status, eps = "trained", true_epsilon(events)
        record = {"round": rnd, "hospital": hospital, "status": status, "noise_multiplier": sigma,
                  "sampling_rate": q, "steps": steps, "sampling": "poisson", "epsilon": eps,
                  "delta": DELTA, "max_epsilon": max_eps, "accountant": "pld", "num_examples": round(64 / q)}
        if first:
            record["prior_events"] = list(prior)
        records.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


# Three hospitals, three rounds: prior spend from an earlier run (two settings) on "a", a
# different q on "b", and a tight budget on "c" so that its last round is refused. Large sigma
# and small q keep the PLDs small, so the tests stay fast.
PLAN = [
    (1, "a", 2.0, 0.02, 20, 8.0, [event(2.5, 0.02, 40), event(2.0, 0.02, 10)]),
    (1, "b", 2.0, 0.04, 10, 8.0, []),
    (1, "c", 2.0, 0.02, 20, 0.3, []),
    (2, "a", 2.0, 0.02, 20, 8.0, None),
    (2, "b", 2.0, 0.04, 10, 8.0, None),
    (2, "c", 2.0, 0.02, 20, 0.3, None),
    (3, "a", 1.8, 0.02, 20, 8.0, None),
    (3, "c", 2.0, 0.02, 20, 0.3, None),
]


@pytest.fixture(scope="module")
def good_records(tmp_path_factory) -> list[dict]:
    plan = [(r, h, s, q, n, m, p if p is not None else []) for r, h, s, q, n, m, p in PLAN]
    records = write_ledger(tmp_path_factory.mktemp("ledger") / "privacy_ledger.jsonl", plan)
    assert [r["status"] for r in records if r["hospital"] == "c"][-1] == "budget_exhausted"
    return records


def save(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.audit", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_correct_ledger_passes_cli_and_library(tmp_path, good_records):
    save(tmp_path / "privacy_ledger.jsonl", good_records)
    result = run_cli(tmp_path, "--jobs", "1")  # the run directory form
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every figure recomputes" in result.stdout
    assert "federation maximum" in result.stdout
    report = audit.audit_ledger(good_records)
    assert report.ok, report.discrepancies
    assert len(report.rows) == len(good_records)
    for row, record in zip(report.rows, good_records):
        assert row.epsilon_pld == pytest.approx(record["epsilon"], rel=1e-9, abs=1e-12)


def test_rdp_bounds_pld_in_every_row(good_records):
    report = audit.audit_ledger(good_records, accountant="both")
    assert not report.notes
    for row in report.rows:
        assert row.epsilon_rdp >= row.epsilon_pld
    assert report.rows[0].epsilon_rdp > 0


def test_fast_path_equals_the_accountants_exactly():
    # Several groups, repeated settings and an int sigma: the audit's cached path must give
    # the accountants' own numbers bit for bit (the tolerance check relies on it).
    history = (((2.5, 0.02, "poisson"), 40), ((2, 0.04, "poisson"), 7), ((1.8, 0.02, "poisson"), 35))
    pld, rdp = audit.reference_epsilons(history, DELTA)
    assert audit._pld_epsilon(history, DELTA) == pld
    assert audit._rdp_epsilon(history, DELTA) == rdp
    events = [event(sigma, q, steps) for (sigma, q, _), steps in history]
    assert pld == true_epsilon(events)
    assert rdp == true_epsilon(events, accountant=RdpAccountant)
    assert audit._pld_epsilon((), DELTA) == 0.0
    assert audit._pld_epsilon((((0.0, 0.1, "poisson"), 3),), DELTA) == float("inf")


def test_understated_epsilon_names_hospital_and_round(tmp_path, good_records, capsys):
    records = copy.deepcopy(good_records)
    target = next(r for r in records if r["hospital"] == "b" and r["round"] == 2)
    target["epsilon"] *= 0.99
    assert audit.main([str(save(tmp_path / "l.jsonl", records)), "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "DISCREPANCIES (1)" in out
    assert "1. round 2, hospital b:" in out and "understated" in out


def test_overstated_epsilon_is_a_mismatch(good_records):
    records = copy.deepcopy(good_records)
    records[0]["epsilon"] *= 1.001
    report = audit.audit_ledger(records)
    assert not report.ok and "overstated" in report.discrepancies[0]


def test_epsilon_over_budget_fails(tmp_path, good_records, capsys):
    records = copy.deepcopy(good_records)
    for record in records:
        if record["hospital"] == "a":
            record["max_epsilon"] = 0.25  # below what "a" has spent since round 1
    assert audit.main([str(save(tmp_path / "l.jsonl", records)), "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "round 1, hospital a: reported epsilon" in out and "exceeds the hospital's max_epsilon 0.25" in out


def test_changed_delta_fails(tmp_path, good_records, capsys):
    records = copy.deepcopy(good_records)
    target = next(r for r in records if r["hospital"] == "a" and r["round"] == 3)
    target["delta"] = 1e-6
    assert audit.main([str(save(tmp_path / "l.jsonl", records)), "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "round 3, hospital a: delta changed from 1e-05 to 1e-06" in out


@pytest.mark.parametrize("change, message", [
    ({"sampling": "shuffle"}, "unsupported sampling 'shuffle'"),
    ({"sampling_rate": 0}, "sampling_rate 0 must be a number in (0, 1]"),
    ({"noise_multiplier": -1.0}, "noise_multiplier -1.0 must be"),
    ({"steps": 2.5}, "steps 2.5 must be an integer"),
    ({"round": 1}, "round does not increase"),
    ({"status": "budget_exhausted"}, "status budget_exhausted but steps 20"),
    ({"max_epsilon": 9.0}, "max_epsilon changed from 8.0 to 9.0"),
    ({"delta": 1.5}, "delta 1.5 must be a number in (0, 1)"),
    ({"prior_events": [event(1.0, 0.1, 5)]}, "prior_events on a later record"),
])
def test_bad_fields_are_discrepancies(good_records, change, message):
    records = copy.deepcopy(good_records)
    target = next(r for r in records if r["hospital"] == "a" and r["round"] == 2)
    target.update(change)
    report = audit.audit_ledger(records, accountant="pld")
    assert not report.ok
    assert any(d.startswith("round") and "hospital a" in d and message in d for d in report.discrepancies), \
        report.discrepancies


def test_malformed_line_exits_2_with_one_line(tmp_path, good_records):
    path = save(tmp_path / "privacy_ledger.jsonl", good_records)
    with open(path, "a") as handle:
        handle.write('{"round": 4, "hospital": "a", "stat\n')  # a write cut short
    result = run_cli(path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"line {len(good_records) + 1}" in lines[0] and str(path) in lines[0]


def test_missing_field_and_missing_prior_events_exit_2(tmp_path, good_records, capsys):
    records = copy.deepcopy(good_records)
    del records[4]["steps"]
    assert audit.main([str(save(tmp_path / "a.jsonl", records))]) == 2
    assert "line 5: missing field(s) steps" in capsys.readouterr().err
    records = copy.deepcopy(good_records)
    del records[1]["prior_events"]
    assert audit.main([str(save(tmp_path / "b.jsonl", records))]) == 2
    assert "first record of hospital 'b' has no prior_events" in capsys.readouterr().err


def test_missing_file_exits_2(tmp_path):
    result = run_cli(tmp_path / "nope.jsonl")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "no such file" in result.stderr


def test_empty_run_dir_exits_2(tmp_path, capsys):
    assert audit.main([str(tmp_path)]) == 2
    assert f"has no {audit.LEDGER_NAME}" in capsys.readouterr().err


def test_json_output_parses(tmp_path, good_records, capsys):
    path = save(tmp_path / "l.jsonl", good_records)
    assert audit.main([str(path), "--json", "--accountant", "pld", "--jobs", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["discrepancies"] == []
    assert len(data["rows"]) == len(good_records)
    assert {h["hospital"] for h in data["hospitals"]} == {"a", "b", "c"}
    assert all(row["epsilon_rdp"] is None for row in data["rows"])  # pld only: no RDP computed
    assert data["federation_max"]["epsilon_pld"] == max(h["epsilon_pld"] for h in data["hospitals"])


def test_plot_writes_png(tmp_path, good_records, capsys):
    path = save(tmp_path / "l.jsonl", good_records)
    png = tmp_path / "eps.png"
    assert audit.main([str(path), "--plot", str(png), "--accountant", "rdp", "--jobs", "1"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "eps RDP" in out and "eps PLD" not in out


def test_audit_imports_nothing_that_trains():
    code = ("import sys, server.audit; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'tensorflow', 'tf_keras', 'keras', 'flwr', 'common', 'client', 'tensorflow_privacy'}), "
            "sorted(m for m in sys.modules if m.startswith('server.') and not m.startswith('server.audit')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.stdout.strip() == "[] []", result.stdout + result.stderr


def test_parallel_audit_matches_serial(good_records, monkeypatch):
    monkeypatch.setattr(audit.accounting, "PARALLEL_MIN_HISTORIES", 2)  # force the process pool on a small ledger
    serial = audit.audit_ledger(good_records, jobs=1)
    audit._pld_epsilon.cache_clear()  # make the workers compute rather than inherit the figures
    audit._rdp_epsilon.cache_clear()
    parallel = audit.audit_ledger(good_records, jobs=2)
    assert parallel.ok
    assert [(r.epsilon_pld, r.epsilon_rdp) for r in parallel.rows] == \
        [(r.epsilon_pld, r.epsilon_rdp) for r in serial.rows]
