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


def test_incremental_composition_agrees_with_the_accountant():
    # The audit composes each record's round onto the hospital's PLD so far instead of
    # self-composing every group from scratch; it must stay within SELF_CHECK_REL_TOL of
    # PLDAccountant, far inside the 1e-6 the reported figures are held to.
    prior = ((2.5, 0.02, "poisson"), 40)
    chain = [(((prior, ((2.0, 0.04, "poisson"), 7 * k))), DELTA) for k in range(1, 16)]
    chain.insert(5, ((prior, ((2.0, 0.04, "poisson"), 35), ((1.8, 0.02, "poisson"), 3)), DELTA))  # a new group
    chain = [(tuple(h), d) for h, d in chain]
    figures = audit.accounting._chain_epsilons(chain, want_rdp=True)
    for index in (0, 5, 6, len(chain) - 1):
        history, delta = chain[index]
        pld, rdp = audit.reference_epsilons(history, delta)
        assert figures[index][0] == pytest.approx(pld, rel=audit.checks.SELF_CHECK_REL_TOL)
        assert figures[index][1] == rdp


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


def test_missing_field_exits_2(tmp_path, good_records, capsys):
    # A first record without prior_events is a tampered ledger, exit 1: tests/test_audit_tamper.py.
    records = copy.deepcopy(good_records)
    del records[4]["steps"]
    assert audit.main([str(save(tmp_path / "a.jsonl", records))]) == 2
    assert "line 5: missing field(s) steps" in capsys.readouterr().err


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
    # The per-round table is printed with --rounds only (the summary comes first, one line per hospital).
    assert audit.main([str(path), "--plot", str(png), "--accountant", "rdp", "--jobs", "1", "--rounds"]) == 0
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


# ------------------------------------------------------------------ the ledger against the run's other files

# Every hospital asked every round with the configured settings; "c" declines in round 3.
CLEAN = [(rnd, h, 2.0, q, steps, budget, [])
         for rnd in (1, 2, 3)
         for h, q, steps, budget in (("a", 0.02, 20, 8.0), ("b", 0.04, 10, 8.0), ("c", 0.02, 20, 0.3))]
CONFIG = {"hospitals": 3, "rounds": 3, "train": {"batch_size": 64, "local_epochs": 0.4, "fraction_train": 1.0},
          "dp": {"noise_multiplier": 2.0}}


def run_dir(path: Path, records: list[dict], config=None) -> Path:
    """A run directory: ledger, config.yaml and the metrics.jsonl the server would write for it."""
    import yaml

    path.mkdir(parents=True, exist_ok=True)
    save(path / audit.LEDGER_NAME, records)
    (path / "config.yaml").write_text(yaml.safe_dump(config or CONFIG))
    counts = {}
    for record in records:
        counts[record["round"]] = counts.get(record["round"], 0) + (record["status"] == "trained")
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"round": rnd, "hospitals_trained": n}) + "\n" for rnd, n in sorted(counts.items())))
    return path


@pytest.fixture(scope="module")
def clean_records(tmp_path_factory) -> list[dict]:
    records = write_ledger(tmp_path_factory.mktemp("clean") / "l.jsonl", CLEAN)
    assert [r["status"] for r in records if r["hospital"] == "c"] == ["trained", "trained", "budget_exhausted"]
    return records


def context_findings(path: Path, *extra) -> list[str]:
    report = audit.audit_ledger(audit.read_ledger(path), accountant="pld",
                                context=audit.read_context(path, list(extra)))
    return report.discrepancies


def test_a_consistent_run_directory_passes(tmp_path, clean_records):
    path = run_dir(tmp_path / "run", clean_records)
    assert context_findings(path) == []
    result = run_cli(path, "--jobs", "1")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_removed_last_record_and_a_removed_history_are_found(tmp_path, clean_records):
    without_last = [r for r in clean_records if not (r["hospital"] == "b" and r["round"] == 3)]
    found = context_findings(run_dir(tmp_path / "one", without_last))
    assert any("hospital b: records stop at round 2" in d for d in found), found
    # metrics.jsonl written for the full run still says three trained in round 3... rewrite it from
    # the full ledger so that the metrics check speaks too.
    path = run_dir(tmp_path / "two", clean_records)
    save(path / audit.LEDGER_NAME, without_last)
    assert any("round 3: metrics.jsonl says 2 hospitals trained but the ledger has 1" in d
               for d in context_findings(path))
    without_b = [r for r in clean_records if r["hospital"] != "b"]
    found = context_findings(run_dir(tmp_path / "three", without_b))
    assert any("config.yaml has 3 hospitals but the ledger has records of only 2" in d for d in found), found


def test_trained_with_zero_steps_is_found(clean_records):
    records = copy.deepcopy(clean_records)
    records[1]["steps"] = 0
    assert any("status trained but steps 0" in d for d in audit.audit_ledger(records, accountant="pld").discrepancies)


def test_sampling_rate_times_examples_must_be_the_batch_size(tmp_path, clean_records):
    records = copy.deepcopy(clean_records)
    for record in records:
        if record["hospital"] == "b":
            record["num_examples"] = 800  # the ledger claims a smaller data set than q implies
    found = context_findings(run_dir(tmp_path / "run", records))
    assert any("hospital b: sampling_rate 0.04 x num_examples 800 = 32" in d for d in found), found


def test_consistently_recomputed_edits_are_caught_by_the_config(tmp_path):
    # Sigma raised for "b" and steps cut for "c", every epsilon recomputed to match: only
    # config.yaml can tell.
    plan = [(rnd, h, 3.0 if h == "b" else s, q, 5 if h == "c" else n, m, p) for rnd, h, s, q, n, m, p in CLEAN]
    records = write_ledger(tmp_path / "l.jsonl", plan)
    assert audit.audit_ledger(records, accountant="pld").ok  # self-consistent on its own
    found = context_findings(run_dir(tmp_path / "run", records))
    assert any("hospital b: noise_multiplier 3.0 differs from config.yaml's dp.noise_multiplier 2.0" in d
               for d in found), found
    assert any("hospital c: steps 5 differ from config.yaml's train.local_epochs 0.4" in d for d in found), found


def test_a_planned_sigma_must_stay_fixed_within_the_run(tmp_path):
    plan = [(rnd, h, 2.5 if (h == "a" and rnd == 3) else s, q, n, m, p) for rnd, h, s, q, n, m, p in CLEAN]
    records = write_ledger(tmp_path / "l.jsonl", plan)
    config = copy.deepcopy(CONFIG)
    config["dp"]["noise_multiplier"] = "auto"
    found = context_findings(run_dir(tmp_path / "run", records, config))
    assert found == ["round 3, hospital a: noise_multiplier changed from 2.0 to 2.5 within the run "
                     "(a planned sigma is fixed for a hospital's whole run)"], found


def test_a_charge_missing_from_the_odometer_is_found(tmp_path, clean_records):
    from client.odometer import PrivacyOdometer
    from common.privacy import PrivacyEvent

    path = run_dir(tmp_path / "run", clean_records)
    odometer = PrivacyOdometer(tmp_path / "a.jsonl", "a", 8.0, DELTA)
    charges = [r for r in clean_records if r["hospital"] == "a"]
    for record in charges:
        event = PrivacyEvent(record["noise_multiplier"], record["sampling_rate"], record["steps"])
        odometer.charge(event, run=1, round_number=record["round"], epsilon_after=record["epsilon"])
    assert context_findings(path, tmp_path / "a.jsonl") == []
    assert run_cli(path, "--odometer", tmp_path / "a.jsonl", "--jobs", "1").returncode == 0

    # The odometer lost round 2 (its line removed): both the chain and the missing charge show.
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "cut.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")
    found = context_findings(path, tmp_path / "cut.jsonl")
    assert any("breaks the hash chain" in d for d in found), found
    assert any(d.startswith("round 2, hospital a: the ledger's charge") for d in found), found
    result = run_cli(path, "--odometer", tmp_path / "nope.jsonl")
    assert result.returncode == 2 and "no such file" in result.stderr


def test_a_charge_of_this_run_missing_from_the_ledger_is_found_on_the_odometer(tmp_path, clean_records):
    from client.odometer import PrivacyOdometer
    from common.privacy import PrivacyEvent

    odometer = PrivacyOdometer(tmp_path / "a.jsonl", "a", 8.0, DELTA)
    for record in (r for r in clean_records if r["hospital"] == "a"):
        event = PrivacyEvent(record["noise_multiplier"], record["sampling_rate"], record["steps"])
        odometer.charge(event, run=1, round_number=record["round"], epsilon_after=record["epsilon"])
    # A later run on the same odometer: not ours, and written after this run's last charge, so
    # this run's ledger cannot have seen it. (An earlier run's charge would have to be in the
    # first record's prior_events: tests/test_audit_odometer.py.)
    odometer.charge(PrivacyEvent(1.0, 0.5, 2), run=7, round_number=1, epsilon_after=1.0)
    # The ledger's last round removed, and every file that would have shown it with it.
    last = max(r["round"] for r in clean_records)
    path = run_dir(tmp_path / "run", [r for r in clean_records if r["round"] != last])
    for name in ("metrics.jsonl", "config.yaml"):
        (path / name).unlink()
    report = audit.audit_ledger(audit.read_ledger(path), accountant="pld",
                                context=audit.read_context(path, [tmp_path / "a.jsonl"]))
    implied = next(r["epsilon"] for r in clean_records if r["hospital"] == "a" and r["round"] == last)
    assert report.discrepancies == [f"round {last}, hospital a: odometer {tmp_path / 'a.jsonl'} holds a charge of "
                                    "this run (20 steps) that the ledger lacks: the hospital spent more than the "
                                    f"ledger says (the odometer implies epsilon {implied:.6g} after this round; "
                                    "resume the run to ledger a cut-short round as lost)"]
    assert any("config.yaml, metrics.jsonl, status.json not found beside the ledger" in n for n in report.notes)
    assert run_cli(path, "--odometer", tmp_path / "a.jsonl", "--jobs", "1").returncode == 1
    # An interrupted run has not ledgered its cut-short round yet: a note, not a discrepancy.
    (path / "status.json").write_text(json.dumps({"state": "interrupted", "reason": "stopped"}))
    report = audit.audit_ledger(audit.read_ledger(path), accountant="pld",
                                context=audit.read_context(path, [tmp_path / "a.jsonl"]))
    assert report.discrepancies == [] and any("that the ledger lacks" in n for n in report.notes)


def test_a_budget_raised_in_the_ledger_is_found_against_the_hospitals_plan(tmp_path, clean_records):
    path = run_dir(tmp_path / "run", clean_records)
    plans = {h: {"max-epsilon": r["max_epsilon"], "delta": r["delta"]} for h, r in
             ((r["hospital"], r) for r in clean_records)}
    (path / "plan.json").write_text(json.dumps(plans))
    assert context_findings(path) == []
    plans["a"]["max-epsilon"] = clean_records[0]["max_epsilon"] / 10  # it said 10x less before round 1
    (path / "plan.json").write_text(json.dumps(plans))
    found = context_findings(path)
    assert any(d.startswith("hospital a: max_epsilon") and "privacy plan it sent before round 1" in d
               for d in found), found


@pytest.mark.parametrize("line, code", [
    ('"steps": 41.0', 1),
    ('"steps": 1' + "0" * 400, 1),
    ('"steps": 1000000000000', 1),
    ('"noise_multiplier": 1e-9', 1),
    ('"nested": ' + "[" * 100000 + "]" * 100000, 2),
])
def test_hostile_values_give_a_finding_or_a_refusal_never_a_traceback(tmp_path, good_records, line, code):
    text = json.dumps(good_records[1])
    key = line.split(":")[0]
    if key in text:
        start = text.index(key)
        end = text.index(",", start)
        text = text[:start] + line + text[end:]
    else:
        text = text[:-1] + ", " + line + "}"
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps(good_records[0]) + "\n" + text + "\n")
    result = run_cli(path, "--jobs", "1")
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if code == 2:
        assert len(result.stderr.strip().splitlines()) == 1


def test_plot_into_a_directory_writes_epsilon_png(tmp_path, good_records):
    path = save(tmp_path / "l.jsonl", good_records)
    out = tmp_path / "plots"
    out.mkdir()
    assert audit.main([str(path), "--plot", str(out), "--jobs", "1"]) == 0
    assert (out / "epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "plots.png").exists()
    assert audit.main([str(path), "--plot", str(tmp_path / "missing" / "e.png")]) == 2


def test_with_batch_size_auto_the_batch_follows_from_each_hospitals_examples(tmp_path, clean_records):
    # q = 0.02 with n = 3200 is an expected batch of 64: not what "auto" gives for 3200 (128).
    records = copy.deepcopy(clean_records)
    for record in records:
        record["num_examples"] = 3200 if record["hospital"] != "b" else 1600
    config = copy.deepcopy(CONFIG)
    config["train"]["batch_size"] = "auto"
    found = context_findings(run_dir(tmp_path / "run", records, config))
    assert any("hospital a: sampling_rate 0.02 x num_examples 3200 = 64, but config.yaml's train.batch_size "
               "is auto (expected sampling_rate 0.04)" in d for d in found), found
    # b: "auto" gives 128 for 1600 examples (q 0.08), not the 64 that q 0.04 implies.
    assert any("hospital b: sampling_rate 0.04 x num_examples 1600 = 64" in d for d in found), found
    for record in records:  # the examples that make "auto" give exactly q's batches
        record["num_examples"] = 6400 if record["hospital"] != "b" else 3200
    config["train"]["batch_size"] = "auto"
    found = context_findings(run_dir(tmp_path / "run2", records, config))
    assert not any("sampling_rate" in d for d in found), found


@pytest.mark.parametrize("simulated", [True, False, None])
def test_budgets_in_the_ledger_are_checked_against_the_config(tmp_path, clean_records, simulated):
    # Simulated hospitals take max_epsilon and delta from config.yaml: a ledger that says
    # otherwise is a discrepancy. Deployed ones set their own: a budget above the config's is a note.
    config = copy.deepcopy(CONFIG) | {"privacy": {"max_epsilon": 1.0, "delta": DELTA}}
    path = run_dir(tmp_path / "run", clean_records, config)
    if simulated is not None:
        (path / "status.json").write_text(json.dumps({"state": "finished", "simulated": simulated}))
    report = audit.audit_ledger(audit.read_ledger(path), accountant="pld", context=audit.read_context(path))
    budget_findings = [f for f in report.discrepancies + report.notes if "privacy.max_epsilon" in f]
    if simulated:
        assert sorted(report.discrepancies) == [
            f"hospital {h}: max_epsilon {m} in the ledger, config.yaml's privacy.max_epsilon is 1.0; "
            "a simulated hospital's budget is the config's" for h, m in (("a", 8.0), ("b", 8.0), ("c", 0.3))]
    else:
        assert report.discrepancies == []
        named = sorted(f.split(":")[0] for f in budget_findings)
        assert named == (["hospital a", "hospital b"] if simulated is False else ["hospital a", "hospital b", "hospital c"])
        assert all("node config sets its own" in f for f in budget_findings)
    # The same budgets as the config: nothing to say.
    config["privacy"]["max_epsilon"] = 8.0
    same = [r for r in clean_records if r["hospital"] != "c"]
    path = run_dir(tmp_path / "same", same, config | {"hospitals": 2})
    (path / "status.json").write_text(json.dumps({"state": "finished", "simulated": True}))
    report = audit.audit_ledger(audit.read_ledger(path), accountant="pld", context=audit.read_context(path))
    assert report.ok and not any("privacy." in n for n in report.notes), report.discrepancies + report.notes
