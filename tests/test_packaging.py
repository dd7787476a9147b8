"""The wheel: what `pip install .` puts on a machine, checked without downloading anything.

The full check (a fresh Python 3.11 venv, `pip install .`, `hospital-fl simulate --set
rounds=2`) downloads about 1 GB and is recorded in the README; here the wheel is built,
unpacked and used as an installed copy would be.
"""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, a directory holding the unpacked wheel as site-packages would)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed: it builds the wheel here (pip would need to download hatchling)")
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([uv, "build", "--wheel", "-o", str(out), str(ROOT)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("hospital_fl-*.whl")
    site = tmp_path_factory.mktemp("site-packages")
    zipfile.ZipFile(wheel).extractall(site)
    return wheel, site


def _run(site: Path, cwd: Path, *args):
    """Python with the unpacked wheel first on the path, from a directory that is not the source tree."""
    env = {"PYTHONPATH": str(site), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "FLWR_TELEMETRY_ENABLED": "0", "HOME": str(cwd)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_ships_configs_the_console_command_and_no_tensorflow_privacy(installed):
    wheel, _ = installed
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    for needed in ("configs/default.yaml", "server/flower_app/pyproject.toml", "server/server_app.py",
                   "client/client_app.py", "common/config.py", "server/cli.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "bench/", "runs/", "odometer/")) for n in names)
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    metadata = archive.read(f"{dist_info}/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    # tensorflow-privacy 0.9.0 pins dp-accounting 0.4.3: with it, plain pip cannot resolve.
    assert not any("tensorflow-privacy" in line for line in requires), requires
    assert any("dp-accounting" in line for line in requires)
    assert any("flwr[simulation]" in line and "<1.43" in line for line in requires), requires
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert "hospital-fl = server.cli:main" in entry_points


@pytest.mark.slow
def test_installed_copy_finds_its_configs_and_assembles_a_flower_app(installed, tmp_path):
    _, site = installed
    probe = (
        "from pathlib import Path\n"
        "from common.config import load_config, from_run_config, PROJECT_ROOT\n"
        "import server.simulation as s\n"
        "from server.flower_launch import app_directory\n"
        "assert PROJECT_ROOT == Path(%r), PROJECT_ROOT\n"
        "config = from_run_config({'config-path': 'configs/default.yaml', 'rounds': 2})\n"
        "assert config.rounds == 2 and config.hospitals == load_config(s.default_config_path()).hospitals\n"
        "print(app_directory(Path(%r)))\n"
    ) % (str(site), str(tmp_path / "flwr-home"))
    result = _run(site, tmp_path, "-c", probe)
    assert result.returncode == 0, result.stdout + result.stderr
    app = Path(result.stdout.strip().splitlines()[-1])
    assert app == tmp_path / "flwr-home" / "app"
    assert (app / "pyproject.toml").is_file() and (app / "configs" / "default.yaml").is_file()
    # The assembled app is a valid Flower App: `flwr build` packs it.
    build = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(app)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300,
                           env={"FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": "/usr/bin:/bin"})
    assert build.returncode == 0, build.stdout + build.stderr
    fab = next(tmp_path.glob("*.fab"))
    assert "client/task.py" in zipfile.ZipFile(fab).namelist()


@pytest.mark.slow
def test_console_command_dispatches_to_each_tool(installed, tmp_path):
    _, site = installed
    for command, expected in (("--help", "simulate"), ("audit --help", "ledger"), ("certs --help", "usage")):
        result = _run(site, tmp_path, "-m", "server.cli", *command.split())
        assert result.returncode == 0, result.stdout + result.stderr
        assert expected in result.stdout.lower()
    unknown = _run(site, tmp_path, "-m", "server.cli", "train")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "unknown command" in unknown.stderr
    bad = _run(site, tmp_path, "-m", "server.cli", "simulate", "--set", "rounds=zero")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "rounds" in bad.stderr


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_flower_run_config_declares_typed_defaults_equal_to_the_embedded_config_and_they_override_nothing():
    """[tool.flwr.app.config]: what `flwr run .` users see is the embedded default (configs/default.yaml over
    common/config.py), with its type; a key at that value leaves config-json (simulate.py) and config-path alone."""
    import tomllib

    from common.config import from_run_config, load_config, to_dict

    declared = _flat(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    if declared["rounds"] == "":
        pytest.skip("pyproject still declares the flat keys as \"\" (typed defaults wait for from_run_config to "
                    "treat a key at its default as not set)")
    embedded = _flat(to_dict(load_config(None)))
    for key, value in declared.items():
        if key in ("config-path", "config-json", "run-dir", "resume-dir") or value == "":
            continue
        assert key in embedded and embedded[key] == value and type(embedded[key]) is type(value), key
    # What Flower hands the apps: the declared defaults, overridden by simulate.py's config-json.
    resolved = to_dict(load_config(None, ["rounds=3", "privacy.max_epsilon=5", "seed=7"]))
    fused = declared | {"config-json": json.dumps(resolved)}
    config = from_run_config(fused)
    assert (config.rounds, config.privacy.max_epsilon, config.seed) == (3, 5.0, 7)
    assert from_run_config(declared | {"rounds": 4}).rounds == 4  # a flat key set by --run-config still wins
