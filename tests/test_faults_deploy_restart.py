"""A real deployment survives restarts: the SuperLink killed and restarted, then the run resumed
from its run directory (`resume-dir`); a hospital's SuperNode killed and restarted with the same
key and node config, which then trains again.

One SuperLink (TLS, node auth, a `--database` file so that the hospitals' registrations outlive
a restart) and two hospital SuperNodes, as in tests/test_deploy.py. Each test checks the run's
status.json, its round lines (`flwr log`), that every charge in every hospital's odometer is in
the ledger and every trained record in the odometer, and that the audit passes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.deploy_helpers import (REPO, Deployment, _kill_tree, certs_and_keys, digits_hospitals, parse_json_output,
                                  quiet_env, superlink_argv, supernode_argv, wait_for)

HOSPITALS = ("h1", "h2")
CONNECTION = "hospitals"
RUN_TIMEOUT = 900  # a busy 2-core machine; a healthy one needs a fraction of it


def _checkpointed_round(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return -1


class Federation:
    """Certificates, keys, data, the SuperLink and the SuperNodes of one test."""

    def __init__(self, tmp_path: Path, rounds: int, round_timeout: int):
        self.tmp = tmp_path
        self.deployment = Deployment(tmp_path)
        self.run_dir = tmp_path / "run"
        self.certs, self.keys = tmp_path / "certs", tmp_path / "keys"
        self.config = tmp_path / "faults.yaml"
        self.config.write_text(f"rounds: {rounds}\nhospitals: {len(HOSPITALS)}\ndata:\n  source: digits\n"
                               f"train:\n  fraction_evaluate: 0\n  round_timeout: {round_timeout}\n")
        self.superlink = None
        self.nodes = {}
        self.operator = {}

    def odometer(self, name: str) -> Path:
        return self.tmp / f"{name}-odometer.jsonl"

    def setup(self) -> None:
        deployment = self.deployment
        deployment.setup_network(list(HOSPITALS))
        certs_and_keys(deployment, self.certs, self.keys, HOSPITALS)
        digits_hospitals(self.tmp, HOSPITALS)
        self.start_superlink()
        self.operator = deployment.write_flower_config(self.tmp / "home-operator", CONNECTION, self.certs / "ca.crt")
        for result in deployment.run_many(
                [["flwr", "supernode", "register", str(self.keys / f"{n}.pub"), CONNECTION, "--name", n,
                  "--format", "json"] for n in HOSPITALS],
                namespace=deployment.coordinator_ns, env=self.operator, timeout=120):
            assert parse_json_output(result.stdout).get("success"), result.stdout + result.stderr
        for name in HOSPITALS:
            self.start_supernode(name)

    def start_superlink(self) -> None:
        """The SuperLink, its state in a database file: a restart keeps the registered hospitals."""
        argv = [*superlink_argv(self.deployment, self.certs), "--database", str(self.tmp / "superlink.db")]
        count = sum(1 for p in self.deployment.procs if p.name.startswith("superlink"))
        self.superlink = self.deployment.spawn(f"superlink-{count}", argv, namespace=self.deployment.coordinator_ns,
                                               env=quiet_env({"FLWR_HOME": str(self.tmp / "home-superlink")}))
        wait_for(lambda: self.deployment.port_open(self.deployment.link_host, self.deployment.link_port,
                                                   self.deployment.coordinator_ns), 60, 0.5, "the SuperLink to listen")

    def start_supernode(self, name: str) -> None:
        """A hospital's SuperNode: the same key, node config and FLWR_HOME every time."""
        node_config = (f'hospital-id="{name}" data-source="npz" data-path="{self.tmp / name}.npz" '
                       f'max-epsilon=8.0 delta=1e-5 odometer-path="{self.odometer(name)}"')
        count = sum(1 for p in self.deployment.procs if p.name.startswith(name))
        self.nodes[name] = self.deployment.spawn(
            f"{name}-{count}", supernode_argv(self.deployment, self.certs / "ca.crt", self.keys / f"{name}.key",
                                               node_config),
            namespace=self.deployment.node_ns.get(name), env=quiet_env({"FLWR_HOME": str(self.tmp / f"home-{name}")}))

    def kill_supernode(self, name: str) -> None:
        """The hospital's machine goes away, with its ClientApp processes."""
        _kill_tree(self.nodes[name].popen.pid, grace=0)
        if self.deployment.mode == "netns":  # its ClientApp processes live in its namespace
            listed = subprocess.run(["ip", "netns", "pids", self.deployment.node_ns[name]], capture_output=True,
                                    text=True)
            for pid in listed.stdout.split():
                _kill_tree(int(pid), grace=0)

    def flwr(self, *args, timeout=60):
        return self.deployment.run(["flwr", *args], namespace=self.deployment.coordinator_ns, env=self.operator,
                                   timeout=timeout)

    def start_run(self, *run_config: str) -> int:
        started = self.flwr("run", str(REPO), CONNECTION, "--format", "json", "--run-config", " ".join(run_config),
                            timeout=180)
        run_id = parse_json_output(started.stdout).get("run-id")
        assert run_id, started.stdout + started.stderr
        return run_id

    def run_status(self, run_id: int) -> str:
        listed = parse_json_output(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json").stdout)
        return listed["runs"][0]["status"] if listed.get("runs") else ""

    def wait_finished(self, run_id: int) -> tuple[str, str]:
        """(Flower's final status of the run, its log)."""
        outcome = wait_for(lambda: (s := self.run_status(run_id)).startswith("finished") and s, RUN_TIMEOUT, 3,
                           f"run {run_id} to finish")
        return outcome, self.flwr("log", str(run_id), CONNECTION, "--show", timeout=60).stdout

    def logs(self) -> str:
        parts = [f"mode: {self.deployment.note}"]
        for proc in self.deployment.procs:
            parts.append(f"----- {proc.name} (exit {proc.popen.poll()}):\n{proc.text()[-2000:]}")
        return "\n".join(parts)

    def check_ledger(self) -> list[dict]:
        """Every odometer charge is in the ledger, once; every epsilon recomputes (the audit)."""
        records = [json.loads(line) for line in (self.run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
        pairs = [(r["round"], r["hospital"]) for r in records]
        assert len(pairs) == len(set(pairs)), pairs  # no duplicate
        for name in HOSPITALS:
            charges = [json.loads(line) for line in self.odometer(name).read_text().splitlines()]
            ledgered = sorted((r["round"], r["steps"]) for r in records if r["hospital"] == name and r["steps"] > 0)
            assert ledgered == sorted((c["round"], c["steps"]) for c in charges), name
        audit = subprocess.run([sys.executable, "-m", "server.audit", str(self.run_dir),
                                *[arg for n in HOSPITALS for arg in ("--odometer", str(self.odometer(n)))]],
                               cwd=REPO, capture_output=True, text=True)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        return records


@pytest.fixture
def federation(tmp_path):
    built = []

    def build(rounds: int, round_timeout: int) -> Federation:
        built.append(Federation(tmp_path, rounds, round_timeout))
        built[-1].setup()
        return built[-1]

    try:
        yield build
    finally:
        for fed in built:
            fed.deployment.close()


def _round_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("Round ") and " | accuracy" in line]


@pytest.mark.deploy
def test_deploy_superlink_killed_the_run_stops_and_resumes_on_a_restarted_superlink_with_every_charge_ledgered(
        federation):
    rounds = 4
    fed = federation(rounds, round_timeout=120)
    try:
        first = fed.start_run(f'run-dir="{fed.run_dir}"', f'config-path="{fed.config}"')
        wait_for(lambda: _checkpointed_round(fed.run_dir) >= 1, 600, 0.5, "round 1 to finish")
        # The SuperLink process dies (SIGKILL) while round 2 is under way. Its SuperExec and the
        # ServerApp are left: they must end on their own, not retry forever, and say why.
        below = psutil.Process(fed.superlink.popen.pid).children(recursive=True)
        assert any("flwr-serverapp" in " ".join(p.cmdline()) for p in below), [p.cmdline() for p in below]
        fed.superlink.popen.kill()
        fed.superlink.popen.wait(timeout=30)  # reaped, as its real parent would: no zombie's pid to watch
        killed_after = _checkpointed_round(fed.run_dir)
        _, alive = psutil.wait_procs(below, timeout=180)
        assert alive == [], [p.cmdline() for p in alive]
        status = json.loads((fed.run_dir / "status.json").read_text())
        assert status["state"] == "interrupted" and status["exit_code"] == 130, status
        assert "the SuperLink went away during round" in status["reason"], status
        assert status["rounds_completed"] == _checkpointed_round(fed.run_dir) >= killed_after, status

        fed.start_superlink()  # same database: the hospitals' registrations stand, they reconnect
        resumed = fed.start_run(f'resume-dir="{fed.run_dir}"', f'config-path="{fed.config}"')
        assert resumed != first
        outcome, log = fed.wait_finished(resumed)
        assert outcome == "finished:completed", log[-3000:]
        assert f"Resuming {fed.run_dir} after round" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        status = json.loads((fed.run_dir / "status.json").read_text())
        assert status["state"] == "finished" and status["rounds_completed"] == rounds, status
        assert status["rejected_hospitals"] == [], status
        records = fed.check_ledger()
        # Round 1 trained by both; the resumed run trained both in the last round; nothing in
        # between is missing: each round up to the end has a record (trained or lost) per hospital.
        for name in HOSPITALS:
            own = {r["round"]: r["status"] for r in records if r["hospital"] == name}
            assert own.get(1) == "trained" and own.get(rounds) == "trained", (name, own)
            assert set(own.values()) <= {"trained", "lost"}, (name, own)
        assert killed_after >= 1
    except (AssertionError, subprocess.SubprocessError, OSError) as error:
        raise AssertionError(f"{error}\n{fed.logs()}") from None


@pytest.mark.deploy
def test_deploy_a_supernode_that_reconnects_trains_again_with_a_consistent_ledger(federation):
    rounds = 5
    fed = federation(rounds, round_timeout=120)
    try:
        run_id = fed.start_run(f'run-dir="{fed.run_dir}"', f'config-path="{fed.config}"')
        wait_for(lambda: _checkpointed_round(fed.run_dir) >= 1, 600, 0.5, "round 1 to finish")
        fed.kill_supernode("h2")
        lost_after = _checkpointed_round(fed.run_dir)
        # A round without h2, then h2's machine is back: the same key, node config and odometer.
        wait_for(lambda: _checkpointed_round(fed.run_dir) > lost_after, 600, 0.5, "a round without h2")
        back_after = _checkpointed_round(fed.run_dir)
        assert back_after < rounds, "the run ended before h2 came back"
        fed.start_supernode("h2")
        outcome, log = fed.wait_finished(run_id)
        assert outcome == "finished:completed", log[-3000:]
        lines = _round_lines(log)
        assert len(lines) == rounds, log[-3000:]
        assert "h2 failed (timeout)" in lines[back_after - 1], lines  # named in the round it missed
        status = json.loads((fed.run_dir / "status.json").read_text())
        assert status["state"] == "finished" and status["rounds_completed"] == rounds, status
        assert status["failed_hospitals"] == ["h2"] and status["exit_code"] == 1, status
        assert status["rejected_hospitals"] == [], status  # its return is no forgery: no reply was refused
        records = fed.check_ledger()
        h1 = [r["round"] for r in records if r["hospital"] == "h1" and r["status"] == "trained"]
        assert h1 == list(range(1, rounds + 1))
        h2 = {r["round"]: r["status"] for r in records if r["hospital"] == "h2"}
        assert h2.get(1) == "trained" and h2.get(rounds) == "trained", h2  # it took part again
        assert "failed" not in lines[-1], lines[-1]
    except (AssertionError, subprocess.SubprocessError, OSError) as error:
        raise AssertionError(f"{error}\n{fed.logs()}") from None


def _signal_tree(pid: int, signal_number: int) -> None:
    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in family:
        try:
            proc.send_signal(signal_number)
        except psutil.NoSuchProcess:
            pass


@pytest.mark.deploy
def test_deploy_a_hospital_frozen_past_the_round_timeout_is_named_failed_timeout_and_the_run_goes_on(federation):
    """SIGSTOP of a hospital's SuperNode (a hung machine): the round ends at train.round_timeout."""
    import signal

    rounds, timeout = 3, 60
    fed = federation(rounds, round_timeout=timeout)
    try:
        run_id = fed.start_run(f'run-dir="{fed.run_dir}"', f'config-path="{fed.config}"')
        wait_for(lambda: _checkpointed_round(fed.run_dir) >= 1, 600, 0.5, "round 1 to finish")
        _signal_tree(fed.nodes["h2"].popen.pid, signal.SIGSTOP)
        frozen_after = _checkpointed_round(fed.run_dir)
        try:
            # The next round cannot hear from h2: it must end by its timeout, not wait for ever.
            wait_for(lambda: _checkpointed_round(fed.run_dir) > frozen_after, 3 * timeout + 300, 0.5,
                     "a round to end without the frozen hospital")
        finally:
            _signal_tree(fed.nodes["h2"].popen.pid, signal.SIGCONT)
        outcome, log = fed.wait_finished(run_id)
        assert outcome == "finished:completed", log[-3000:]
        lines = _round_lines(log)
        assert len(lines) == rounds, log[-3000:]
        assert "h2 failed (timeout)" in lines[frozen_after], lines  # the round after the freeze names it
        status = json.loads((fed.run_dir / "status.json").read_text())
        assert status["state"] == "finished" and status["rounds_completed"] == rounds, status
        assert "h2" in status["failed_hospitals"], status
        records = fed.check_ledger()  # a charge h2 made before it froze is ledgered all the same
        assert [r["round"] for r in records if r["hospital"] == "h1" and r["status"] == "trained"] == \
            list(range(1, rounds + 1))
    except (AssertionError, subprocess.SubprocessError, OSError) as error:
        raise AssertionError(f"{error}\n{fed.logs()}") from None
