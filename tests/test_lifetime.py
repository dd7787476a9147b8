"""Process lifetime (issue 26 item 4): every process simulate.py starts dies with it, whatever
kills it, SIGKILL of simulate.py alone included, and Ray's daemons that leave the tree too.

The mechanism (server/flower_launch.py): every process of a simulation carries the run's
marker in its environment, and a watchdog started first kills every process carrying it once
simulate.py is gone; the SuperLink and `flwr run` also die by a parent-death signal.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from server.flower_launch import RUN_MARKER, WATCH_SECONDS, marked_processes
from tests.test_faults import SMALL, _kill_tree, _odometer_charges, _start, _wait_for_round

ROOT = Path(__file__).resolve().parent.parent


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.Error:
            continue
    return left


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _describe(procs) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:
            out.append(str(proc.pid))
    return out


# A stand-in for simulate.py: it starts the watchdog, then a child that leaves the process
# tree the way Ray's raylet and GCS can (a double fork into a session of its own), and a child
# whose own child shows no marker (as Ray's agents, whose setproctitle overwrites it).
PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    from server.flower_launch import RUN_MARKER, start_watchdog
    marker = sys.argv[1]
    watchdog = start_watchdog(marker)
    env = dict(os.environ, **{RUN_MARKER: marker})
    unmarked = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], env={}); time.sleep(600)"
    subprocess.Popen([sys.executable, "-c", unmarked], env=env)
    daemon = "import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(600)\\n"
    subprocess.Popen([sys.executable, "-c", daemon], env=env).wait()
    time.sleep(0.5)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_the_watchdog_kills_every_marked_process_even_a_daemon_once_its_parent_is_sigkilled():
    marker = f"test-{os.getpid()}-{time.time_ns()}"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, marker], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    marked = []
    try:
        assert parent.stdout.readline().strip() == "ready"
        marked = marked_processes(marker)
        assert len(marked) == 2, _describe(marked)  # the child and the daemon, not the watchdog
        assert any(proc.ppid() != parent.pid for proc in marked)  # the daemon left the tree
        unmarked = [child for proc in marked for child in proc.children()]
        assert len(unmarked) == 1, _describe(unmarked)
        marked += unmarked
        time.sleep(3 * WATCH_SECONDS)  # the watchdog has listed them all
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        assert _wait_gone(marked, 30) == [], _describe(_alive(marked))
        assert marked_processes(marker) == []
    finally:
        for proc in _alive(marked_processes(marker) + marked):
            proc.kill()
        if parent.poll() is None:
            parent.kill()


def _run_processes(pid: int) -> tuple[list[psutil.Process], str]:
    """Everything the simulation runs now: simulate.py's descendants, and every process with its marker."""
    below = psutil.Process(pid).children(recursive=True)
    marker = None
    for proc in below:
        try:
            marker = proc.environ().get(RUN_MARKER) or marker
        except psutil.Error:
            continue
    assert marker, "no process of the simulation carries the run's marker"
    found = {proc.pid: proc for proc in below}
    found.update({proc.pid: proc for proc in marked_processes(marker)})
    return list(found.values()), marker


def _charges(odometer: Path) -> int:
    try:
        return sum(len(c) for c in _odometer_charges(odometer).values())
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_sigkill_of_simulate_alone_leaves_nothing_running_and_nothing_spends_budget(tmp_path):
    odometer, run = tmp_path / "odometer", tmp_path / "run"
    args = [*SMALL, "--set", "hospitals=2", "--set", "rounds=8", "--set", "train.fraction_evaluate=0",
            "--set", f"privacy.odometer_dir={odometer}", "--out", str(run)]
    process = _start(args, tmp_path, "killed-alone")
    try:
        _wait_for_round(process, run, 1)
        procs, marker = _run_processes(process.pid)
        commands = " ".join(" ".join(_describe([p])) for p in procs)
        assert "flower-superlink" in commands and "ray::" in commands, commands  # Ray's workers are in it
        os.kill(process.pid, signal.SIGKILL)  # simulate.py alone: no handler, no cleanup of its own
        process.wait(timeout=30)
    except BaseException:
        _kill_tree(process.pid)
        raise
    left = _wait_gone(procs, 60)
    assert left == [], _describe(left)
    assert marked_processes(marker) == [], _describe(marked_processes(marker))  # a daemon Ray started late
    # Nothing goes on unattended: no hospital is charged again, no round is completed.
    charges, status = _charges(odometer), json.loads((run / "status.json").read_text())
    time.sleep(10)
    assert _charges(odometer) == charges
    assert json.loads((run / "status.json").read_text()) == status and status["state"] == "running", status
