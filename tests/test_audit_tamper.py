"""A tampered ledger is a discrepancy (exit 1) naming the record and the problem, not an unreadable
file with advice to edit it (issue 26 item 6). Bare ledger files: no run directory to compare with."""
from __future__ import annotations

import copy

import pytest

from server import audit
from tests.test_audit import good_records, save  # noqa: F401 - good_records is a fixture


def _audit(tmp_path, records, capsys) -> tuple[int, str]:
    code = audit.main([str(save(tmp_path / "ledger.jsonl", records)), "--accountant", "pld", "--jobs", "1"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_reordered_ledger_is_a_discrepancy(tmp_path, good_records, capsys):
    code, out = _audit(tmp_path, good_records[::-1], capsys)
    assert code == 1, out
    assert "a's first record (round 3) has no prior_events: records were removed or reordered" in out
    assert "round does not increase" in out and "write \"prior_events\"" not in out


def test_a_removed_first_record_is_a_discrepancy(tmp_path, good_records, capsys):
    code, out = _audit(tmp_path, good_records[1:], capsys)
    assert code == 1, out
    assert "round 2, hospital a: a's first record (round 2) has no prior_events: records were removed" in out


@pytest.mark.parametrize("name, shown", [(None, "null"), ("", '""')])
def test_a_blanked_hospital_is_named_on_its_own_record(tmp_path, good_records, capsys, name, shown):
    records = copy.deepcopy(good_records)
    records[1]["hospital"] = name  # b's round 1: its round 2 then looks like b's first record
    code, out = _audit(tmp_path, records, capsys)
    assert code == 1, out
    assert f"  1. round 1, hospital {shown}: hospital {name!r} must be a non-empty string" in out
    report = audit.audit_ledger(records, accountant="pld")
    assert report.rows[1].discrepancies[0] == 1


@pytest.mark.parametrize("field, value, message", [
    ("round", 10**400, "round 10000000000000000000...(401 characters) must be an integer from 1 to 1e+06"),
    ("round", 0, "round 0 must be an integer from 1"),
    ("num_examples", 10**12, "num_examples 1000000000000 must be an integer from 0 to 1e+09"),
    ("epsilon", 1e300, "epsilon 1e+300 must be a number from 0 to 1e+06"),
    ("max_epsilon", 1e300, "max_epsilon 1e+300 must be a number in (0, 1e+06]"),
    ("delta", 1e-200, "delta 1e-200 is below 1e-30"),
    ("noise_multiplier", 1e300, "noise_multiplier 1e+300 is above 1e+06"),  # overflowed the accountant
    ("sampling_rate", 1e-300, "sampling_rate 1e-300 is below 1e-09"),
])
def test_every_number_is_bounded(tmp_path, good_records, capsys, field, value, message):
    records = copy.deepcopy(good_records)
    records[-1][field] = value  # c's last record: no later record of c to disturb
    code, out = _audit(tmp_path, records, capsys)
    assert code == 1, out
    assert message in out, out
    assert len(max(out.splitlines(), key=len)) < 400  # a 400-digit value is cut short


def test_num_examples_changed_mid_run_is_flagged(tmp_path, good_records, capsys):
    records = copy.deepcopy(good_records)
    target = next(r for r in records if r["hospital"] == "b" and r["round"] == 2)
    target["num_examples"] += 100
    code, out = _audit(tmp_path, records, capsys)
    assert code == 1, out
    assert "hospital b: num_examples changed from 1600 (round 1) to 1700 (round 2)" in out


@pytest.mark.parametrize("change", [
    {"status": "budget_exhausted", "steps": 10**400},   # the declined-with-steps message
    {"delta": 10**299},                                 # the changed-delta message (an int below float range)
    {"max_epsilon": 10**299},
    {"round": 10**400},                                 # the next record's "round does not increase"
])
def test_no_message_prints_a_huge_number_verbatim(tmp_path, good_records, capsys, change):
    records = copy.deepcopy(good_records)
    target = next(r for r in records if r["hospital"] == "a" and r["round"] == 2)
    target.update(change)
    code, out = _audit(tmp_path, records, capsys)
    assert code == 1, out
    assert len(max(out.splitlines(), key=len)) < 600, max(out.splitlines(), key=len)
    assert "characters)" in out  # cut short, with its length


def test_added_prior_events_compose_and_are_checked(tmp_path, good_records, capsys):
    # Spend that appeared during the run (another run, a shard sharing images) on a later record.
    from tests.test_audit import event, true_epsilon

    records = copy.deepcopy(good_records)
    added = event(2.5, 0.02, 15)
    history = []
    for record in (r for r in records if r["hospital"] == "a"):
        history += record.get("prior_events", []) + ([added] if record["round"] == 2 else [])
        history.append(record)
        if record["round"] == 2:
            record["added_prior_events"] = [added]
        record["epsilon"] = true_epsilon(history)
        record["max_epsilon"] = 20.0
    code, out = _audit(tmp_path, records, capsys)
    assert code == 0, out
    report = audit.audit_ledger(records, accountant="pld")
    assert next(h for h in report.hospitals if h.hospital == "a").prior_steps == 50 + 15
    # Left out of the figure, the record understates; a bad event is named.
    records[3]["added_prior_events"] = [event(2.5, 0.02, 15) | {"noise_multiplier": -1}]
    code, out = _audit(tmp_path, records, capsys)
    assert code == 1 and "round 2, hospital a: added_prior_events[0]: noise_multiplier -1 must be" in out, out
