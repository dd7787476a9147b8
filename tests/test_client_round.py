"""One hospital's DP-SGD round through client/task.py: real TensorFlow, engine and accountant."""
import numpy as np
import pytest

from client.odometer import PrivacyOdometer
from client.task import HospitalSite, TrainSettings, evaluate_round, train_round
from common.config import load_config
from common.data import load_dataset
from common.dp_sgd import DPSGDEngine
from common.model import build_model
from common.privacy import PrivacyEvent, epsilon


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return data.train_x[:200], data.train_y[:200], data.train_x[200:260], data.train_y[200:260]


def _site(digits, tmp_path, max_epsilon=20.0):
    train_x, train_y, eval_x, eval_y = digits
    odometer = PrivacyOdometer(tmp_path / "h0.jsonl", "hospital-0", max_epsilon, 1e-5)
    return HospitalSite("hospital-0", train_x, train_y, eval_x, eval_y, 10, odometer)


def _initial(config):
    model = build_model((8, 8, 1), 10, config.model.filters, config.model.dense_units, config.model.activation)
    return model.get_weights()


def test_round_trains_charges_and_reports(digits, tmp_path):
    config = load_config(None, ["train.batch_size=20"])
    site = _site(digits, tmp_path)
    settings = TrainSettings.from_config(config)
    weights = _initial(config)
    outcome = train_round(site, config, settings, weights, run_id=7, round_number=1)
    assert outcome.status == "trained"
    assert outcome.event == PrivacyEvent(config.dp.noise_multiplier, 0.1, 10)
    assert any(not np.allclose(a, b) for a, b in zip(weights, outcome.weights))
    assert all(np.all(np.isfinite(w)) for w in outcome.weights)
    assert outcome.epsilon > 0
    assert outcome.epsilon == pytest.approx(epsilon([outcome.event], 1e-5), rel=1e-9)
    assert outcome.num_examples == 200 and outcome.prior_events == []
    # Charged on disk before the update could leave.
    assert PrivacyOdometer(tmp_path / "h0.jsonl", "hospital-0", 20.0, 1e-5).spent() == pytest.approx(outcome.epsilon)
    scores = evaluate_round(site, config, outcome.weights)
    assert 0.0 <= scores["accuracy"] <= 1.0 and np.isfinite(scores["loss"])


def test_round_declines_past_the_budget_and_sends_nothing(digits, tmp_path):
    config = load_config(None, ["train.batch_size=20"])
    site = _site(digits, tmp_path, max_epsilon=0.5)
    outcome = train_round(site, config, TrainSettings.from_config(config), _initial(config), run_id=1, round_number=1)
    assert outcome.status == "budget_exhausted"
    assert outcome.weights is None and outcome.event.steps == 0 and outcome.epsilon == 0.0
    assert not (tmp_path / "h0.jsonl").exists()


def test_per_example_clipping_bound_holds(digits):
    train_x, train_y, _, _ = digits
    clip = 0.05  # small enough that every digit's gradient is clipped
    model = build_model((8, 8, 1), 10)
    engine = DPSGDEngine(model, l2_norm_clip=clip, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    for i in range(5):
        single = engine.clipped_gradient_sum(train_x[i:i + 1], train_y[i:i + 1])
        norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in single))
        assert norm <= clip * (1 + 1e-4)
        assert norm >= clip * 0.999  # it was over the bound, so it sits on it
    total = engine.clipped_gradient_sum(train_x[:32], train_y[:32])
    assert np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in total)) <= 32 * clip * (1 + 1e-4)
