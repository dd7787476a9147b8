"""The hospital's long-lived process (client/hospital_process.py) and the thin ClientApp.

Real processes throughout: the hospital process is started as a deployment starts it
(`python -m client.hospital_process`, or `hospital_process.call` from a separate process
playing the one-message `flwr-clientapp`), reached over its Unix socket, and left to stop by
itself. A full deployment through it is tests/test_deploy.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from multiprocessing.connection import AuthenticationError, Client
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
RUN_CONFIG = {"config-path": "configs/deploy-test.yaml"}
PLAN_CONFIG = {"batch_size": "auto", "local_epochs": 1.0, "learning_rate": 0.2, "momentum": 0.9,
               "lr_schedule": "cosine", "l2_norm_clip": 1.0, "noise_multiplier": "auto", "planned_rounds": 5}
START_SECONDS = 240  # a first request imports TensorFlow: minutes on a busy 2-core machine


def _env(runtime: Path, **extra) -> dict:
    env = {**os.environ, "HOSPITAL_FL_RUNTIME_DIR": str(runtime), "TF_CPP_MIN_LOG_LEVEL": "2",
           "FLWR_TELEMETRY_ENABLED": "0", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@pytest.fixture
def runtime():
    """A short private folder for sockets (a Unix socket path must stay under 100 characters)."""
    folder = Path(tempfile.mkdtemp(prefix="hfl-"))  # mode 0700
    yield folder
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def _node(tmp_path: Path, name: str = "h1", **extra) -> dict:
    """A deployed hospital's node config over 600 of the bundled digits (8x8, 10 classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    path = tmp_path / f"{name}.npz"
    np.savez(path, train_images=images[:600], train_labels=digits.target[:600], test_images=images[600:700],
             test_labels=digits.target[600:700])
    return {"hospital-id": name, "data-source": "npz", "data-path": str(path), "max-epsilon": 8.0, "delta": 1e-5,
            "odometer-path": str(tmp_path / f"{name}-odometer.jsonl"), **extra}


def _plan_request(node: dict) -> dict:
    return {"kind": "query", "node-config": node, "run-config": RUN_CONFIG, "config": PLAN_CONFIG, "flower-run": 7}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.2)


def _ask(sock: Path, authkey: bytes, request: dict) -> dict:
    with Client(str(sock), family="AF_UNIX", authkey=authkey) as connection:
        assert connection.recv() == "ready"
        connection.send(request)
        return connection.recv()


def test_the_client_app_module_imports_without_tensorflow_or_the_hospitals_code():
    probe = ("import json, sys; import client.client_app; "
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', "
             "'sklearn', 'dp_accounting') or m in ('client.task', 'client.handlers', 'common.data', 'common.model'))))")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=_env(Path("/nonexistent")))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "client.client_app" in imported and not any(name.startswith("tensorflow") for name in imported)


@pytest.mark.slow
def test_one_hospital_process_serves_every_request_refuses_a_wrong_key_and_stops_with_its_supernode(tmp_path,
                                                                                                  runtime):
    from client.hospital_process import APP_DIR, _write_authkey, key_of

    node = _node(tmp_path)
    # The process that plays the SuperNode: the hospital process must stop when it is gone.
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"])
    try:
        watched = [(owner.pid, psutil.Process(owner.pid).create_time())]
        key = key_of(node, APP_DIR, watched)
        sock, authkey_path = runtime / f"{key}.sock", runtime / f"{key}.authkey"
        _write_authkey(authkey_path)
        assert authkey_path.stat().st_mode & 0o777 == 0o600
        authkey = authkey_path.read_bytes()
        log = tmp_path / "hospital.log"
        with open(log, "wb") as handle:
            server = subprocess.Popen(
                [sys.executable, "-m", "client.hospital_process", "--dir", str(runtime), "--key", key,
                 "--watch", f"{watched[0][0]}:{watched[0][1]!r}", "--idle", "600"],
                cwd=REPO, env=_env(runtime), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(sock.exists, 60, "the socket")
            assert sock.stat().st_mode & 0o777 == 0o600

            first = _ask(sock, authkey, _plan_request(node) | {"key": key})
            second = _ask(sock, authkey, _plan_request(node) | {"key": key})
            assert first["pid"] == second["pid"] == server.pid, (first, second, log.read_text())
            plan = first["ok"]["plan"]
            assert plan["hospital"] == "h1" and plan["num-examples"] == 600 and 0 < plan["epsilon-planned"] <= 8.0
            assert second["ok"] == first["ok"]

            # A client without the key is refused before anything is read; the process serves on.
            with pytest.raises(AuthenticationError):
                Client(str(sock), family="AF_UNIX", authkey=b"not the key")
            assert _ask(sock, authkey, _plan_request(node) | {"key": key})["pid"] == server.pid
            assert "refused a connection" in log.read_text()

            # Another node config (a stale process must not serve it): the category only.
            other = _ask(sock, authkey, _plan_request({**node, "max-epsilon": 2.0}) | {"key": key})
            assert other == {"error": "internal", "pid": server.pid}
            assert "another node config or app version" in log.read_text()

            owner.kill()
            owner.wait()
            _wait(lambda: _gone(server.pid), 30, "the hospital process to stop with its SuperNode")
            assert f"process {owner.pid} that started it" in log.read_text()
            assert not sock.exists()
        finally:
            if not _gone(server.pid):
                server.kill()
            server.wait(timeout=30)
    finally:
        owner.kill()
        owner.wait()


DRIVER = textwrap.dedent("""
    # One ClientApp process's worth of work: forward one plan request, print the reply.
    import json, sys
    from client import hospital_process
    reply = hospital_process.call(json.loads(sys.argv[1]))
    print(json.dumps({"pid": reply["pid"], "hospital": reply["ok"]["plan"]["hospital"]}))
""")


@pytest.mark.slow
def test_racing_client_app_processes_start_one_hospital_process_which_stops_when_idle(tmp_path, runtime):
    request = json.dumps(_plan_request(_node(tmp_path)))
    env = _env(runtime, HOSPITAL_FL_IDLE_SECONDS="3")
    logs = [tmp_path / f"driver{i}.log" for i in range(2)]
    drivers = []
    for log in logs:  # both at once, as two messages to one SuperNode would
        with open(log, "wb") as handle:
            drivers.append(subprocess.Popen([sys.executable, "-c", DRIVER, request], cwd=REPO, env=env,
                                            stdout=subprocess.PIPE, stderr=handle))
    replies = []
    for driver in drivers:
        out, _ = driver.communicate(timeout=START_SECONDS)
        assert driver.returncode == 0, "\n".join(log.read_text()[-2000:] for log in logs)
        replies.append(json.loads(out.decode().strip().splitlines()[-1]))
    text = "".join(log.read_text() for log in logs)
    assert replies[0]["pid"] == replies[1]["pid"] and replies[0]["hospital"] == "h1", (replies, text)
    assert text.count("serves ") == 1, text  # one process started, though both found none running
    pid = replies[0]["pid"]
    assert "client.hospital_process" in " ".join(psutil.Process(pid).cmdline())
    _wait(lambda: _gone(pid), 60, "the idle hospital process to stop")
    assert "no message for 3 s" in "".join(log.read_text() for log in logs)
    assert not list(runtime.glob("*.sock"))


CLIENT_APP = textwrap.dedent("""
    # The real ClientApp, as a flwr-clientapp process runs it, with a node config it must refuse.
    import json, sys
    from flwr.app import ConfigRecord, Context, RecordDict
    from client.client_app import app
    from tests.test_hostile import _message
    node, config = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    context = Context(run_id=77, node_id=1, node_config=node, state=RecordDict(), run_config={"config-path":
                      "configs/deploy-test.yaml"})
    reply = app(_message("query", RecordDict({"config": ConfigRecord(config)})), context)
    from flwr.common.serde import message_to_proto
    sent = message_to_proto(reply).SerializeToString()
    print(json.dumps({"error": reply.has_error() and reply.error.reason, "sent": sent.hex()}))
""")


@pytest.mark.slow
def test_a_wrong_node_config_through_the_hospital_process_is_one_category_line(tmp_path, runtime):
    node = _node(tmp_path, "st-marys", evalute=False)  # misspelt: must not quietly mean evaluate=true
    log = tmp_path / "clientapp.log"
    with open(log, "wb") as handle:
        done = subprocess.run([sys.executable, "-c", CLIENT_APP, json.dumps(node), json.dumps(PLAN_CONFIG)],
                              cwd=REPO, env=_env(runtime, HOSPITAL_FL_PROCESS="on", HOSPITAL_FL_IDLE_SECONDS="2"),
                              stdout=subprocess.PIPE, stderr=handle, timeout=START_SECONDS)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    reply = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert reply["error"] == "data: st-marys", (reply, text)
    sent = bytes.fromhex(reply["sent"])
    assert b"evalute" not in sent and str(tmp_path).encode() not in sent
    # The details stay with the hospital: its log (the SuperNode's stderr) and its errors file.
    assert "serves " in text and "unknown key 'evalute'" in text, text[-3000:]
    assert "unknown key 'evalute'" in (tmp_path / "st-marys-odometer.errors.log").read_text()
    _wait(lambda: not list(runtime.glob("*.sock")), 60, "the idle hospital process to stop")
