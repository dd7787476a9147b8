"""Bring your own model: `model.builder: package.module:function` on both sides of a simulation.

The builder below is the "user's" network (defined in this test module); the simulation is
told about it through the config key alone, and the saved global model must be that network.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def user_mlp(input_shape, num_classes):
    """A user's own tf-keras network: a one-hidden-layer MLP with recognisable layer names."""
    from common.tf_setup import keras

    return keras.Sequential([
        keras.layers.InputLayer(input_shape=input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(24, activation="tanh", name="user_hidden"),
        keras.layers.Dense(1 if num_classes == 2 else num_classes,
                           activation="sigmoid" if num_classes == 2 else "softmax", name="user_output"),
    ])


def not_a_model(input_shape, num_classes):
    return "a string"


def test_make_model_uses_the_builder_and_refuses_what_is_not_a_model(monkeypatch):
    from common.model import make_model

    monkeypatch.syspath_prepend(str(HERE))
    config = load_config(None, ["model.builder=test_model_builder:user_mlp"])
    model = make_model(config.model, (8, 8, 1), 10)
    assert [layer.name for layer in model.layers][-2:] == ["user_hidden", "user_output"]
    assert model.output_shape == (None, 10)
    default = make_model(load_config(None).model, (8, 8, 1), 10)
    assert any(layer.__class__.__name__ == "Conv2D" for layer in default.layers)
    with pytest.raises(UserError, match="not a tf-keras model"):
        make_model(load_config(None, ["model.builder=test_model_builder:not_a_model"]).model, (8, 8, 1), 10)
    with pytest.raises(UserError, match="cannot load it"):
        make_model(load_config(None, ["model.builder=no_such_module:f"]).model, (8, 8, 1), 10)
    with pytest.raises(UserError, match="package.module:function"):
        load_config(None, ["model.builder=not a spec"])


@pytest.mark.slow
def test_simulation_trains_a_user_supplied_keras_model(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "simulate.py", "--out", str(run), "--set", "model.builder=test_model_builder:user_mlp",
         "--set", "hospitals=2", "--set", "rounds=1", "--set", "train.batch_size=32",
         "--set", f"privacy.odometer_dir={tmp_path / 'odometer'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ledger = [json.loads(line) for line in (run / "privacy_ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 2 and all(r["status"] == "trained" and r["steps"] > 0 for r in ledger)
    from common.tf_setup import keras

    model = keras.models.load_model(run / "model.keras")
    assert [layer.name for layer in model.layers] == ["flatten", "user_hidden", "user_output"]


def test_simulate_refuses_a_builder_it_cannot_import_before_start_up(tmp_path):
    result = subprocess.run([sys.executable, "simulate.py", "--out", str(tmp_path / "run"),
                             "--set", "model.builder=no_such_module:build"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "model.builder" in result.stderr and "Traceback" not in result.stderr


def test_a_model_too_large_for_the_machine_is_refused_with_what_to_lower(monkeypatch):
    import psutil

    from common.config import ModelConfig
    from common.model import make_model

    small = psutil.virtual_memory()._replace(total=2**30)  # a 1 GB machine: a quarter is 256 MB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    # At 1024 px the default network's Dense layer takes 128*128*32*64 = 33.5M weights (~0.8 GB of copies).
    with pytest.raises(UserError, match=r"33,5\d\d,\d\d\d weights at input 1024x1024x1.*lower data.image_size"):
        make_model(ModelConfig(), (1024, 1024, 1), 2)
    assert make_model(ModelConfig(), (256, 256, 1), 2).count_params() < 3_000_000  # the 256 px network fits
