"""`flwr run .` the Flower way: Flower's own local simulation, flat --run-config keys.

Flower decides how many SuperNodes its simulation has (`num-supernodes`); the ServerApp and
the ClientApps take that as the number of hospitals, so the user never sets both. Runs with
a private FLWR_HOME and private ports, and stops the SuperLink Flower leaves running.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from server.flower_launch import free_ports
from tests.deploy_helpers import parse_json_output

ROOT = Path(__file__).resolve().parent.parent



def _stop_managed_superlink(flwr_home: Path) -> None:
    """`flwr run` on `:local:` starts a detached SuperLink that outlives it: end it and its children."""
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(flwr_home) in part for part in (proc.info["cmdline"] or [])):
            mine.append(proc)
    procs = [c for p in mine for c in p.children(recursive=True)] + mine
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.slow
def test_flwr_run_dot_simulates_as_many_hospitals_as_supernodes_with_flat_overrides(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    run_dir, odometer = tmp_path / "run", tmp_path / "odometer"
    http_port, control_port = free_ports(2)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
    flwr = Path(sys.executable).parent / "flwr"
    command = [str(flwr), "run", ".", "--stream",
               "--federation-config", "num-supernodes=3",
               "--run-config", f"rounds=1 privacy.max_epsilon=20 privacy.odometer_dir='{odometer}' run-dir='{run_dir}'"]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        _stop_managed_superlink(flwr_home)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Round 1/1" in output, output[-4000:]
    # The simulated hospitals' own info lines (local training loss, odometer) stay out of the
    # run's log stream: DESIGN.md keeps the local loss local; their epsilon is on the round line.
    assert "local train loss" not in output and "hospital hospital-0" not in output, output[-4000:]

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["hospitals"] == 3  # from Flower's num-supernodes, not default.yaml's 5
    assert config["rounds"] == 1 and config["privacy"]["max_epsilon"] == 20.0  # the flat keys
    ledger = [json.loads(line) for line in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    assert sorted(r["hospital"] for r in ledger) == ["hospital-0", "hospital-1", "hospital-2"]
    assert all(r["max_epsilon"] == 20.0 and r["status"] == "trained" for r in ledger)
    charges = [json.loads(line) for line in (odometer / "simulation.jsonl").read_text().splitlines()]
    assert sorted(c["hospital"] for c in charges) == ["hospital-0", "hospital-1", "hospital-2"]


def _flower_processes(flwr_home: Path) -> list:
    """Processes started for this FLWR_HOME: the SuperLink, SuperExec, the simulation, Ray's workers."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(flwr_home) in " ".join(proc.info["cmdline"] or []) or \
                    proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_simulate_refuses_bad_input_in_one_line_before_start_up(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args, words in ((["--set", "dp.noise_multiplier=-1"], "dp.noise_multiplier"),
                        (["--out", str(blocker / "run")], "cannot write the run directory"),
                        (["--config", str(tmp_path / "missing.yaml")], "config file not found")):
        result = subprocess.run([sys.executable, "simulate.py", *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")})
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "flwr-home").exists()  # nothing of Flower was started


@pytest.mark.slow
def test_ctrl_c_once_asks_for_a_stop_twice_stops_now_and_leaves_no_process(tmp_path):
    import signal
    import time

    flwr_home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    flwr_home.mkdir()
    users_config = '[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "example.org:9093"\n'
    (flwr_home / "config.toml").write_text(users_config)  # the user's own Flower Configuration
    command = [sys.executable, "simulate.py", "--out", str(run_dir), "--set", "hospitals=2", "--set", "rounds=50",
               "--set", "privacy.max_epsilon=1000", "--set", f"privacy.odometer_dir={tmp_path / 'odometer'}"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FLWR_HOME": str(flwr_home)})
    seen = []
    for line in proc.stdout:  # wait until the ServerApp runs
        seen.append(line)
        if line.startswith("Round 1/"):
            break
    if not any(line.startswith("Round 1/") for line in seen):
        proc.kill()
        pytest.fail("no round line:\n" + "".join(seen)[-2000:] + proc.stderr.read()[-2000:])
    assert _flower_processes(flwr_home), "the simulation runs under the given FLWR_HOME"

    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while not (run_dir / "STOP").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run_dir / "STOP").exists()  # the preamble's graceful-stop contract
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopping after this round (Ctrl-C again to stop now)" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 15  # a Ray worker caught mid-start by the shutdown exits on its own
    while (left := _flower_processes(flwr_home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], [p.info["cmdline"] for p in left]
    assert (flwr_home / "config.toml").read_text() == users_config  # put back as it was


@pytest.mark.slow
def test_a_flwr_run_killed_mid_way_is_not_run_again_by_the_restarted_local_superlink(tmp_path):
    """Flower's local SuperLink keeps its runs in a database; restarted, it would start an unfinished
    run again with nobody watching. The ServerApp refuses a run that already started (server/run_guard.py)."""
    import time

    flwr_home = tmp_path / "flwr-home"
    run_dir, odometer = tmp_path / "run", tmp_path / "odometer"
    http_port, control_port = free_ports(2)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
    flwr = str(Path(sys.executable).parent / "flwr")
    overrides = f"rounds=40 privacy.max_epsilon=1000 privacy.odometer_dir='{odometer}' run-dir='{run_dir}'"
    try:
        for _ in range(3):  # Flower gives its local SuperLink 15 s to start: a busy machine may need a retry
            started = subprocess.run([flwr, "run", ".", "--format", "json", "--federation-config",
                                      "num-supernodes=2", "--run-config", overrides], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=300)
            if "Failed to start local SuperLink" not in started.stdout + started.stderr:
                break
            time.sleep(10)
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = parse_json_output(started.stdout).get("run-id")
        assert run_id, started.stdout + started.stderr
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 900
        while not (metrics.exists() and metrics.read_text().strip()):
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(1)
        _stop_managed_superlink(flwr_home)  # the machine's processes die mid-run
        rounds_before = metrics.read_text().count("\n")
        charges_before = (odometer / "simulation.jsonl").read_text().count("\n")
        assert 1 <= rounds_before < 40

        # The next `flwr` command starts the local SuperLink again, from the same database.
        for _ in range(3):
            listed = subprocess.run([flwr, "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=300)
            if "Failed to start local SuperLink" not in listed.stdout + listed.stderr:
                break
            time.sleep(10)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        deadline = time.monotonic() + 120  # time for Flower to start whatever it would start again
        while time.monotonic() < deadline:
            time.sleep(5)
            assert metrics.read_text().count("\n") == rounds_before, "the killed run trained again by itself"
        assert (odometer / "simulation.jsonl").read_text().count("\n") == charges_before  # nothing more spent
        log = subprocess.run([flwr, "log", str(run_id), "--show"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        started_again = "second time" in log.stdout
        # Either Flower did not start it again, or it did and the ServerApp refused it in one line.
        assert started_again or f"Round {rounds_before + 1}/" not in log.stdout, log.stdout[-3000:]
    finally:
        _stop_managed_superlink(flwr_home)
