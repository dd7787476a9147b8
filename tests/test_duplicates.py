"""Exact duplicates in real data: every split keeps identical images together (common/duplicates.py)."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from common.duplicates import group_ids, image_hashes
from common.federation import build_federation

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (the real medical image sets) is absent")


def _breast_with_duplicates(path: Path) -> Path:
    """BreastMNIST with 5 training images repeated (same class) and 3 test images copied into train."""
    a = dict(np.load(SHARED / "breastmnist.npz"))
    rng = np.random.default_rng(0)
    pick = rng.choice(len(a["train_images"]), 5, replace=False)
    tpick = rng.choice(len(a["test_images"]), 3, replace=False)
    a["train_images"] = np.concatenate([a["train_images"], a["train_images"][pick], a["test_images"][tpick]])
    a["train_labels"] = np.concatenate([a["train_labels"], a["train_labels"][pick], a["test_labels"][tpick]])
    np.savez(path, **a)
    return path


def _blood_folder_with_duplicates(root: Path) -> Path:
    """60 real blood-cell JPEGs in 3 classes, 6 of them copied again under other names."""
    for name in ("basophil", "eosinophil", "lymphocyte"):
        files = sorted((SHARED / "blood_cells" / name).glob("*.jpg"))[:20]
        (root / name).mkdir(parents=True)
        for index, file in enumerate(files):
            shutil.copy(file, root / name / file.name)
            if index < 2:
                shutil.copy(file, root / name / f"copy-{file.name}")
    return root


def _check_federation(federation, expected_sets):
    train_sets = [set(image_hashes(np.concatenate([s.train_x, s.eval_x]))) for s in federation.shards]
    for i, own in enumerate(train_sets):
        for other in train_sets[i + 1:]:
            assert own.isdisjoint(other), "an image is in two hospitals"
    for shard in federation.shards:
        assert set(image_hashes(shard.train_x)).isdisjoint(image_hashes(shard.eval_x)), "train/eval share an image"
    every_train = set().union(*train_sets)
    assert every_train.isdisjoint(image_hashes(federation.test_x)), "a test image equals a training image"
    assert sum(s.identical_sets for s in federation.shards) == expected_sets


def test_group_ids_join_shared_keys_and_keep_order():
    assert group_ids([["a"], ["b"], ["c"]]).tolist() == [0, 1, 2]
    assert group_ids([["a", "p1"], ["b", "p2"], ["a", "p3"], ["c", "p2"]]).tolist() == [0, 1, 0, 1]


@needs_shared
@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_npz_duplicates_stay_in_one_hospital_and_out_of_the_test_set(tmp_path, scheme):
    path = _breast_with_duplicates(tmp_path / "breast.npz")
    config = load_config(None, ["data.source=npz", f"data.path={path}", f"data.partition={scheme}",
                                "data.alpha=0.5", "hospitals=5", f"privacy.odometer_dir={tmp_path / 'odo'}"])
    federation = build_federation(config)
    _check_federation(federation, expected_sets=5)
    notes = " ".join(federation.dataset.notes)
    assert "found 5 set(s) of identical training images" in notes
    assert "left 4 test image(s) out" in notes  # the 3 copied + 1 that BreastMNIST itself repeats


@needs_shared
def test_folder_duplicates_stay_on_one_side_of_the_central_split(tmp_path):
    root = _blood_folder_with_duplicates(tmp_path / "blood")
    for seed in range(4):  # several splits: a duplicate straddling the test boundary would show in some
        config = load_config(None, ["data.source=folder", f"data.path={root}", "hospitals=3", f"seed={seed}",
                                    "data.partition=iid", "train.batch_size=4",
                                    f"privacy.odometer_dir={tmp_path / 'odo'}"])
        federation = build_federation(config)
        # A set that went whole to the central test split is in no hospital.
        test_hashes = image_hashes(federation.test_x)
        in_test = len(test_hashes) - len(set(test_hashes))
        _check_federation(federation, expected_sets=6 - in_test)
        assert sum(map(len, (s.train_y for s in federation.shards))) + sum(
            len(s.eval_y) for s in federation.shards) + len(federation.test_y) == 66


@needs_shared
def test_drop_keeps_one_image_of_each_set(tmp_path):
    root = _blood_folder_with_duplicates(tmp_path / "blood")
    config = load_config(None, ["data.source=folder", f"data.path={root}", "hospitals=3", "data.duplicates=drop",
                                "train.batch_size=4", f"privacy.odometer_dir={tmp_path / 'odo'}"])
    federation = build_federation(config)
    every = np.concatenate([federation.test_x] + [np.concatenate([s.train_x, s.eval_x]) for s in federation.shards])
    assert len(every) == 60 and len(set(image_hashes(every))) == 60
    assert any("dropped 6 duplicate image(s)" in note for note in federation.dataset.notes)


def test_a_deployed_hospitals_split_keeps_a_group_on_one_side(tmp_path):
    from client.split import hospital_split

    hashes = [f"{i:032x}" for i in range(200)]
    groups = np.arange(200) // 4  # 50 groups of 4 (one patient's images, or identical images)
    train, held = hospital_split(hashes, tmp_path / "odo.split.json", 0.3, "seed", {"image_size": 0}, groups=groups)
    assert len(held) and len(train)
    assert set(groups[train]).isdisjoint(groups[held])
    # A later image of a known group joins its side, whatever its own hash says.
    more = hashes + [f"{1000 + i:032x}" for i in range(50)]
    more_groups = np.concatenate([groups, np.arange(50)])
    train2, held2 = hospital_split(more, tmp_path / "odo.split.json", 0.3, "seed", {"image_size": 0},
                                   groups=more_groups)
    assert set(more_groups[train2]).isdisjoint(more_groups[held2])
    assert set(held) <= set(held2)  # nothing placed before moves


@pytest.mark.slow
@needs_shared
def test_five_hospitals_on_data_with_duplicates_train_every_round_then_a_spent_odometer_fails(tmp_path):
    """The user's run: duplicates in the data, 5 hospitals, Dirichlet 0.5, budget 3, fresh odometer."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    path = _breast_with_duplicates(tmp_path / "breast.npz")
    common = [sys.executable, "simulate.py", "--set", "data.source=npz", "--set", f"data.path={path}",
              "--set", "data.partition=dirichlet", "--set", "data.alpha=0.5", "--set", "rounds=3",
              "--set", "model.filters=[8,16]", "--set", "model.dense_units=16",
              "--set", f"privacy.odometer_dir={tmp_path / 'odometer'}"]
    first = subprocess.run([*common, "--out", str(tmp_path / "first")], cwd=root, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "rejected" not in first.stdout
    ledger = [json.loads(line) for line in (tmp_path / "first" / "privacy_ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 15 and all(r["status"] == "trained" for r in ledger)  # 5 hospitals x 3 rounds
    assert not (tmp_path / "first" / "rejected.jsonl").exists() or not (tmp_path / "first" / "rejected.jsonl").read_text()
    audit = subprocess.run([sys.executable, "-m", "server.audit", str(tmp_path / "first"), "--odometer",
                            str(tmp_path / "odometer" / "simulation.jsonl")], cwd=root, capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]

    second = subprocess.run([*common, "--out", str(tmp_path / "second")], cwd=root, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 1, second.stdout[-3000:]
    errors = [line for line in second.stdout.splitlines() if line.startswith("error: no hospital trained")]
    assert len(errors) == 1
    assert "hospital-0 spent" in errors[0] and str(tmp_path / "odometer") in errors[0]
    assert "privacy.odometer_dir" in errors[0]
