"""A whole simulation on a disk that fills up (issue 26 item 3), on a real full file system.

The run directory is a small tmpfs mounted in a user and mount namespace of this test's own
(`unshare --user --map-root-user --mount`: no root, nothing on the host is mounted), and
simulate.py runs inside it (`nsenter`). Once round 1 is saved, the test fills the file system
to the last byte. What a person must see: one line naming the file that could not be written
and "no space left", exit 1, status.json saying so, no traceback, no temporary file; after
space is freed, `--resume` ends the run with every planned round's update in the model and
metrics, and a ledger (no duplicate) that recomputes and audits against the odometer.
"""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_faults import SMALL, TIMEOUT, _check_ledger

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3
FULL = "no space left on the device"


class FullableDisk:
    """A tmpfs at `mount` in a namespace held by a sleeping process; seen from here via /proc."""

    def __init__(self, mount: Path, size: str = "8m"):
        self.mount = mount
        mount.mkdir()
        script = f'mount -t tmpfs -o size={size} tmpfs "{mount}" && echo mounted && exec sleep 3600'
        try:
            self.holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except FileNotFoundError:
            pytest.skip("needs unshare (util-linux)")
        if self.holder.stdout.readline().strip() != "mounted":
            self.holder.kill()
            pytest.skip(f"cannot mount a tmpfs in a user namespace here: {self.holder.stderr.read().strip()}")

    def seen(self, path: Path) -> Path:
        """`path` (under the mount) as this process, outside the namespace, can reach it."""
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def inside(self, argv: list[str], cwd: Path) -> list[str]:
        """`argv` run in the namespace, from `cwd` (nsenter itself starts in the namespace's root)."""
        return ["nsenter", f"--target={self.holder.pid}", "--user", "--mount", "--preserve-credentials",
                "sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *argv]

    def fill(self) -> Path:
        ballast = self.seen(self.mount / "ballast")
        with open(ballast, "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
        return ballast

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(timeout=30)


def _simulate(disk: FullableDisk, args: list[str], tmp_path: Path, name: str) -> subprocess.Popen:
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen(disk.inside([sys.executable, "simulate.py", *args], ROOT), stdout=out, stderr=err,
                            start_new_session=True)


def _finish(process, tmp_path: Path, name: str) -> tuple[int, str, str]:
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return code, (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ledger_rounds(run: Path) -> set[int]:
    try:
        return {json.loads(line)["round"] for line in (run / "privacy_ledger.jsonl").read_text().splitlines()}
    except (OSError, ValueError):
        return set()


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_stops_with_one_line_and_resume_repeats_the_unsaved_round(tmp_path):
    disk = FullableDisk(tmp_path / "disk")
    try:
        _full_disk_then_resume(disk, tmp_path)
    finally:
        disk.close()


def _full_disk_then_resume(disk: FullableDisk, tmp_path: Path) -> None:
    run, odometer = disk.mount / "run", tmp_path / "odometer"  # the odometer is on a disk with room
    view = disk.seen(run)
    # Fixed noise and a roomy budget: a repeated round is affordable (with planned noise a
    # round whose update was lost has spent its share of the budget; see README).
    args = [*SMALL, "--set", "hospitals=2", "--set", f"rounds={ROUNDS}", "--set", "train.fraction_evaluate=0",
            "--set", "train.local_epochs=5", "--set", "dp.noise_multiplier=1.5", "--set", "privacy.max_epsilon=50",
            "--set", f"privacy.odometer_dir={odometer}"]
    process = _simulate(disk, [*args, "--out", str(run)], tmp_path, "filled")
    try:
        deadline = time.monotonic() + TIMEOUT
        while ((_json(view / "status.json") or {}).get("rounds_completed") or 0) < 1:
            assert process.poll() is None, (tmp_path / "filled.out").read_text() + (tmp_path / "filled.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ballast = disk.fill()  # round 2 is training: whatever it writes next finds the disk full
    except BaseException:
        process.kill()
        raise
    code, out, err = _finish(process, tmp_path, "filled")

    assert code == 1, out + err
    assert "Traceback" not in out + err and "Logging error" not in out + err, out + err
    full = [line for line in (out + err).splitlines() if FULL in line]
    assert full and full[0].startswith(f"error: cannot write {run}/"), out + err  # names the file
    named = [line.split(": ")[1].removeprefix("cannot write ") for line in full]
    assert len(named) == len(set(named)), full  # one line per file, never a repeat
    status = _json(view / "status.json")
    assert status["state"] == "failed" and status["exit_code"] == 1 and FULL in status["reason"], status
    assert status["rounds_completed"] == 1, (status, out, err, sorted(str(p) for p in view.rglob("*")))
    assert not list(view.rglob("*.tmp")), list(view.rglob("*"))  # no stray temporary
    unsaved = sorted(_ledger_rounds(view) - {1})  # charged and ledgered, but the model after it not saved

    ballast.unlink()  # space is freed
    process = _simulate(disk, ["--resume", str(run)], tmp_path, "resumed")
    code, out, err = _finish(process, tmp_path, "resumed")
    assert code == 0, out + err
    assert "Traceback" not in out + err and FULL not in out + err
    if unsaved:
        assert f"Round(s) {', '.join(map(str, unsaved))} charged the hospitals" in out, out
    metrics = [json.loads(line) for line in (view / "metrics.jsonl").read_text().splitlines()]
    rounds = [m["round"] for m in metrics]
    # Every planned update is in the model: the unsaved round was repeated, not skipped.
    assert len(rounds) == ROUNDS and rounds == sorted(set(rounds)) and not set(rounds) & set(unsaved), rounds
    status = _json(view / "status.json")
    assert status["state"] == "finished" and status["rounds_completed"] == rounds[-1], status
    assert _json(view / "checkpoint" / "state.json")["round"] == rounds[-1]
    assert not list(view.rglob("*.tmp"))
    copy = tmp_path / "run-copy"  # the audit runs out here, where the namespace's mount is not seen
    shutil.copytree(view, copy)
    records = _check_ledger(copy, odometer)
    pairs = [(r["round"], r["hospital"]) for r in records]
    assert len(pairs) == len(set(pairs))  # no duplicate
    assert {r["round"] for r in records if r["status"] == "trained"} >= set(rounds)
