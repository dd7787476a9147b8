"""Issue 12's bad inputs (refused with one line before start-up), checkpoints and lost charges."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from common.data import load_dataset
from common.errors import UserError
from common.privacy import PrivacyEvent, epsilon
from server import checkpoint
from server.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parent.parent


def test_duplicate_yaml_keys_are_refused_with_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 3\ndp:\n  noise_multiplier: 1.0\n  noise_multiplier: 0.1\n")
    with pytest.raises(UserError, match="'noise_multiplier' appears twice"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "'seed' must be >= 0"),
    (f"seed={2**32}", "'seed' must be < 4294967296"),
    ("simulation.cpus_per_client=100", "CPU cores"),
    ("train.aggregator=mean", "fedavg | median | trimmed_mean"),
    ("train.min_hospitals=0", "'train.min_hospitals' must be >= 1"),
    ("train.round_timeout=0", "'train.round_timeout' must be > 0"),
])
def test_out_of_range_settings_are_refused(override, message):
    with pytest.raises(UserError, match=message.replace("|", r"\|")):
        load_config(None, [override])


def test_odometer_dir_naming_a_file_is_refused(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(UserError, match="names a file"):
        load_config(None, [f"privacy.odometer_dir={target}"])


@pytest.mark.parametrize("override, message", [
    (f"seed={2**40}", "error: config key 'seed'"),
    # Every hospital would refuse it in round 1, and the run would end with no model.
    ("privacy.delta=0.01", "error: privacy.delta: hospital-0: delta 0.01 is not below 1/n"),
    # Read as "train on these images" while the digits trained.
    ("data.path=/somewhere/images", "error: config key 'data.path' is set (/somewhere/images) but data.source is digits"),
])
def test_simulate_refuses_bad_input_before_start_up(tmp_path, override, message):
    done = subprocess.run([sys.executable, "simulate.py", "--set", override, "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _npz(path, labels):
    images = np.zeros((len(labels), 8, 8), np.uint8)
    np.savez(path, train_images=images, train_labels=np.asarray(labels))


def test_labels_of_one_class_are_refused(tmp_path):
    _npz(tmp_path / "sevens.npz", [7] * 40)
    with pytest.raises(UserError, match="every training label is 7"):
        load_dataset("npz", str(tmp_path / "sevens.npz"))


def test_a_huge_label_is_refused_before_anything_is_sized_by_it(tmp_path):
    _npz(tmp_path / "huge.npz", [0, 1] * 20 + [10**9])
    with pytest.raises(UserError, match="largest label is 1000000000"):
        load_dataset("npz", str(tmp_path / "huge.npz"))


def test_checkpoint_round_trip_keeps_only_the_latest_weights(tmp_path):
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
    for number in (1, 2):
        checkpoint.save(tmp_path, checkpoint.Checkpoint(number, [w * number for w in weights], {"can_train": {"h": True}},
                                                        [{"round": r} for r in range(1, number + 1)], [11, 12]))
    saved = checkpoint.load(tmp_path)
    assert saved.round == 2 and saved.flower_runs == [11, 12] and saved.strategy == {"can_train": {"h": True}}
    np.testing.assert_array_equal(saved.weights[0], weights[0] * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "weights-00002.npz"]


def test_odometer_charges_without_a_ledger_record_are_ledgered_as_lost(tmp_path):
    """A run stopped after the hospital charged round 3 but before the coordinator recorded it."""
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    prior = [PrivacyEvent(2.0, 0.1, 40)]
    event = PrivacyEvent(1.5, 0.08, 13)
    odometer = tmp_path / "odometer"
    odometer.mkdir()
    charges = [e.to_dict() | {"hospital": "hospital-0", "run": 99, "round": 0} for e in prior]
    for number in (1, 2, 3):
        charges.append(event.to_dict() | {"hospital": "hospital-0", "run": 5, "round": number})
    (odometer / "simulation.jsonl").write_text("".join(json.dumps(c) + "\n" for c in charges) + "{damaged\n")
    for number in (1, 2):
        record = event.to_dict() | {"round": number, "hospital": "hospital-0", "status": "trained",
                                    "epsilon": epsilon(prior + [event] * number, 1e-5), "delta": 1e-5,
                                    "max_epsilon": 8.0, "accountant": "pld", "num_examples": 400}
        ledger.append(record, prior_events=[e.to_dict() for e in prior])
    lost = checkpoint.ledger_lost_charges(ledger, odometer, [5])
    assert [(r["round"], r["status"], r["steps"]) for r in lost] == [(3, "lost", 13)]
    assert lost[0]["epsilon"] == pytest.approx(epsilon(prior + [event] * 3, 1e-5), rel=1e-12)
    assert "prior_events" not in lost[0]
    assert checkpoint.ledger_lost_charges(PrivacyLedger(ledger.path), odometer, [5]) == []  # once only
    assert os.path.getsize(ledger.path) > 0


def test_first_signal_asks_for_a_stop_at_the_round_boundary_second_stops_now(tmp_path):
    import signal

    from server.server_app import StopFlag

    stop = StopFlag(tmp_path / "STOP")
    stop.install()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()  # the round loop sees this after the current round
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    fresh = StopFlag(tmp_path / "STOP")
    assert not fresh.requested()
    (tmp_path / "STOP").touch()  # the file contract: simulate.py or an operator creates it
    assert fresh.requested()


@pytest.mark.parametrize("run_config, words", [
    ({"rounds": -1}, "'rounds' must be >= 1"),
    ({"config-path": "configs/no-such.yaml"}, "set the run-config key config-path"),
    ({"run-dir": "EXISTING"}, "the run-config key run-dir"),
])
def test_a_deployments_run_config_mistake_is_one_line_not_a_traceback(tmp_path, capsys, run_config, words):
    from flwr.app import Context, RecordDict

    from server.server_app import main

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text("{}\n")
    run_config = {k: str(existing) if v == "EXISTING" else v for k, v in run_config.items()}
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    # The config is read before the grid is used: a deployment's grid is never reached.
    main(grid=object(), context=context)
    out = capsys.readouterr().out.strip()
    assert out.startswith("error: ") and words in out and out.count("\n") == 0, out
    assert (existing / "metrics.jsonl").read_text() == "{}\n"  # nothing lost
