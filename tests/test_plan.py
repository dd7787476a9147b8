"""The privacy plan: a hospital plans its noise from its own facts and tells the coordinator before round 1."""
import math

import numpy as np
import pytest

from tests.test_hostile import _context, _image_folder, _message


def _plan_content(noise="auto", rounds=5, batch=8):
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({"config": ConfigRecord({
        "batch_size": batch, "local_epochs": 1.0, "learning_rate": 0.2, "momentum": 0.9, "lr_schedule": "cosine",
        "l2_norm_clip": 1.0, "noise_multiplier": noise, "planned_rounds": rounds})})


def test_a_hospital_answers_the_plan_query_with_public_numbers_within_its_budget(tmp_path):
    from client.client_app import app
    from common.privacy import PrivacyEvent, epsilon

    folder = _image_folder(tmp_path / "data")
    context = _context({"data-source": "folder", "data-path": str(folder), "max-epsilon": 4.0}, tmp_path)
    reply = app(_message("query", _plan_content()), context)
    assert not reply.has_error()
    plan = dict(reply.content["plan"])
    n = plan["num-examples"]
    assert plan["hospital"] == "hospital-x" and 28 <= n < 40  # 40 images, ~10% held out by the hospital
    assert plan["sampling-rate"] == pytest.approx(8 / n)
    assert plan["steps-per-round"] == math.ceil(n / 8) and plan["rounds-planned"] == 5
    # The planned sigma spends at least 90% of the budget over the planned rounds and never more.
    sigma = plan["noise-multiplier"]
    total = PrivacyEvent(sigma, 8 / n, 5 * plan["steps-per-round"])
    assert plan["epsilon-planned"] == pytest.approx(epsilon([total], 1e-5), rel=1e-9)
    assert 0.9 * 4.0 <= plan["epsilon-planned"] <= 4.0
    assert epsilon([PrivacyEvent(sigma * 0.99, 8 / n, 5 * plan["steps-per-round"])], 1e-5) > 4.0
    # Only numbers, the hospital's name and its unit of privacy: nothing from its files.
    assert set(plan) == {"hospital", "num-examples", "unit", "sampling-rate", "steps-per-round", "epsilon-before",
                         "max-epsilon", "delta", "noise-multiplier", "epsilon-planned", "rounds-planned"}
    assert plan["unit"] == "image"  # an npz names no patient
    assert not (tmp_path / "odometer.jsonl").exists()  # planning charges nothing


def test_plan_lines_show_each_hospital_and_who_declines():
    from server.plan import plan_lines

    plans = {
        "hospital-1": {"num-examples": 900, "sampling-rate": 0.1422, "steps-per-round": 8, "epsilon-before": 0.0,
                       "max-epsilon": 3.0, "delta": 1e-5, "noise-multiplier": 2.73, "epsilon-planned": 2.998,
                       "rounds-planned": 20},
        "hospital-0": {"num-examples": 120, "sampling-rate": 1.0, "steps-per-round": 1, "epsilon-before": 2.99,
                       "max-epsilon": 3.0, "delta": 1e-5},
    }
    lines = plan_lines(plans, 20)
    assert "20 round(s)" in lines[0]
    assert lines[2].split()[0] == "hospital-0" and "declines" in lines[2]
    assert lines[3].split()[:2] == ["hospital-1", "900"] and "2.73" in lines[3] and "2.998" in lines[3]
    # A hospital whose query failed is named by its node and the failure's category, not "did not answer".
    assert plan_lines(plans, 20, {"node 7": "budget"})[-1].startswith("  node 7 could not plan (budget)")
    assert plan_lines({}, 20, {"node 7": "data"})[:2] == ["Privacy plan: no hospital could plan:",
                                                         "  node 7 could not plan (data): it will fail its rounds "
                                                         "the same way; its own log says why"]


def test_fixed_noise_is_kept_and_the_plan_shows_where_it_ends(tmp_path):
    from client.client_app import app

    folder = _image_folder(tmp_path / "data")
    context = _context({"data-source": "folder", "data-path": str(folder)}, tmp_path)
    plan = dict(app(_message("query", _plan_content(noise=0.6, rounds=20)), context).content["plan"])
    assert plan["noise-multiplier"] == 0.6  # the config's sigma, not a planned one
    assert np.isfinite(plan["epsilon-planned"]) and plan["epsilon-planned"] > 8.0  # past the budget: it stops early


def test_a_model_at_chance_level_is_named_with_why_the_data_is_too_small():
    from server.report import chance_warning

    latest = {"hospital-0": {"status": "trained", "num_examples": 31, "sampling_rate": 16 / 31,
                             "noise_multiplier": 3.9, "max_epsilon": 3.0},
              "hospital-1": {"status": "trained", "num_examples": 140, "sampling_rate": 16 / 140,
                             "noise_multiplier": 2.1, "max_epsilon": 3.0},
              # A declined round's record: its sigma is no noise anyone trained with, and it is the smallest.
              "hospital-2": {"status": "budget_exhausted", "num_examples": 20, "sampling_rate": 16 / 20,
                             "noise_multiplier": 64.0, "max_epsilon": 3.0}}
    (line,) = chance_warning({"round": 20, "balanced_accuracy": 0.51, "classes": 2, "single_class": 0}, latest)
    assert "the data is too small for this budget" in line and "31 training examples" in line and "sigma 3.9" in line
    assert chance_warning({"round": 20, "balanced_accuracy": 0.62, "classes": 2}, latest) == []
    assert "same class" in chance_warning({"round": 20, "balanced_accuracy": 0.125, "classes": 8, "single_class": 1},
                                          latest)[0]
    # A run of one round is named as the first suspect, not the data.
    (short,) = chance_warning({"round": 1, "balanced_accuracy": 0.1, "classes": 10, "single_class": 0}, latest)
    assert "only 1 round(s) ran" in short and "may also be too small" in short
    # Nobody trained last: no noise figure is made up.
    (none,) = chance_warning({"round": 20, "balanced_accuracy": 0.1, "classes": 10}, {"hospital-2": latest["hospital-2"]})
    assert "no hospital's last round trained" in none and "sigma" not in none


def test_a_hospital_that_declines_a_round_declines_the_rest_of_the_run(tmp_path):
    from flwr.app import ArrayRecord, Context, RecordDict

    from client.client_app import app
    from common.privacy import PrivacyEvent, epsilon, useful_noise_limit
    from tests.test_hostile import _default_model_weights

    folder = _image_folder(tmp_path / "data")
    probe = dict(app(_message("query", _plan_content(rounds=2)), _context(
        {"data-source": "folder", "data-path": str(folder)}, tmp_path / "probe")).content["plan"])
    q, steps = probe["sampling-rate"], int(probe["steps-per-round"])
    limit = useful_noise_limit(8)
    # A budget that pays one round at the noise limit but not two: planned over the run's two
    # rounds the hospital declines round 1; planned again over one round it could "train".
    one, two = epsilon([PrivacyEvent(limit, q, steps)], 1e-5), epsilon([PrivacyEvent(limit, q, 2 * steps)], 1e-5)
    node = {"data-source": "folder", "data-path": str(folder), "max-epsilon": (one + two) / 2,
            "odometer-path": str(tmp_path / "odometer.jsonl")}
    context = _context(node, tmp_path)

    def train(server_round, context):
        content = _plan_content(rounds=2)
        content["config"]["server-round"] = server_round
        content["arrays"] = ArrayRecord(_default_model_weights((16, 16, 1)))
        return dict(app(_message("train", content), context).content["metrics"])

    assert train(1, context)["budget-exhausted"] == 1
    assert train(2, context)["budget-exhausted"] == 1  # as the plan said: the whole run
    assert not (tmp_path / "odometer.jsonl").exists()  # nothing charged
    # Without the memory of its decline, round 2 would have bought a round of near-pure noise.
    fresh = Context(run_id=77, node_id=1, node_config=context.node_config, state=RecordDict(), run_config={})
    assert train(2, fresh)["budget-exhausted"] == 0


def test_the_summary_says_where_a_run_with_a_skipped_round_ended(tmp_path):
    from server.report import summary_lines
    from server.run_dir import RunDirectory

    run = RunDirectory.create(tmp_path / "run")
    for number in (1, 3):  # a deployed round 2 was cut short by a stop and is not rerun on resume
        run.append_metrics({"round": number, "accuracy": 0.5, "loss": 1.0})
    (line,) = [text for text in summary_lines(run, {}, [], {}, 12.0, first_round=3, planned_rounds=3)
               if text.startswith("Finished")]
    assert line == ("Finished 2 round(s) (through round 3; a round cut short is not rerun), 1 of them since the "
                    "resume, in 12.0 s.")
