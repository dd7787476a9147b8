"""simulate.py's launcher: what it does about Flower relaunching a slow simulation process."""
import subprocess
import time

import psutil

from server.flower_launch import drop_superseded_launches


def test_only_the_newest_simulation_launch_survives(tmp_path):
    # A stand-in for the SuperLink's tree on a busy machine: three launches of "flwr-simulation",
    # one after another, the older ones still running; and a bystander that must be left alone.
    launch = tmp_path / "flwr-simulation"
    # Each launch forks a child that keeps its command line (as a fork does before exec):
    # the child is part of its launch, not a newer launch.
    launch.write_text("(sleep 60; true) & sleep 60\n")
    bystander = tmp_path / "flower-superexec"
    bystander.write_text("sleep 60\n")
    root = subprocess.Popen(["sh", "-c", f"sh {bystander} & sh {launch} & sleep 0.3; sh {launch} & sleep 0.3; "
                                         f"sh {launch} & wait"])
    try:
        def launches():
            # Exactly "sh <launch>": a child the root has forked but not yet exec'd still carries
            # the root's own command line, which names the launch too.
            return sorted((p for p in psutil.Process(root.pid).children() if p.cmdline()[:2] == ["sh", str(launch)]),
                          key=lambda p: p.create_time())

        deadline = time.time() + 10
        while time.time() < deadline and len(launches()) < 3:
            time.sleep(0.05)
        launched = launches()
        assert len(launched) == 3
        assert drop_superseded_launches(root.pid) == 2
        psutil.wait_procs(launched[:2], timeout=5)
        assert [p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in launched] == [False, False, True]
        assert any(str(bystander) in " ".join(p.cmdline()) for p in psutil.Process(root.pid).children())
        assert drop_superseded_launches(root.pid) == 0  # one launch left: nothing to drop
    finally:
        for proc in psutil.Process(root.pid).children(recursive=True):
            proc.kill()
        root.kill()
