"""report.md: privacy statement per hospital, final scores, embedded plots, readable at 50 hospitals."""
import json
from pathlib import Path
from types import SimpleNamespace

import yaml

from common.config import load_config, to_dict
from common.federation import central_test_set, hospital_label_counts, load_federation
from server.report_md import write_report


def _fake_run(path: Path, hospitals: int, rounds: int):
    """A run directory as the ServerApp writes it (digits, `hospitals` shards)."""
    config = load_config(None, [f"hospitals={hospitals}", f"rounds={rounds}", "train.batch_size=4"])
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    names = [f"hospital-{i}" for i in range(hospitals)]
    with open(path / "privacy_ledger.jsonl", "w") as ledger, open(path / "metrics.jsonl", "w") as metrics:
        for n in range(1, rounds + 1):
            for i, name in enumerate(names):
                ledger.write(json.dumps({"round": n, "hospital": name, "status": "trained", "noise_multiplier": 1.5,
                                         "sampling_rate": 0.1, "steps": 10, "sampling": "poisson",
                                         "epsilon": 0.5 * n + 0.01 * i, "delta": 1e-5, "max_epsilon": 8.0,
                                         "accountant": "pld", "num_examples": 30}) + "\n")
            evaluation = {name: {"accuracy": 0.5 + 0.005 * i, "loss": 1.0} for i, name in enumerate(names)}
            metrics.write(json.dumps({"round": n, "accuracy": 0.6, "loss": 1.1, "federated_accuracy": 0.55,
                                      "federated_loss": 1.2, "hospitals_evaluation": evaluation,
                                      "hospitals_trained": hospitals, "seconds": 1.0}) + "\n")
    return config


def test_report_at_50_hospitals_states_every_epsilon_and_embeds_its_plots(tmp_path):
    config = _fake_run(tmp_path, hospitals=50, rounds=3)
    dataset, _, _ = central_test_set(config)
    report = write_report(SimpleNamespace(path=tmp_path), hospital_label_counts(config, dataset))
    text = report.read_text()
    for i in range(50):  # the privacy statement names every hospital with its epsilon
        assert f"| hospital-{i} | {1.5 + 0.01 * i:.3f} | 1e-05 | 8 |" in text
    assert "epsilon 1.990 at delta 1e-05** (hospital-49)" in text
    assert "min 0.500, median" in text and "max 0.745" in text  # 50 per-hospital scores summarised
    for image in ("epsilon.png", "report_hospital_accuracy.png", "report_labels.png"):
        assert f"]({image})" in text and (tmp_path / image).stat().st_size > 1000


def test_report_of_a_deployment_draws_no_label_distribution(tmp_path):
    _fake_run(tmp_path, hospitals=3, rounds=2)
    text = write_report(SimpleNamespace(path=tmp_path)).read_text()
    assert "report_labels.png" not in text and not (tmp_path / "report_labels.png").exists()
    assert "| hospital-2 | ? | 0.510 | 1.000 |" in text  # per-hospital table when few hospitals
    assert "n/a" not in text  # no AUC column to explain


def test_report_of_a_majority_class_model_shows_balanced_accuracy_and_says_why(tmp_path):
    _fake_run(tmp_path, hospitals=2, rounds=20)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    metrics[-1] |= {"accuracy": 0.718, "balanced_accuracy": 0.5, "auc": 0.61, "single_class": 1, "classes": 2,
                    "federated_balanced_accuracy": 0.5,
                    "hospitals_evaluation": {  # hospital-1's held-out split holds one class: no AUC
                        "hospital-0": {"num-examples": 12, "accuracy": 0.75, "balanced_accuracy": 0.5, "auc": 0.4,
                                       "loss": 0.6},
                        "hospital-1": {"num-examples": 3, "accuracy": 1.0, "balanced_accuracy": 1.0, "loss": 0.2}}}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    text = write_report(SimpleNamespace(path=tmp_path)).read_text()
    assert "| accuracy | balanced_accuracy | auc | loss |" in text and "| 0.718 | 0.500 | 0.610 |" in text
    assert "answers the same class for every test image: the data is too small for this budget" in text
    assert "| hospital-0 | 12 | 0.750 | 0.500 | 0.400 | 0.600 |" in text
    assert "| hospital-1 | 3 | 1.000 | 1.000 | n/a | 0.200 |" in text and "(n/a: AUC needs both classes)" in text
    assert "zero-out adjacency (n public)" in text  # the README's and the audit's words


def test_the_coordinators_label_counts_match_the_hospitals_shards_without_their_images():
    """The report's label plot comes from labels alone: the coordinator drops the training images."""
    config = load_config(None, ["hospitals=7", "data.partition=dirichlet", "data.alpha=0.5", "train.batch_size=4"])
    dataset, test_x, test_y = central_test_set(config)
    assert len(dataset.train_x) == 0 and dataset.input_shape == (8, 8, 1)
    federation = load_federation(config)
    assert len(test_y) == len(federation.test_y) and (test_x == federation.test_x).all()
    counts, names = hospital_label_counts(config, dataset)
    assert names == [str(k) for k in range(10)]
    for shard in federation.shards:
        assert counts[shard.name] == [int((shard.train_y == k).sum()) for k in range(10)]
