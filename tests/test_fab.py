"""A Flower App Bundle carries code and configs only: never a hospital's or a run's files.

`flwr run` builds a FAB from the project directory and the coordinator forwards it to every
hospital, so anything private lying in the tree (odometers, a ledger, a training log, keys,
certificates: what the README's walkthroughs create) must stay out of it.
"""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRIVATE = {
    "odometer/hospital-0.jsonl": '{"epsilon": 1.0}\n',  # an odometer
    "odometer/hospital-0.train-log.jsonl": '{"train_loss": 0.4}\n',  # a local training log
    "demo/hospital-1/odometer.jsonl": '{"epsilon": 2.0}\n',  # the loopback walkthrough's
    "demo/hospital-1/notes.py": "SECRET = 1\n",  # even code under demo/ stays out
    "runs/run-1/privacy_ledger.jsonl": '{"round": 1}\n',  # a ledger
    "runs/run-1/config.yaml": "rounds: 1\n",  # a run's config, not the app's
    "keys/hospital-1.key": "-----BEGIN OPENSSH PRIVATE KEY-----\n",  # a SuperNode key
    "keys/hospital-1.pub": "ecdsa-sha2-nistp384 AAAA\n",
    "certs/ca.crt": "-----BEGIN CERTIFICATE-----\n",  # a certificate
    "certs/server.key": "-----BEGIN PRIVATE KEY-----\n",
    "bench/results/simulation.json": "{}\n",
    "server/stray-ledger.jsonl": '{"round": 1}\n',  # a ledger dropped inside a package
    ".venv/lib/site.py": "x = 1\n",
}


def _project_copy(tmp_path: Path) -> Path:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    app = tmp_path / "app"
    for name in tracked:
        if (ROOT / name).is_file():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, app / name)
    for name, text in PRIVATE.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    return app


def test_fab_holds_code_and_configs_and_none_of_the_private_files(tmp_path):
    app = _project_copy(tmp_path)
    flwr = Path(sys.executable).parent / "flwr"
    result = subprocess.run([str(flwr), "build", "--app", str(app)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={"FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": "/usr/bin:/bin",
                                              "FLWR_TELEMETRY_ENABLED": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    fabs = list(tmp_path.glob("*.fab")) + list(app.glob("*.fab"))
    assert len(fabs) == 1, (fabs, result.stdout)
    names = set(zipfile.ZipFile(fabs[0]).namelist())

    for name in PRIVATE:
        assert name not in names, f"{name} was packed into the app bundle"
    leaked = [n for n in names if n.endswith((".jsonl", ".key", ".crt", ".pem", ".pub"))
              or n.startswith(("runs/", "odometer/", "demo/", "keys/", "certs/", ".venv/", "bench/"))]
    assert leaked == []
    # What a hospital needs to run the ClientApp is there.
    for needed in ("pyproject.toml", "server/server_app.py", "client/client_app.py", "client/task.py",
                   "common/config.py", "configs/default.yaml"):
        assert needed in names, needed
    assert all(n == "pyproject.toml" or n.startswith((".info/", "server/", "client/", "common/", "configs/"))
               for n in names), sorted(names)
