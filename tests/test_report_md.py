"""report.md: privacy statement per hospital, final scores, embedded plots, readable at 50 hospitals."""
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
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


# --------------------------------------------------------------------------- a real run

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--set", "hospitals=2", "--set", "train.batch_size=32", "--set", "model.filters=[8,16]",
         "--set", "model.dense_units=16", "--set", "rounds=2"]
PLAIN_LOAD = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np, tf_keras
model = tf_keras.models.load_model(sys.argv[1])
assert "common.model" not in sys.modules, "loading needed the project's code"
np.save(sys.argv[3], model(np.load(sys.argv[2]), training=False).numpy())
"""


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real two-hospital, two-round digits simulation (its own odometer) and its run directory."""
    odometer = tmp_path_factory.mktemp("odometer")
    run = tmp_path_factory.mktemp("runs") / "real"
    result = subprocess.run([sys.executable, "simulate.py", *SMALL, "--set", f"privacy.odometer_dir={odometer}",
                             "--out", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


def _table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_report_of_a_real_run_carries_provenance_the_plan_per_class_scores_unit_and_audit(real_run):
    text = (real_run / "report.md").read_text()
    provenance = dict(row[:2] for row in _table(text, "| | |"))
    for name in ("hospital-fl", "flwr", "tensorflow", "tf-keras", "dp-accounting", "tensorflow-privacy"):
        assert provenance[name] == importlib.metadata.version(name), name
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.fullmatch(stamp, provenance["started (UTC)"]) and re.fullmatch(stamp, provenance["ended (UTC)"])
    assert provenance["started (UTC)"] <= provenance["ended (UTC)"]
    assert provenance["state"].startswith("finished, 2 round(s) completed")
    status = json.loads((real_run / "status.json").read_text())
    if "provenance" in status:  # once the ServerApp records it (server/provenance.py): the FAB Flower ran
        assert provenance["app bundle (FAB) sha256"] == f"`{status['provenance']['flower_run']['fab_hash']}`"
        assert re.fullmatch(r"`[0-9a-f]{64}`", provenance["app bundle (FAB) sha256"])

    # Per-class recall from model.keras, reloaded: its mean is the balanced accuracy the run measured.
    metrics = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    per_class = _table(text, "| class | test examples |")
    assert [row[0] for row in per_class] == [str(k) for k in range(10)]
    recalls = [float(row[3]) for row in per_class]
    assert abs(sum(recalls) / 10 - metrics[-1]["balanced_accuracy"]) < 2e-3
    matrix = _table(text, "| true \\ predicted |")
    counts = [[int(cell.strip("*")) for cell in row[1:]] for row in matrix]
    assert [sum(row) for row in counts] == [int(row[1]) for row in per_class]  # rows: true class
    assert [sum(col) for col in zip(*counts)] == [int(row[2]) for row in per_class]  # columns: predicted
    correct = sum(counts[k][k] for k in range(10)) / sum(map(sum, counts))
    assert abs(correct - metrics[-1]["accuracy"]) < 1e-9

    assert "Unit of privacy: image (each epsilon protects one image; a patient with k images is protected at " \
           "group size k)." in text
    plan = json.loads((real_run / "plan.json").read_text())
    if plan:  # the plan as a table, not JSON
        rows = {row[0]: row for row in _table(text, "| hospital | examples | expected batch |")}
        assert sorted(rows) == sorted(plan) and "```json" not in text
        for name, p in plan.items():
            assert rows[name][1] == str(p["num-examples"]) and rows[name][8] == f"{p['max-epsilon']:g}"
    else:
        assert "plan.json is empty" in text
    assert "## Audit" in text and "hospital-fl audit " in text
    assert "Audit at the end of the run: **passed**" in text or "The audit could not run here" in text
    for image in ("accuracy.png", "epsilon.png", "report_hospital_accuracy.png", "report_labels.png"):
        assert f"]({image})" in text and (real_run / image).stat().st_size > 5000


@pytest.mark.slow
def test_report_states_each_hospitals_unit_of_privacy(real_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(real_run, copy)
    records = [json.loads(line) for line in (copy / "privacy_ledger.jsonl").read_text().splitlines()]
    for record in records:
        record["unit"] = "patient" if record["hospital"] == "hospital-1" else "image"
    (copy / "privacy_ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(SimpleNamespace(path=copy)).read_text()
    assert "Unit of privacy at hospital-0: image (each epsilon protects one image; a patient with k images is " \
           "protected at group size k)." in text
    assert "Unit of privacy at hospital-1: patient (each epsilon protects all of one patient's images " \
           "together)." in text
    assert "| hospital-1 |" in text and "| patient |" in text
    for record in records:
        record["unit"] = "patient"
    (copy / "privacy_ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(SimpleNamespace(path=copy)).read_text()
    assert "Unit of privacy: patient (each epsilon protects all of one patient's images together)." in text
    assert "for one patient (all of that patient's training images) of that hospital" in text


@pytest.mark.slow
def test_the_final_model_saved_with_standard_layers_loads_with_plain_tf_keras(real_run, tmp_path):
    """common.model.save_model: plain tf_keras.models.load_model reads it in a process that never imports
    the project, and it computes what the run's model computes."""
    import numpy as np

    from common.config import load_config
    from common.model import load_model, make_model, save_model

    model = make_model(load_config(real_run / "config.yaml").model, (8, 8, 1), 10)  # the run's network, our GroupNorm
    assert any(type(layer).__name__ == "GroupNorm" for layer in model.layers)
    model.set_weights(load_model(real_run / "model.keras").get_weights())  # the run's weights (GroupNorm has none)
    save_model(model, tmp_path / "plain.keras")
    x = np.random.default_rng(0).random((16, 8, 8, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "plain.keras"), str(tmp_path / "x.npy"),
                             str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.abs(np.load(tmp_path / "y.npy") - model(x, training=False).numpy()).max() < 1e-5
    assert isinstance(load_model(tmp_path / "plain.keras"), type(model))  # the project's loader reads it too


@pytest.mark.slow
def test_the_run_directorys_model_keras_loads_with_plain_tf_keras(real_run, tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8, 1), np.float32))
    result = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(real_run / "model.keras"), str(tmp_path / "x.npy"),
                             str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]


def test_provenance_reads_versions_and_flowers_run_with_its_app_bundle_hash(monkeypatch):
    from flwr.supercore.run import Run

    from server import provenance as provenance_module

    monkeypatch.setattr(provenance_module, "_FLOWER_RUN", {})  # this process's memory, restored afterwards

    run = Run.create_empty(run_id=42)
    run.fab_id, run.fab_version, run.fab_hash = "hospital-fl/hospital-fl", "0.1.0", "ab" * 32
    run.running_at = "2026-12-02 16:00:00.000000+00:00"
    grid = SimpleNamespace(run=run)  # what flwr.serverapp.Grid.run gives the ServerApp
    facts = provenance_module.provenance(grid)
    assert facts["flower_run"] == {"run_id": 42, "fab_id": "hospital-fl/hospital-fl", "fab_version": "0.1.0",
                                   "fab_hash": "ab" * 32, "running_at": "2026-12-02 16:00:00.000000+00:00"}
    assert facts["versions"]["flwr"] == importlib.metadata.version("flwr")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", facts["written_at"])
    provenance_module.note_flower_run(grid)  # remembered for status.json's later writes
    assert provenance_module.provenance()["flower_run"]["fab_hash"] == "ab" * 32
    assert provenance_module.flower_run_facts(SimpleNamespace()) == {}  # no run bound: nothing, not an error


def test_report_prints_the_provenance_status_json_recorded(tmp_path):
    _fake_run(tmp_path, hospitals=2, rounds=2)
    recorded = {"versions": {"hospital-fl": "0.1.0", "flwr": "1.42.0", "tensorflow": "2.21.0", "tf-keras": "2.21.0",
                             "dp-accounting": "0.6.0", "tensorflow-privacy": None},
                "python": "3.11.7", "flower_run": {"run_id": 7, "fab_id": "hospital-fl/hospital-fl",
                                                   "fab_version": "0.1.0", "fab_hash": "cd" * 32},
                "started_at": "2026-12-02T16:00:00Z", "written_at": "2026-12-02T16:05:00Z"}
    (tmp_path / "status.json").write_text(json.dumps({"state": "finished", "rounds_completed": 2,
                                                      "provenance": recorded}))
    text = write_report(SimpleNamespace(path=tmp_path)).read_text()
    rows = dict(row[:2] for row in _table(text, "| | |"))
    assert rows["tensorflow-privacy"] == "not installed" and rows["dp-accounting"] == "0.6.0"
    assert rows["app bundle (FAB) sha256"] == f"`{'cd' * 32}`"
    assert rows["started (UTC)"] == "2026-12-02T16:00:00Z" and rows["ended (UTC)"] == "2026-12-02T16:05:00Z"
    assert "from status.json" in text
