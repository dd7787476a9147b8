"""Patients end to end: a DICOM folder with a labels table, simulated and deployed, with the patient as the unit."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.hospital_formats import BLOOD_CELLS, build
from client.odometer import example_hashes
from common.config import load_config
from common.data import load_dataset
from common.federation import build_federation

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not BLOOD_CELLS.is_dir(), reason=f"{BLOOD_CELLS} is absent (shared data)")


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    out = tmp_path_factory.mktemp("formats")
    return out, build(out, per_class=15)  # 120 real blood-cell images, 2-4 per synthetic patient


def _settings(table, odometer):
    return ["hospitals=3", "rounds=2", "model.filters=[8,16]", "model.dense_units=16", "data.source=table",
            f"data.path={table}", "privacy.max_epsilon=3", f"privacy.odometer_dir={odometer}"]


@pytest.mark.slow
def test_a_dicom_table_simulation_trains_with_the_patient_as_unit_and_audits(formats, tmp_path):
    out, written = formats
    table, odometer, run = out / "dicom" / "labels.csv", tmp_path / "odometer", tmp_path / "run"
    settings = _settings(table, odometer)
    result = subprocess.run([sys.executable, "simulate.py", *[a for s in settings for a in ("--set", s)],
                             "--out", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Unit of privacy: the patient" in result.stdout and " patients " in result.stdout
    records = [json.loads(line) for line in (run / "privacy_ledger.jsonl").read_text().splitlines()]
    assert {r["hospital"] for r in records} == {"hospital-0", "hospital-1", "hospital-2"}
    assert all(r["unit"] == "patient" and r["status"] == "trained" for r in records)

    # n = the patients of each hospital's training images, counted from the PatientIDs written.
    dataset = load_dataset("table", str(table))
    pid_of = dict(zip(example_hashes(dataset.train_x, dataset.train_y), written["patient_ids"]))
    federation = build_federation(load_config(None, settings))
    for shard in federation.shards:
        patients = {pid_of[h] for h in example_hashes(shard.train_x, shard.train_y)}
        ledgered = {r["num_examples"] for r in records if r["hospital"] == shard.name}
        assert ledgered == {len(patients)} and len(patients) < len(shard.train_y)
        # A patient is wholly in one hospital's training images, or wholly elsewhere.
        for other in federation.shards:
            if other is not shard:
                assert not patients & {pid_of[h] for h in example_hashes(other.train_x, other.train_y)}
    audit = subprocess.run([sys.executable, "-m", "server.audit", str(run), "--odometer",
                            str(odometer / "simulation.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_a_deployed_hospital_on_a_dicom_table_counts_patients_and_keeps_them_on_one_side(formats, tmp_path):
    from client.task import deployment_site

    out, written = formats
    table = out / "dicom" / "labels.csv"
    config = load_config(None, [])
    node = {"hospital-id": "h1", "data-source": "table", "data-path": str(table), "max-epsilon": 3.0,
            "delta": 1e-5, "odometer-path": str(tmp_path / "odometer.jsonl"), "eval-fraction": 0.25}
    site = deployment_site(node, config)
    dataset = load_dataset("table", str(table))
    pid_of = dict(zip(example_hashes(dataset.train_x, dataset.train_y), written["patient_ids"]))
    train = [pid_of[h] for h in example_hashes(site.train_x, site.train_y)]
    held = {pid_of[h] for h in example_hashes(site.eval_x, site.eval_y)}
    assert site.unit == "patient" and site.num_units == len(set(train)) and not set(train) & held
    # Each unit is exactly one patient's training images.
    for unit in range(site.num_units):
        assert len({train[i] for i in np.flatnonzero(site.train_units == unit)}) == 1


def test_the_same_images_as_jpeg_folders_and_a_png_table_give_the_same_hospitals(formats):
    out, _ = formats
    shards = {}
    for kind, source, path in (("jpeg", "folder", out / "jpeg"), ("png", "table", out / "png" / "labels.csv")):
        config = load_config(None, ["hospitals=3", f"data.source={source}", f"data.path={path}"])
        shards[kind] = build_federation(config).shards
    for jpeg, png in zip(shards["jpeg"], shards["png"]):
        assert np.array_equal(jpeg.train_y, png.train_y) and np.array_equal(jpeg.eval_y, png.eval_y)
        # The folder decodes JPEGs at a reduced scale before resizing (Pillow's draft mode), the
        # PNGs hold the full decode: the same images within a few grey levels on average (2.5 measured).
        difference = np.abs(jpeg.train_x.astype(np.int16) - png.train_x.astype(np.int16))
        assert difference.mean() < 4.0, difference.mean()
        assert jpeg.train_units is None and png.train_units is None  # no patient named: the image is the unit
