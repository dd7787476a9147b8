"""NaN or inf in any numeric field of an odometer charge fails closed (issue 26 item 7).

json writes and reads NaN and Infinity, so such a line can be perfectly chained (a writer's bug,
or an editor who recomputes the hashes): the field check, not the hash chain, must refuse it."""
import hashlib
import json

import pytest

from client.odometer import OdometerError, PrivacyOdometer
from common.privacy import PrivacyEvent

DELTA = 1e-5


def _rechained(path, edit):
    """Rewrite the odometer with `edit` applied to its second charge, chain and head made consistent."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    edit(records[1])
    lines, previous = [], ""
    for seq, record in enumerate(records, start=1):
        record |= {"seq": seq, "prev": previous}
        lines.append(json.dumps(record))
        previous = hashlib.sha256(lines[-1].encode()).hexdigest()
    path.write_text("".join(line + "\n" for line in lines))
    path.with_name(path.name + ".head").write_text(json.dumps({"seq": len(lines), "last": previous}))


def _charged(path, rounds=3):
    odometer = PrivacyOdometer(path, "h", 100.0, DELTA)
    for number in range(1, rounds + 1):
        assert odometer.reserve(PrivacyEvent(1.0, 0.1, 30), run=1, round_number=number).charged


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("field", ["noise_multiplier", "sampling_rate", "steps", "epsilon_after", "delta", "round"])
def test_a_non_finite_field_fails_closed(tmp_path, field, value):
    path = tmp_path / f"{field}.jsonl"
    _charged(path)
    _rechained(path, lambda record: record.__setitem__(field, value))
    with pytest.raises(OdometerError, match="line 2 is unreadable or was edited: restore it from backup"):
        PrivacyOdometer(path, "h", 100.0, DELTA).spent()


def test_the_rechained_file_is_otherwise_valid(tmp_path):
    path = tmp_path / "h.jsonl"
    _charged(path)
    _rechained(path, lambda record: None)  # the helper itself leaves a readable odometer
    assert len(PrivacyOdometer(path, "h", 100.0, DELTA).records) == 3
