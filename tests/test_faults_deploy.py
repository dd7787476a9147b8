"""A real deployment loses a hospital mid-run: the run completes without it and names it.

One SuperLink (TLS, node auth) and three hospital SuperNodes, as in tests/test_deploy.py;
h3's SuperNode is killed (SIGKILL, with its app processes) once round 1 is checkpointed.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.deploy_helpers import (REPO, Deployment, _kill_tree, certs_and_keys, digits_hospitals, parse_json_output,
                                  quiet_env, superlink_argv, supernode_argv, wait_for)

HOSPITALS = ("h1", "h2", "h3")
CONNECTION = "hospitals"


def _checkpointed_round(run_dir) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.deploy
def test_deploy_a_supernode_killed_mid_run_never_hangs_the_run(tmp_path):
    deployment = Deployment(tmp_path)
    run_dir = tmp_path / "run"
    try:
        deployment.setup_network(list(HOSPITALS))
        coord_ns = deployment.coordinator_ns
        certs, keys = tmp_path / "certs", tmp_path / "keys"
        certs_and_keys(deployment, certs, keys, HOSPITALS)
        digits_hospitals(tmp_path, HOSPITALS, parts=3)
        config = tmp_path / "faults.yaml"
        # A fixed sigma spends a fraction of each hospital's budget (a planned one would spend it
        # all), so h1 and h2 can still train in the second run below until it is stopped.
        config.write_text("rounds: 4\nhospitals: 3\ndata:\n  source: digits\ndp:\n  noise_multiplier: 4.0\n"
                          "train:\n  fraction_evaluate: 0\n  round_timeout: 240\n")

        deployment.spawn("superlink", superlink_argv(deployment, certs), namespace=coord_ns,
                         env=quiet_env({"FLWR_HOME": str(tmp_path / "home-superlink")}))
        operator = deployment.write_flower_config(tmp_path / "home-operator", CONNECTION, certs / "ca.crt")

        def flwr(*args, timeout=60):
            return deployment.run(["flwr", *args], namespace=coord_ns, env=operator, timeout=timeout)

        wait_for(lambda: deployment.port_open(deployment.link_host, deployment.link_port, coord_ns), 60, 0.5,
                 "the SuperLink to listen")
        for result in deployment.run_many(
                [["flwr", "supernode", "register", str(keys / f"{n}.pub"), CONNECTION, "--name", n, "--format", "json"]
                 for n in HOSPITALS], namespace=coord_ns, env=operator, timeout=120):
            assert parse_json_output(result.stdout).get("success"), result.stdout + result.stderr
        nodes = {}
        for name in HOSPITALS:
            node_config = (f'hospital-id="{name}" data-source="npz" data-path="{tmp_path / name}.npz" '
                           f'max-epsilon=8.0 delta=1e-5 odometer-path="{tmp_path / name}-odometer.jsonl"')
            nodes[name] = deployment.spawn(
                name, supernode_argv(deployment, certs / "ca.crt", keys / f"{name}.key", node_config),
                namespace=deployment.node_ns.get(name), env=quiet_env({"FLWR_HOME": str(tmp_path / f"home-{name}")}))
        started = flwr("run", str(REPO), CONNECTION, "--format", "json", "--run-config",
                       f'run-dir="{run_dir}" config-path="{config}"', timeout=120)
        run_id = parse_json_output(started.stdout).get("run-id")
        assert run_id, started.stdout + started.stderr

        wait_for(lambda: _checkpointed_round(run_dir) >= 1, 420, 1, "round 1 to finish")
        _kill_tree(nodes["h3"].popen.pid, grace=0)  # the hospital's machine goes away
        if deployment.mode == "netns":  # its ClientApp processes live in its namespace
            listed = subprocess.run(["ip", "netns", "pids", deployment.node_ns["h3"]], capture_output=True, text=True)
            for pid in listed.stdout.split():
                _kill_tree(int(pid), grace=0)

        def finished():
            listed = parse_json_output(flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json").stdout)
            return listed["runs"][0]["status"] if listed.get("runs") and \
                listed["runs"][0]["status"].startswith("finished") else ""
        outcome = wait_for(finished, 900, 3, "the run to finish without h3")
        log = flwr("log", str(run_id), CONNECTION, "--show", timeout=60).stdout
        assert outcome == "finished:completed", log[-3000:]
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "finished" and status["rounds_completed"] == 4, status
        assert status["failed_hospitals"] == ["h3"] and status["exit_code"] == 1, status
        assert status["rejected_hospitals"] == [], status  # the SuperLink's error reply speaks for h3
        assert "h3 failed (timeout)" in log, log[-3000:]
        records = [json.loads(line) for line in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
        for name in ("h1", "h2"):
            assert [r["round"] for r in records if r["hospital"] == name] == [1, 2, 3, 4]
            charges = (tmp_path / f"{name}-odometer.jsonl").read_text().splitlines()
            assert len(charges) == 4
        # h3's charges: all in the ledger but perhaps the round it was killed in, which only its
        # odometer knows (a deployed coordinator cannot read it; its next reply would show it).
        h3_rounds = [r["round"] for r in records if r["hospital"] == "h3"]
        h3_charges = [json.loads(c)["round"] for c in (tmp_path / "h3-odometer.jsonl").read_text().splitlines()]
        assert set(h3_rounds) <= set(h3_charges) and len(h3_charges) - len(h3_rounds) <= 1
        audit = subprocess.run([sys.executable, "-m", "server.audit", str(run_dir)], cwd=REPO, capture_output=True,
                               text=True)
        assert audit.returncode == 0, audit.stdout + audit.stderr

        # The operator stops a second run with `flwr stop`: an interruption to resume, not a crash.
        stopped_dir, two = tmp_path / "stopped", tmp_path / "two.yaml"
        two.write_text("rounds: 50\nhospitals: 2\ndata:\n  source: digits\ndp:\n  noise_multiplier: 4.0\n"
                       "train:\n  fraction_evaluate: 0\n")
        started = flwr("run", str(REPO), CONNECTION, "--format", "json", "--run-config",
                       f'run-dir="{stopped_dir}" config-path="{two}"', timeout=120)
        second = parse_json_output(started.stdout).get("run-id")
        wait_for(lambda: _checkpointed_round(stopped_dir) >= 1, 420, 1, "round 1 of the second run")
        flwr("stop", str(second), CONNECTION, timeout=60)

        def state():
            try:
                found = json.loads((stopped_dir / "status.json").read_text())
            except (OSError, ValueError):
                return None
            return found if found["state"] != "running" else None
        status = wait_for(state, 180, 1, "the stopped run's status")
        assert status["state"] == "interrupted" and status["exit_code"] == 130, status
        assert "flwr stop" in status["reason"] and f"resume-dir={stopped_dir}" in status["reason"], status
        assert (stopped_dir / "model.keras").is_file()
        audit = subprocess.run([sys.executable, "-m", "server.audit", str(stopped_dir), "--odometer",
                                str(tmp_path / "h1-odometer.jsonl")], cwd=REPO, capture_output=True, text=True)
        assert audit.returncode == 0, audit.stdout + audit.stderr  # a cut-short round is a note until resumed
    finally:
        deployment.close()
