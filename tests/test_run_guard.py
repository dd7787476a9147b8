"""A Flower run starts once and soon after its submission (server/run_guard.py)."""
from datetime import datetime, timedelta, timezone

from server.run_guard import STALE_RUN_SECONDS, refusal

NOW = datetime(2026, 12, 2, 21, 0, tzinfo=timezone.utc)


def test_a_run_started_soon_after_submission_goes_on_once(tmp_path):
    facts = {"run_id": 123, "pending_at": (NOW - timedelta(seconds=40)).isoformat()}
    assert refusal(facts, tmp_path, NOW) is None
    again = refusal(facts, tmp_path, NOW + timedelta(seconds=5))  # the SuperLink restarted and starts it again
    assert again is not None and "second time" in again and "resume-dir" in again
    assert refusal({**facts, "run_id": 124}, tmp_path, NOW) is None  # another run is another run


def test_a_run_that_waited_past_the_limit_is_refused_and_leaves_no_marker(tmp_path):
    late = {"run_id": 7, "pending_at": (NOW - timedelta(seconds=STALE_RUN_SECONDS + 60)).isoformat()}
    text = refusal(late, tmp_path, NOW)
    assert text is not None and "submitted 31 minutes ago" in text and "\n" not in text
    assert not (tmp_path / "7").exists()


def test_without_flower_facts_nothing_is_refused(tmp_path):
    assert refusal({}, tmp_path, NOW) is None
    assert refusal({"pending_at": "not a time", "run_id": "x"}, tmp_path, NOW) is None
