"""The `hospital-fl` command: names itself in every help, --version, and a follow-up hint that runs.

The hint (`command("audit", RUN)`) is executed for real: under `uv run`, and with the
project's environment's script but no activated environment (how pip users run it).
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import command

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_version_names_the_project_and_its_libraries():
    result = _cli("--version")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"hospital-fl {importlib.metadata.version('hospital-fl')} (") and "\n" not in line
    for name in ("flwr", "tensorflow", "tf-keras", "dp-accounting"):
        assert f"{name} {importlib.metadata.version(name)}" in line


@pytest.mark.parametrize("args, usage", [
    (["--help"], "usage: hospital-fl [-h] [--version] {simulate,audit,certs}"),
    (["simulate", "--help"], "usage: hospital-fl simulate [-h]"),
    (["audit", "--help"], "usage: hospital-fl audit [-h]"),
    (["certs", "--help"], "usage: hospital-fl certs [-h]"),
    (["certs", "hospital-key", "--help"], "usage: hospital-fl certs hospital-key [-h]"),
])
def test_every_help_names_the_command_it_was_called_by(args, usage):
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage), result.stdout[:300]
    assert "python -m server." not in result.stdout and "simulation.py" not in result.stdout


def test_no_command_or_an_unknown_one_is_exit_2_in_one_line():
    unknown = _cli("train")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "unknown command 'train'" in unknown.stderr
    assert _cli().returncode == 2
    assert _cli("--bogus").returncode == 2


def test_hint_under_uv_is_uv_run_and_it_runs():
    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not Path(uv).is_file():
        pytest.skip("uv is not installed")
    assert command("audit", "runs/a b", environ={"UV": uv}) == "uv run hospital-fl audit 'runs/a b'"
    # What a `uv run simulate.py` process prints, run from the project as a user would.
    printed = subprocess.run([uv, "run", "--no-sync", "--offline", "python", "-c",
                              "from server.cli import command; print(command('audit', '--help'))"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert printed.returncode == 0, printed.stderr[-2000:]
    hint = printed.stdout.strip().splitlines()[-1]
    assert hint == "uv run hospital-fl audit --help"
    env = {**os.environ, "PATH": f"{Path(uv).parent}:/usr/bin:/bin"}
    env.pop("VIRTUAL_ENV", None)
    ran = subprocess.run(hint.replace("uv run", f"{uv} run --no-sync --offline", 1), shell=True, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0 and ran.stdout.startswith("usage: hospital-fl audit"), ran.stderr[-2000:]


@pytest.mark.skipif(not (BIN / "hospital-fl").is_file(), reason="the project is not installed in this environment")
def test_hint_without_uv_is_the_installed_script_and_it_runs_without_an_activated_environment():
    bare = {"PATH": "/usr/bin:/bin"}
    hint = command("audit", "--help", environ=bare)
    assert hint == f"{BIN / 'hospital-fl'} audit --help"  # venv/bin/hospital-fl: works without `activate`
    ran = subprocess.run(hint, shell=True, cwd="/", env={**bare, "HOME": os.environ.get("HOME", "/")},
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and ran.stdout.startswith("usage: hospital-fl audit"), ran.stderr[-2000:]
    # With the environment's bin on PATH (activated, or pip installed globally): the bare command.
    assert command("audit", "RUN", environ={"PATH": f"{BIN}:/usr/bin"}) == "hospital-fl audit RUN"


def test_hint_without_an_installed_script_is_this_python_with_the_module(tmp_path):
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    assert command("audit", "RUN", environ={"PATH": "/usr/bin"}, executable=str(python)) == \
        f"{python} -m server.cli audit RUN"
