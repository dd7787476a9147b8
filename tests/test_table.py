"""common/table.py end to end: DICOMs written from real blood-cell images, a labels table, every refusal."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from common.data import load_dataset
from common.errors import UserError
from dicom_files import blood_cell_images, pydicom_file, write_dicom
from expect import user_error

PER_PATIENT = (2, 3, 4)  # images per synthetic patient, in turn


def write_table(path, header, rows, delimiter=","):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def hospital(root):
    """DICOMs of real blood cells under ROOT/scans (2-4 per patient, three transfer syntaxes): [(file, class, pid, pixels)]."""
    syntaxes = (None, RLELossless, JPEG2000Lossless)  # uncompressed and two lossless compressions
    out, n, patient, left = [], 0, 0, PER_PATIENT[0]
    for name, crops in blood_cell_images().items():
        for crop in crops:
            if left == 0:
                patient += 1
                left = PER_PATIENT[patient % len(PER_PATIENT)]
            pid = f"MRN{1000 + patient}"  # a raw hospital id: must never reach the Dataset
            path = write_dicom(root / "scans" / f"{n:03d}.dcm", crop, pid, syntax=syntaxes[n % 3])
            out.append((path, name, pid, crop))
            n, left = n + 1, left - 1
    return out


def test_dicom_table_end_to_end_with_patients_from_the_files(tmp_path):
    images = hospital(tmp_path)
    table = write_table(tmp_path / "labels.csv", ["File", " Class "],  # case and spaces in names are fine
                        [[p.relative_to(tmp_path).as_posix(), name] for p, name, _, _ in images])
    ds = load_dataset("table", str(table))
    assert ds.class_names == ["basophil", "eosinophil", "lymphocyte"] and ds.num_classes == 3
    assert ds.input_shape == (32, 32, 1) and len(ds.train_x) == 18 and ds.test_x is None
    # Pixels: each image exactly the grey crop it was written from (lossless syntaxes, 8-bit, no window).
    for i, (_, name, _, crop) in enumerate(images):
        assert np.array_equal(ds.train_x[i, ..., 0], crop)
        assert ds.train_y[i] == ds.class_names.index(name)
    # Patients: pseudonyms, one per raw id, the same for all of a patient's images, never the raw id.
    raw = np.array([pid for _, _, pid, _ in images])
    pseudo = ds.train_patients
    assert pseudo is not None and len(pseudo) == 18
    assert len(set(pseudo)) == len(set(raw)) and len(set(raw)) >= 5
    for pid in set(raw):
        assert len(set(pseudo[raw == pid])) == 1
    assert not any(pid in p or pid in repr(ds) or any(pid in n for n in ds.notes) for pid in raw for p in pseudo)
    # One patient's images form one group, which every split keeps whole (common/duplicates.py).
    for p in set(pseudo):
        assert len(set(ds.train_groups[pseudo == p])) == 1
    salt = tmp_path / ".labels.csv.salt"
    assert salt.is_file() and (salt.stat().st_mode & 0o077) == 0  # the secret is this user's only


def test_pseudonyms_are_stable_across_loads_and_processes(tmp_path):
    images = hospital(tmp_path)
    table = write_table(tmp_path / "labels.csv", ["path", "label"],
                        [[p.relative_to(tmp_path).as_posix(), name] for p, name, _, _ in images])
    first = load_dataset("table", str(table)).train_patients
    assert np.array_equal(load_dataset("table", str(table)).train_patients, first)
    code = ("import sys; from common.data import load_dataset; "
            "print(' '.join(load_dataset('table', sys.argv[1]).train_patients))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code, str(table)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == list(first)
    # Another table (another secret) gives other pseudonyms for the same ids: nothing links the two.
    other = write_table(tmp_path / "other.csv", ["path", "label"],
                        [[p.relative_to(tmp_path).as_posix(), name] for p, name, _, _ in images])
    assert not set(load_dataset("table", str(other)).train_patients) & set(first)


def test_patient_column_wins_and_a_blank_cell_falls_back_to_the_files_id(tmp_path):
    images = hospital(tmp_path)
    rows = [[p.relative_to(tmp_path).as_posix(), name, ("" if i % 2 else f"case-{i // 6}")]
            for i, (p, name, _, _) in enumerate(images)]
    ds = load_dataset("table", str(write_table(tmp_path / "labels.csv", ["image", "label", "Patient_ID"], rows)))
    pseudo = ds.train_patients
    by_column = [i for i in range(18) if i % 2 == 0]
    assert len(set(pseudo[by_column])) == 3  # case-0, case-1, case-2
    assert pseudo[0] == pseudo[2] == pseudo[4] and pseudo[0] != pseudo[6]
    raw = [pid for _, _, pid, _ in images]
    for i in range(1, 18, 2):  # blank cells: the DICOM PatientID, pseudonymised the same way
        j = next(k for k in range(1, 18, 2) if raw[k] == raw[i])
        assert pseudo[i] == pseudo[j]


def test_png_jpeg_rows_integer_labels_tsv_and_split(tmp_path):
    crops = blood_cell_images(mode="RGB", per_class=4)
    rows = []
    for c, (name, images) in enumerate(crops.items()):
        for i, crop in enumerate(images):
            ext = (".png", ".jpg", ".dcm")[i % 3]
            path = tmp_path / "imgs" / f"{name}{i}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if ext == ".dcm":
                write_dicom(path, crop)  # RGB DICOM without PatientID
            else:
                Image.fromarray(crop).save(path, quality=95)
            label = ("10", "2", "1")[c]
            rows.append([f"imgs/{path.name}", label, "test" if i == 3 else "Train", "42"])
    table = write_table(tmp_path / "labels.tsv", ["PATH", "label", "split", "age"], rows, delimiter="\t")
    ds = load_dataset("table", str(table), color="rgb")
    assert ds.class_names == ["1", "2", "10"]  # integers sort numerically
    assert ds.input_shape == (32, 32, 3) and len(ds.train_x) == 9 and len(ds.test_x) == 3
    assert sorted(ds.test_y) == [0, 1, 2] and ds.train_patients is None  # no source named a patient
    assert any("ignored column(s) age" in n for n in ds.notes)
    png = [i for i, r in enumerate(r for r in rows if r[2] != "test") if r[0].endswith(".png")][0]
    name = rows[png][0].split("/")[1]
    assert np.array_equal(ds.train_x[png], np.asarray(Image.open(tmp_path / "imgs" / name).convert("RGB")))


def test_semicolon_csv_with_absolute_paths_and_sizes_resized(tmp_path):
    images = hospital(tmp_path)
    table = write_table(tmp_path / "export" / "labels.csv", ["file", "label"],
                        [[str(p), name] for p, name, _, _ in images], delimiter=";")
    ds = load_dataset("table", str(table), image_size=16)
    assert ds.input_shape == (16, 16, 1) and len(ds.train_x) == 18
    assert any("resized 18 of 18" in n for n in ds.notes)


def test_unreadable_rows_follow_the_bad_image_policy(tmp_path):
    images = hospital(tmp_path)
    plan = tmp_path / "scans" / "plan.dcm"
    plan.write_bytes(open(pydicom_file("rtplan.dcm"), "rb").read())
    rows = [[p.relative_to(tmp_path).as_posix(), name] for p, name, _, _ in images] + [["scans/plan.dcm", "basophil"]]
    table = write_table(tmp_path / "labels.csv", ["path", "label"], rows)
    msg = user_error(load_dataset, "table", str(table))
    assert "plan.dcm" in msg and "no pixel data" in msg
    ds = load_dataset("table", str(table), on_bad_image="skip")
    assert len(ds.train_x) == 18 and len(ds.train_patients) == 18
    assert any("skipped 1" in n and "plan.dcm" in n for n in ds.notes)


def test_every_refusal_is_one_line(tmp_path):
    images = hospital(tmp_path)
    good = [[p.relative_to(tmp_path).as_posix(), name] for p, name, _, _ in images]

    def table(name, header, rows, **kw):
        return str(write_table(tmp_path / name, header, rows, **kw))

    assert "does not exist" in user_error(load_dataset, "table", str(tmp_path / "missing.csv"))
    assert "is a folder" in user_error(load_dataset, "table", str(tmp_path))
    (tmp_path / "empty.csv").write_text("")
    assert "empty" in user_error(load_dataset, "table", str(tmp_path / "empty.csv"))
    msg = user_error(load_dataset, "table", table("cols.csv", ["filename", "diagnosis"], good))
    assert "filename, diagnosis" in msg and "path (or image, file)" in msg and "label (or class)" in msg
    msg = user_error(load_dataset, "table", table("nolabel.csv", ["path", "diagnosis"], good))
    assert "no label column" in msg and "diagnosis" in msg
    assert "several path columns" in user_error(load_dataset, "table", table("two.csv", ["path", "file", "label"],
                                                                             [[r[0], r[0], r[1]] for r in good]))
    assert "no rows" in user_error(load_dataset, "table", table("header.csv", ["path", "label"], []))
    msg = user_error(load_dataset, "table", table("gone.csv", ["path", "label"], good[:3] + [["scans/nope.dcm", "x"]]))
    assert "line 5" in msg and "scans/nope.dcm" in msg and "not found" in msg
    msg = user_error(load_dataset, "table", table("blank.csv", ["path", "label"], good[:2] + [[good[2][0], " "]]))
    assert "line 4" in msg and "empty" in msg and good[2][0] in msg
    msg = user_error(load_dataset, "table", table("one.csv", ["path", "label"], [[r[0], "cell"] for r in good]))
    assert "one class (cell)" in msg
    msg = user_error(load_dataset, "table", table("twice.csv", ["path", "label"], good + [good[0]]))
    assert "line 20" in msg and "already listed on line 2" in msg
    msg = user_error(load_dataset, "table", table("split.csv", ["path", "label", "split"],
                                                  [r + ["holdout"] for r in good]))
    assert "split is 'holdout'" in msg and "line 2" in msg
    msg = user_error(load_dataset, "table", table("testonly.csv", ["path", "label", "split"],
                                                  [r + ["train"] for r in good[:-1]] + [[good[-1][0], "monocyte", "test"]]))
    assert "'monocyte' has no training rows" in msg
    (tmp_path / "latin1.csv").write_bytes("path,label\nscans/000.dcm,Zelle \xe4\n".encode("latin-1"))
    assert "not UTF-8" in user_error(load_dataset, "table", str(tmp_path / "latin1.csv"))
