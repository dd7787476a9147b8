"""Federated evaluation under DP (issue 25 item 5), with real TensorFlow, Flower messages and dp-accounting.

The hospital releases per-class correct and missed counts with Gaussian noise, charged to its
own evaluation budget before release; past that budget it declines in one line and releases
nothing; the coordinator checks and ledgers each reply; report.md and the audit state and
recompute the training and the evaluation epsilon.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from client.evaluation import evaluation_odometer_path, planned_sigma
from client.odometer import PrivacyOdometer
from client.task import evaluate_round, simulation_site
from common.config import Config, evaluation_rounds, validate
from common.eval_privacy import add_noise, exact_counts, query_event, scores
from common.model import make_model
from common.privacy import epsilon
from server.ledger import EvaluationLedger, PrivacyLedger
from server.replies import RoundPlan
from server.strategy import PrivateFedAvg

ROOT = Path(__file__).resolve().parent.parent
DELTA = 1e-5
SMALL = ["--set", "hospitals=2", "--set", "train.batch_size=32", "--set", "model.filters=[8,16]",
         "--set", "model.dense_units=16"]


# ---------------------------------------------------------------------------- the mechanism

def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _analytic_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of the Gaussian mechanism (L2 sensitivity 1, noise sigma) at delta.

    Balle and Wang (ICML 2018), Theorem 8: delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s),
    decreasing in eps; solved by bisection. Independent of dp-accounting."""
    def delta_of(eps):
        return _phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * _phi(-1 / (2 * sigma) - eps * sigma)

    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("budget, evaluations", [(1.0, 1), (3.0, 2), (3.0, 4), (8.0, 3)])
def test_planned_noise_gives_the_stated_epsilon(tmp_path, budget, evaluations):
    odometer = PrivacyOdometer(tmp_path / "h.eval.jsonl", "h", budget, DELTA)
    sigma = planned_sigma(odometer, run_id=1, planned=evaluations, num_units=500)
    stated = epsilon([query_event(sigma)] * evaluations, DELTA)
    # k Gaussian releases at sigma are exactly one Gaussian release at sigma / sqrt(k).
    exact = _analytic_epsilon(sigma / math.sqrt(evaluations), DELTA)
    assert stated <= budget
    assert exact <= stated <= exact + 2e-3  # PLD rounds pessimistically, never in the hospital's favour
    # The plan is the smallest sigma that fits (rounded up to 4 digits): 0.2% less would not.
    assert _analytic_epsilon(sigma * 0.998 / math.sqrt(evaluations), DELTA) > budget - 2e-3


def test_noise_has_the_calibrated_spread_and_a_patient_moves_the_counts_by_at_most_one():
    rng = np.random.default_rng(5)
    noisy = add_noise(np.zeros(200_000), 2.5)
    assert abs(noisy.std() - 2.5) < 0.02 and abs(noisy.mean()) < 0.03
    labels, predicted = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    patients = rng.integers(0, 60, 300)
    correct, missed = exact_counts(labels, predicted, 4, patients)
    assert correct.sum() + missed.sum() == pytest.approx(len(np.unique(patients)))  # each patient weighs 1
    moves = []
    for patient in np.unique(patients):
        keep = patients != patient
        c, m = exact_counts(labels[keep], predicted[keep], 4, patients[keep])
        moves.append(math.sqrt(np.sum((correct - c) ** 2) + np.sum((missed - m) ** 2)))
    assert max(moves) <= 1 + 1e-12 and min(moves) > 0
    single = exact_counts(np.array([1, 1, 1]), np.array([1, 1, 1]), 2, np.array([7, 7, 7]))
    assert single[0].tolist() == [0.0, 1.0]  # a patient's three images: one count, not three


def test_scores_from_counts():
    found = scores([40, 10], [10, 40], 100)
    assert found["accuracy"] == pytest.approx(0.5) and found["recall"] == [0.8, 0.2]
    assert found["balanced_accuracy"] == pytest.approx(0.5)
    assert evaluation_rounds(1, 20, 10) == [10, 20] and evaluation_rounds(1, 20, 0) == [20]
    assert evaluation_rounds(1, 23, 5) == [5, 10, 15, 20, 23]


# ---------------------------------------------------------------------------- the hospital

@pytest.fixture(scope="module")
def site_and_weights(tmp_path_factory):
    config = Config()
    config.hospitals, config.privacy.odometer_dir = 2, str(tmp_path_factory.mktemp("odometer"))
    config.model.filters, config.model.dense_units = [8, 16], 16
    config.privacy.eval_max_epsilon = 1.0
    validate(config)
    site = simulation_site(config, 0)
    model = make_model(config.model, site.train_x.shape[1:], site.num_classes)
    return config, site, model.get_weights()


@pytest.fixture
def task_identity():
    """Flower Messages need a run id; the ServerApp's process sets it, so does this fixture."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _reply(metrics: dict, privacy: dict, node: int) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                      message_type="evaluate")
    return Message(RecordDict({"metrics": MetricRecord(metrics), "privacy": ConfigRecord(privacy)}), reply_to=request)


def test_evaluation_past_the_budget_is_declined_in_one_line_and_releases_nothing(site_and_weights, caplog, tmp_path,
                                                                                  task_identity):
    config, site, weights = site_and_weights
    node = {"partition-id": 0}
    first_metrics, first_privacy = evaluate_round(site, config, weights, {"server-round": 1, "planned-evaluations": 1},
                                                  11, node)
    assert first_privacy["status"] == "evaluated" and len(first_metrics["correct"]) == 10
    assert 0 < first_metrics["evaluation-epsilon"] <= 1.0
    odometer = evaluation_odometer_path(site.odometer.path)
    charges = odometer.read_text().splitlines()
    assert len(charges) == 1 and json.loads(charges[0])["kind"] == "evaluation"
    # The training odometer is untouched: the two budgets are separate.
    assert not site.odometer.path.exists() or "evaluation" not in site.odometer.path.read_text()

    # A coordinator asking again, past the evaluation budget: declined, nothing released, nothing charged.
    caplog.set_level(logging.INFO, logger="hospital")
    caplog.clear()
    metrics, privacy = evaluate_round(site, config, weights, {"server-round": 2, "planned-evaluations": 1}, 11, node)
    assert privacy["status"] == "declined"
    assert "correct" not in metrics and "missed" not in metrics and metrics["queries"] == 0
    assert metrics["evaluation-epsilon"] == pytest.approx(first_metrics["evaluation-epsilon"])
    assert odometer.read_text().splitlines() == charges
    said = [r.getMessage() for r in caplog.records if r.name == "hospital"]
    assert len(said) == 1 and "declines evaluation" in said[0] and "\n" not in said[0]
    assert "evaluation budget" in said[0] or "budget left" in said[0]

    # The coordinator: the first reply ledgered and scored, the declined one said in one line.
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    strategy = PrivateFedAvg(ledger, RoundPlan(32, 1.0, 0.2, 0.9, 1.0), tmp_path / "rejected.jsonl",
                             num_classes=10, fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                             min_available_nodes=1)
    strategy.node_names = {"101": site.name}
    summary = strategy.aggregate_evaluate(1, [_reply(first_metrics, first_privacy, 101)])
    assert 0.0 <= summary["accuracy"] <= 1.0 and site.name in strategy.round_evaluation
    assert strategy.evaluation_lines == []
    assert strategy.aggregate_evaluate(2, [_reply(metrics, privacy, 101)]) is None
    assert strategy.evaluation_lines == [strategy.evaluation_lines[0]]
    assert strategy.evaluation_lines[0].strip().startswith(f"{site.name} declined evaluation (evaluation budget spent")
    assert strategy.round_evaluation == {}
    records = EvaluationLedger(tmp_path / "evaluation_ledger.jsonl").records
    assert [r["status"] for r in records] == ["evaluated", "declined"]
    assert records[1]["epsilon"] == pytest.approx(records[0]["epsilon"]) and records[1]["queries"] == 0
    # Not asked again this run.
    asked = strategy.configure_evaluate(3, ArrayRecord(weights), ConfigRecord({}), _Grid([101, 102]))
    assert [m.metadata.dst_node_id for m in asked] == [102]


def test_the_coordinator_rejects_a_forged_evaluation_epsilon(site_and_weights, tmp_path, task_identity):
    config, _, weights = site_and_weights
    other = simulation_site(config, 1)  # hospital-1: hospital-0's evaluation budget is another test's
    metrics, privacy = evaluate_round(other, config, weights, {"server-round": 1, "planned-evaluations": 3}, 12,
                                      {"partition-id": 1})
    assert privacy["status"] == "evaluated"
    strategy = PrivateFedAvg(PrivacyLedger(tmp_path / "privacy_ledger.jsonl"), RoundPlan(32, 1.0, 0.2, 0.9, 1.0),
                             tmp_path / "rejected.jsonl", num_classes=10, fraction_train=1.0, fraction_evaluate=1.0,
                             min_train_nodes=1, min_available_nodes=1)
    strategy.node_names = {"101": privacy["hospital"]}
    forged = dict(metrics) | {"evaluation-epsilon": metrics["evaluation-epsilon"] / 2}
    assert strategy.aggregate_evaluate(1, [_reply(forged, privacy, 101)]) is None
    assert strategy.round_evaluation == {} and not (tmp_path / "evaluation_ledger.jsonl").exists()
    assert "evaluation-epsilon" in (tmp_path / "rejected.jsonl").read_text()
    assert len(strategy.evaluation_lines) == 1 and "rejected" in strategy.evaluation_lines[0]
    # The honest reply passes.
    assert strategy.aggregate_evaluate(2, [_reply(metrics, privacy, 101)]) is not None


# ---------------------------------------------------------------------------- a whole run

@pytest.fixture(scope="module")
def honest_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval-run")
    run, odometer = base / "run", base / "odometer"
    result = subprocess.run([sys.executable, "simulate.py", *SMALL, "--set", "rounds=2", "--set",
                             "train.evaluate_every=1", "--set", f"privacy.odometer_dir={odometer}", "--out", str(run)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run, odometer


def _audit(run: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.audit", str(run), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # a real simulation
def test_ledger_and_report_carry_both_epsilons(honest_run):
    run, _ = honest_run
    training = [json.loads(line) for line in (run / "privacy_ledger.jsonl").read_text().splitlines()]
    evaluation = [json.loads(line) for line in (run / "evaluation_ledger.jsonl").read_text().splitlines()]
    assert {r["hospital"] for r in evaluation} == {r["hospital"] for r in training} == {"hospital-0", "hospital-1"}
    assert sorted(r["round"] for r in evaluation) == [1, 1, 2, 2]  # every round with evaluate_every=1
    for name in ("hospital-0", "hospital-1"):
        own = [r for r in evaluation if r["hospital"] == name]
        # Each figure recomputes from the ledger's own events (the same accountant the audit restates).
        for upto, record in enumerate(own, start=1):
            assert record["epsilon"] == pytest.approx(
                epsilon([query_event(r["noise_multiplier"]) for r in own[:upto]], record["delta"]), rel=1e-9)
        assert own[-1]["epsilon"] <= own[-1]["max_epsilon"] == 3.0  # auto: the training budget
    report = (run / "report.md").read_text()
    section = report[report.index("## Privacy of the federated evaluation"):]
    assert "| hospital | training epsilon | evaluation epsilon |" in section
    for name in ("hospital-0", "hospital-1"):
        t = [r for r in training if r["hospital"] == name][-1]["epsilon"]
        e = [r for r in evaluation if r["hospital"] == name][-1]["epsilon"]
        assert f"| {name} | {t:.3f} | {e:.3f} |" in section
        assert f"| {max(t, e):.3f} |" in section.split(f"| {name} |")[1].split("\n")[0] + "|"
    assert "larger of the two" in section
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = metrics[-1]["hospitals_evaluation"]["hospital-0"]
    assert "loss" not in final and len(final["correct"]) == 10 and 0 <= final["accuracy"] <= 1


@pytest.mark.slow  # a real simulation
def test_an_honest_run_passes_the_audit_which_recomputes_both(honest_run):
    run, odometer = honest_run
    result = _audit(run, "--odometer", str(odometer / "simulation.jsonl"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every evaluation epsilon recomputes" in result.stdout
    assert "training eps" in result.stdout and "evaluation eps" in result.stdout


@pytest.mark.slow  # a real simulation
def test_the_audit_catches_a_tampered_evaluation_epsilon(honest_run, tmp_path):
    run, odometer = honest_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / "evaluation_ledger.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[-1]["epsilon"] = records[-1]["epsilon"] * 0.5  # understated
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = _audit(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "evaluation epsilon" in result.stdout and "understated" in result.stdout

    # Dropping an evaluation from the ledger is caught against the hospitals' evaluation odometer.
    shutil.rmtree(copy)
    shutil.copytree(run, copy)
    path = copy / "evaluation_ledger.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    assert _audit(copy).returncode == 0  # the ledger alone is consistent ...
    result = _audit(copy, "--odometer", str(odometer / "simulation.jsonl"))
    assert result.returncode == 1, result.stdout + result.stderr  # ... but not with the odometer
    assert "evaluation ledger lacks" in result.stdout


# ---------------------------------------------------------------------------- a deployed hospital

def test_a_deployed_hospital_takes_its_evaluation_budget_from_its_node_config(tmp_path):
    """client.handlers.evaluate with a real node config: the budget is the node's, never the run config's."""
    from client.evaluation import NODE_KEY
    from client.handlers import evaluate
    from client.odometer import BudgetError
    from common.config import load_config, to_dict

    rng = np.random.default_rng(3)
    data = tmp_path / "h.npz"
    np.savez(data, train_images=rng.integers(0, 256, (240, 8, 8), dtype=np.uint8),
             train_labels=rng.integers(0, 2, 240))
    node = {"hospital-id": "st-marys", "data-source": "npz", "data-path": str(data), "max-epsilon": 8.0,
            "delta": 1e-5, "odometer-path": str(tmp_path / "odo.jsonl"), "eval-fraction": 0.25, NODE_KEY: 0.5}
    # A coordinator's run config asking for a larger evaluation budget changes nothing on a deployed node.
    config = load_config(None, ["model.filters=[4]", "model.dense_units=8", "privacy.eval_max_epsilon=50"])
    run_config = {"config-json": json.dumps(to_dict(config))}
    model = make_model(config.model, (8, 8, 1), 2)
    request = {"server-round": 1, "planned-evaluations": 2}
    metrics, privacy = evaluate(node, run_config, request, model.get_weights(), 5)
    assert privacy["status"] == "evaluated" and privacy["hospital"] == "st-marys"
    assert metrics["eval-max-epsilon"] == 0.5 and 0 < metrics["evaluation-epsilon"] <= 0.5
    assert len(metrics["correct"]) == 2 and 30 <= metrics["num-examples"] <= 90  # about a quarter held out
    assert (tmp_path / "odo.eval.jsonl").is_file() and not (tmp_path / "odo.jsonl").exists()
    second, _ = evaluate(node, run_config, request | {"server-round": 2}, model.get_weights(), 5)
    third, declined = evaluate(node, run_config, request | {"server-round": 3}, model.get_weights(), 5)
    assert second["evaluation-epsilon"] <= 0.5 and declined["status"] == "declined" and "correct" not in third
    # Without the key the evaluation budget is the node's training budget; a bad value is refused.
    node.pop(NODE_KEY)
    node["odometer-path"] = str(tmp_path / "other.jsonl")
    metrics, _ = evaluate(node, run_config, request, model.get_weights(), 6)
    assert metrics["eval-max-epsilon"] == 8.0
    with pytest.raises(BudgetError, match=NODE_KEY):
        evaluate({**node, NODE_KEY: "lots"}, run_config, request, model.get_weights(), 6)
    # The node config's evaluate=false: nothing released, nothing charged.
    node["odometer-path"] = str(tmp_path / "off.jsonl")
    metrics, privacy = evaluate({**node, "evaluate": "false"}, run_config, request, model.get_weights(), 7)
    assert privacy["status"] == "off" and metrics == {"num-examples": 0}
    assert not (tmp_path / "off.eval.jsonl").exists()
