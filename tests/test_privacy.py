"""Accounting and the hospital's odometer: dp-accounting figures, restarts, budgets."""
import functools
import math
import warnings

import dp_accounting
import numpy as np
import pytest

from client.odometer import PrivacyOdometer
from common.errors import UserError
from common import privacy
from common.privacy import PrivacyEvent, compute_ahead, epsilon
from common.sampling import sampling_rate_for, steps_for
from common.tf_setup import tf_privacy


def _pld(q, sigma, steps, delta):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)


def test_epsilon_matches_dp_accounting_and_tf_privacy_statement():
    q, sigma, epochs, n, delta = 0.02, 1.1, 5, 5000, 1e-5
    steps = steps_for(epochs, q)
    assert steps == 250
    ours = epsilon([PrivacyEvent(sigma, q, steps)], delta)
    assert ours == pytest.approx(_pld(q, sigma, steps, delta), rel=1e-9)
    # tensorflow-privacy's statement reports RDP figures; PLD is tighter but must stay close.
    _, _, privacy_lib = tf_privacy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        statement = privacy_lib.compute_dp_sgd_privacy_statement(
            number_of_examples=n, batch_size=int(q * n), num_epochs=epochs, noise_multiplier=sigma,
            delta=delta, used_microbatching=False)
    poisson_line = next(line for line in statement.splitlines() if "Poisson" in line)
    rdp_poisson = float(poisson_line.split()[-1])
    assert ours <= rdp_poisson * 1.001
    assert ours >= 0.8 * rdp_poisson  # the RDP-vs-PLD gap is a few percent to ~15% here
    assert epsilon([PrivacyEvent(sigma, q, steps)], delta, "rdp") == pytest.approx(rdp_poisson, rel=2e-3)


def test_composition_over_rounds_equals_one_long_run():
    rounds = [PrivacyEvent(1.0, 0.1, 10)] * 4
    assert epsilon(rounds, 1e-5) == pytest.approx(epsilon([PrivacyEvent(1.0, 0.1, 40)], 1e-5), rel=1e-9)
    mixed = epsilon([PrivacyEvent(1.0, 0.1, 10), PrivacyEvent(2.0, 0.05, 10)], 1e-5)
    assert mixed > epsilon([PrivacyEvent(1.0, 0.1, 10)], 1e-5)


def test_a_figure_computed_ahead_is_the_figure_and_is_computed_once(monkeypatch):
    events = [PrivacyEvent(1.3, 0.037, 6), PrivacyEvent(1.3, 0.037, 6)]
    direct = _pld(0.037, 1.3, 12, 1e-5)
    privacy._epsilon.cache_clear()
    calls = []
    computed = privacy._epsilon.__wrapped__
    monkeypatch.setattr(privacy, "_epsilon", functools.lru_cache(maxsize=8)(lambda *key: calls.append(key) or computed(*key)))
    monkeypatch.setattr(privacy, "_ahead", {})  # not the figures earlier tests asked for ahead
    compute_ahead(events, 1e-5)
    compute_ahead([PrivacyEvent(1.3, 0.037, 12)], 1e-5)  # the same figure (merged steps): not started twice
    assert epsilon([PrivacyEvent(1.3, 0.037, 12)], 1e-5) == pytest.approx(direct, rel=1e-9)
    assert epsilon(events, 1e-5) == pytest.approx(direct, rel=1e-9)
    assert len(calls) == 1 and not privacy._ahead
    compute_ahead([PrivacyEvent(0.0, 0.037, 3)], 1e-5)  # zero noise, ahead or not: infinite
    assert epsilon([PrivacyEvent(0.0, 0.037, 3)], 1e-5) == math.inf


def test_edges_fail_safe():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([PrivacyEvent(1.0, 0.1, 0)], 1e-5) == 0.0
    assert epsilon([PrivacyEvent(0.0, 0.1, 3)], 1e-5) == math.inf
    with pytest.raises(ValueError):
        PrivacyEvent(1.0, 0.1, 3, sampling="shuffle")
    assert sampling_rate_for(64, 32) == 1.0


def test_odometer_survives_a_restart(tmp_path):
    path = tmp_path / "odometer" / "hospital-0.jsonl"
    first = PrivacyOdometer(path, "hospital-0", max_epsilon=5.0, delta=1e-5)
    event = PrivacyEvent(1.2, 0.1, 20)
    first.charge(event, run=1, round_number=1, epsilon_after=first.epsilon_after(event))
    spent = first.spent()
    assert spent > 0
    again = PrivacyOdometer(path, "hospital-0", max_epsilon=5.0, delta=1e-5)  # a new process, a new run
    assert again.spent() == pytest.approx(spent)
    assert again.prior_events(run=2) == [event]
    assert again.epsilon_after(event) > spent


def test_corrupt_odometer_refuses_to_train(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"noise_multiplier": 1.0, "sampling_rate": 0.1}\n')
    with pytest.raises(UserError, match="odometer"):
        PrivacyOdometer(path, "h", 1.0, 1e-5)


def test_a_huge_budget_is_planned_at_the_noise_floor_and_underspent():
    """Budget 1000 once planned sigma 0.07, whose PLD took minutes and ~13 GB: the floor stops that."""
    from common.privacy import MIN_NOISE, plan_noise

    plan = plan_noise([], 0.13, 8, 20, 1000.0, 1e-5)
    assert plan.noise_multiplier == MIN_NOISE
    assert plan.epsilon_after == pytest.approx(epsilon([PrivacyEvent(MIN_NOISE, 0.13, 160)], 1e-5))
    assert plan.epsilon_after < 1000.0
    # Just above the floor the search still finds the smallest sigma that fits.
    tight = plan_noise([], 0.13, 8, 20, 30.0, 1e-5)
    assert MIN_NOISE < tight.noise_multiplier and tight.epsilon_after <= 30.0
    assert epsilon([PrivacyEvent(tight.noise_multiplier * 0.99, 0.13, 160)], 1e-5) > 30.0


def test_batch_size_auto_is_a_power_of_two_up_to_a_quarter_of_the_examples():
    from common.sampling import expected_batch_size

    # BreastMNIST-, digits- and blood-cell-sized hospitals get what was measured best for each.
    assert [expected_batch_size("auto", n) for n in (31, 110, 216, 259, 536, 1051, 50_000)] == [16, 16, 32, 64, 128, 128, 128]
    assert expected_batch_size(40, 259) == 40  # a number is taken as it is
    assert sampling_rate_for("auto", 259) == 64 / 259
    assert expected_batch_size("auto", 10) == 10  # fewer than 16: every example, every step (and it will decline)


def test_a_hospital_of_a_few_images_gets_them_all_as_its_batch_and_declines():
    from common.partition import check_shards
    from common.privacy import plan_noise, useful_noise_limit
    from common.sampling import expected_batch_size, steps_for

    check_shards([np.zeros(5), np.zeros(300)], ["tiny", "large"], "auto")  # the federation is not refused for it
    batch = expected_batch_size("auto", 5)
    q = sampling_rate_for("auto", 5)
    assert (batch, q) == (5, 1.0)
    assert plan_noise([], q, steps_for(1.0, q), 20, 3.0, 1e-5, max_noise=useful_noise_limit(batch)) is None
