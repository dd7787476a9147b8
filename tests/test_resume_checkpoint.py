"""A damaged checkpoint is one line before Flower starts; an interrupted run says how to resume (issue 26 item 2)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from server import checkpoint, simulation
from server.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--set", "hospitals=2", "--set", "train.batch_size=32", "--set", "model.filters=[8,16]",
         "--set", "model.dense_units=16", "--set", "train.local_epochs=1", "--set", "train.fraction_evaluate=0"]


def _saved(directory: Path) -> Path:
    checkpoint.save(directory, Checkpoint(1, [np.ones((3, 2), np.float32), np.zeros(2, np.float32)], {},
                                          [{"round": 1, "accuracy": 0.5}], [7]))
    return directory


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_what_save_writes_loads(tmp_path):
    loaded = checkpoint.load(_saved(tmp_path))
    assert loaded.round == 1 and loaded.flower_runs == [7] and [w.shape for w in loaded.weights] == [(3, 2), (2,)]


@pytest.mark.parametrize("damage, words", [
    (lambda d: _truncate(d / "state.json"), "state.json is damaged (not whole JSON"),
    (lambda d: _truncate(d / "weights-00001.npz"), "weights-00001.npz are damaged"),
    (lambda d: (d / "weights-00001.npz").write_bytes(b""), "weights-00001.npz are damaged"),
    (lambda d: (d / "weights-00001.npz").unlink(), "names weights-00001.npz, which is missing"),
    (lambda d: (d / "state.json").write_text(json.dumps({"format": 1, "round": "1"})), "no weights, strategy"),
    (lambda d: (d / "state.json").write_text(
        json.dumps({"format": 1, "round": 1, "weights": "../elsewhere.npz", "strategy": {}, "metrics": [],
                    "flower_runs": []})), "is not a weights-<round>.npz file name"),
])
def test_a_damaged_checkpoint_is_a_user_error_naming_the_file(tmp_path, damage, words):
    damage(_saved(tmp_path))
    with pytest.raises(UserError, match="checkpoint") as caught:
        checkpoint.load(tmp_path)
    assert words in str(caught.value) and str(tmp_path) in str(caught.value)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real one-round run on the digits (the cheapest run that writes a checkpoint)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    odometer = tmp_path_factory.mktemp("odometer")
    result = subprocess.run([sys.executable, "simulate.py", *SMALL, "--set", "rounds=1",
                             "--set", f"privacy.odometer_dir={odometer}", "--out", str(run)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["state.json", "weights"])
def test_resume_from_a_truncated_checkpoint_is_one_line_and_exit_2(finished_run, tmp_path, damaged):
    checkpoint.load(finished_run / "checkpoint")  # what a real run writes passes the checks
    run = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)
    target = run / "checkpoint" / "state.json" if damaged == "state.json" else \
        next((run / "checkpoint").glob("weights-*.npz"))
    _truncate(target)
    status = (run / "status.json").read_bytes()
    result = subprocess.run([sys.executable, "simulate.py", "--resume", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], lines
    assert (run / "status.json").read_bytes() == status  # not rewritten with a wrong reason
    assert not (run / "flower.log").exists() or "Resuming" not in (run / "flower.log").read_text()


class _StoppedSimulation:
    """Stands in for Flower: leaves what the ServerApp leaves after a Ctrl-C honoured after round 1."""

    stalled = False

    def __init__(self, config, resolved, out, resume, verbose):
        self.out, self.stop_requests = out, 0

    def start_superlink(self):
        pass

    def wait_for_superlink(self):
        pass

    def stream(self, show):
        self.stop_requests = 1
        _saved(self.out / "checkpoint")
        (self.out / "status.json").write_text(json.dumps({"state": "interrupted", "exit_code": 130}))

    def cleanup(self):
        pass

    def disk_filled(self):
        return False


def test_an_interrupted_run_ends_with_one_line_saying_how_to_resume(tmp_path, monkeypatch, capsys):
    from common.config import load_config

    config = load_config(simulation.default_config_path(), [])
    monkeypatch.setattr(simulation, "prepare", lambda args: (config, {}, tmp_path))
    monkeypatch.setattr(simulation, "Simulation", _StoppedSimulation)
    monkeypatch.setattr(simulation, "Progress", lambda rounds: type("P", (), {"show": print, "close": lambda s: None})())
    assert simulation.main([]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"interrupted: stopped after round 1; the run directory and odometers keep what was written; "
                   f"continue with: python simulate.py --resume {tmp_path}"]


def test_ctrl_c_before_the_run_starts_says_so(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulation, "prepare", interrupted)
    assert simulation.main([]) == 130
    assert capsys.readouterr().err.strip() == "interrupted before the run started: nothing was written"
