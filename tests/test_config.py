"""Config schema: defaults, YAML and --set overrides, and one-line refusals of bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import Config, flatten, from_dict, load_config, to_dict
from common.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_embedded_default_are_valid():
    config = load_config(ROOT / "configs" / "default.yaml")
    assert config.hospitals == 5 and config.data.source == "digits"
    assert config.privacy.delta == 1e-5
    assert from_dict(to_dict(config)) == config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 7\ndp:\n  noise_multiplier: 2.0\nprivacy:\n  delta: 1e-6\n")
    config = load_config(path, ["dp.noise_multiplier=1.5", "model.filters=[8, 16]", "data.path=[a.npz, b.npz]",
                                "hospitals=2", "data.source=npz"])
    assert config.rounds == 7
    assert config.dp.noise_multiplier == 1.5
    assert config.privacy.delta == 1e-6  # PyYAML reads 1e-6 as a string; the schema makes it a float
    assert config.model.filters == [8, 16]
    assert config.data.path == ["a.npz", "b.npz"]
    assert flatten(config)["train.batch_size"] == Config().train.batch_size


@pytest.mark.parametrize("override, words", [
    ("dp.noise_multiplier=-1", "dp.noise_multiplier"),
    ("dp.noise_multiplier=abc", "dp.noise_multiplier"),
    ("dp.noise=1", "unknown config key 'dp.noise'"),
    ("colour=blue", "unknown config key 'colour'"),
    ("privacy.delta=1.5", "privacy.delta"),
    ("data.partition=random", "data.partition"),
    ("rounds=2.5", "rounds"),
    ("rounds", "key=value"),
    ("data.source=npz", "data.path"),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        load_config(None, [override])


def test_wrong_type_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: [1, 2]\n")
    with pytest.raises(UserError, match="train.batch_size"):
        load_config(path)


def _simulate(*args):
    return subprocess.run([sys.executable, "simulate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("make_args, words", [
    (lambda tmp: ["--config", str(tmp / "missing.yaml")], "config file not found"),
    (lambda tmp: ["--config", str(_write(tmp, "rounds: [1\n"))], "not valid YAML"),
    (lambda tmp: ["--config", str(_write(tmp, "epochs: 3\n"))], "unknown config key 'epochs'"),
    (lambda tmp: ["--set", "train.batch_size=big"], "train.batch_size"),
    (lambda tmp: ["--set", "dp.clip=1"], "unknown config key 'dp.clip'"),
    (lambda tmp: ["--set", "dp.noise_multiplier=-0.5"], "dp.noise_multiplier"),
    (lambda tmp: ["--set", "data.source=npz", "--set", f"data.path={tmp / 'none.npz'}"], "none.npz"),
])
def test_cli_refuses_bad_input_in_one_line(tmp_path, make_args, words):
    result = _simulate(*make_args(tmp_path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and words in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def test_cli_never_reuses_a_run_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    result = _simulate("--out", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def _write(folder, text):
    path = folder / "config.yaml"
    path.write_text(text)
    return path
