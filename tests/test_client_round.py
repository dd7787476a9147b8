"""One hospital's DP-SGD round through client/task.py: real TensorFlow, engine and accountant."""
import numpy as np
import pytest

from client.odometer import PrivacyOdometer
from client.task import HospitalSite, TrainSettings, evaluate_round, noise_plan, train_round
from common.config import load_config
from common.eval_privacy import scores
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
    config = load_config(None, ["train.batch_size=20", "dp.noise_multiplier=1.0"])
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
    # Evaluation releases noisy per-class counts under the hospital's evaluation budget (its
    # max-epsilon when the node config names none), never exact scores or a loss.
    metrics, privacy = evaluate_round(site, config, outcome.weights, {"server-round": 1, "planned-evaluations": 1},
                                      7, {"hospital-id": "hospital-0"})
    assert privacy["status"] == "evaluated" and "loss" not in metrics and "accuracy" not in metrics
    assert len(metrics["correct"]) == len(metrics["missed"]) == 10
    assert 0 < metrics["evaluation-epsilon"] <= 20.0
    assert 0.0 <= scores(metrics["correct"], metrics["missed"], metrics["num-examples"])["accuracy"] <= 1.0


def test_round_declines_past_the_budget_and_sends_nothing(digits, tmp_path):
    config = load_config(None, ["train.batch_size=20", "dp.noise_multiplier=1.0"])
    site = _site(digits, tmp_path, max_epsilon=0.5)
    outcome = train_round(site, config, TrainSettings.from_config(config), _initial(config), run_id=1, round_number=1)
    assert outcome.status == "budget_exhausted"
    assert outcome.weights is None and outcome.event.steps == 0 and outcome.epsilon == 0.0
    assert not (tmp_path / "h0.jsonl").exists()


def test_auto_noise_spends_the_budget_over_the_planned_rounds(digits, tmp_path):
    """With dp.noise_multiplier auto the hospital plans sigma so that every planned round fits."""
    config = load_config(None, ["train.batch_size=40", "rounds=3", "privacy.max_epsilon=2.0"])
    assert config.dp.noise_multiplier == "auto"
    site = _site(digits, tmp_path, max_epsilon=2.0)
    settings = TrainSettings.from_config(config)
    weights, outcomes = _initial(config), []
    for round_number in (1, 2, 3):
        outcome = train_round(site, config, settings, weights, run_id=3, round_number=round_number)
        assert outcome.status == "trained"
        outcomes.append(outcome)
        weights = outcome.weights
    sigmas = {o.event.noise_multiplier for o in outcomes}
    assert len(sigmas) == 1  # planned once per run, then reused
    final = outcomes[-1].epsilon
    assert 0.9 * 2.0 <= final <= 2.0
    assert final == pytest.approx(epsilon([o.event for o in outcomes], 1e-5), rel=1e-9)
    assert not outcomes[-1].can_train_again  # the plan is spent
    # A smaller sigma would have passed the budget: the plan is the smallest that fits.
    (sigma,) = sigmas
    smaller = PrivacyEvent(sigma * 0.99, outcomes[0].event.sampling_rate, 3 * outcomes[0].event.steps)
    assert epsilon([smaller], 1e-5) > 2.0

    # A new run on the same odometer plans with what is left (nothing useful here): it declines.
    again = train_round(site, config, settings, weights, run_id=4, round_number=1)
    assert again.status == "budget_exhausted" and again.weights is None and again.event.steps == 0
    assert again.epsilon == pytest.approx(final)


def test_auto_noise_replans_with_the_budget_left(digits, tmp_path):
    config = load_config(None, ["train.batch_size=40", "rounds=2", "privacy.max_epsilon=4.0"])
    site = _site(digits, tmp_path, max_epsilon=4.0)
    settings = TrainSettings.from_config(config)
    first = train_round(site, config, settings, _initial(config), run_id=1, round_number=1)
    # The first run stops after one of its two planned rounds; the next run plans with the rest.
    second_plan = noise_plan(site, settings, run_id=2, round_number=1)
    assert second_plan.epsilon_before == pytest.approx(first.epsilon)
    assert second_plan.epsilon_after <= 4.0
    assert second_plan.noise_multiplier > first.event.noise_multiplier  # less budget, more noise


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


def test_a_round_received_after_the_coordinators_deadline_is_refused_before_any_charge(digits, tmp_path):
    """A SuperNode frozen with the train message in hand and resumed after the round's timeout
    (tests/test_faults_deploy_restart.py freezes one) must not spend budget on a reply the
    coordinator no longer counts: the message's creation time plus its time to live has passed."""
    import time

    from client.task import SettingsError

    config = load_config(None, ["train.batch_size=20", "dp.noise_multiplier=1.0"])
    site = _site(digits, tmp_path)
    settings = TrainSettings.from_config(config)
    with pytest.raises(SettingsError, match="after the coordinator's deadline.*nothing charged"):
        train_round(site, config, settings, _initial(config), run_id=7, round_number=1, deadline=time.time() - 5)
    assert not (tmp_path / "h0.jsonl").exists() or PrivacyOdometer(tmp_path / "h0.jsonl", "hospital-0", 20.0,
                                                                    1e-5).spent() == 0.0
    outcome = train_round(site, config, settings, _initial(config), run_id=7, round_number=1,
                          deadline=time.time() + 600)
    assert outcome.status == "trained" and outcome.epsilon > 0
