"""The "table" source: a CSV or TSV labels table, one row per image, as hospitals export them.

`data.source: table`, `data.path: labels.csv` (or .tsv). The first line names the columns;
names are matched case-insensitively, spaces around them ignored:
- image (required): `path`, `image` or `file`: the image file, relative to the table's folder
  (an absolute path is taken as it is). PNG, JPEG or DICOM; DICOM is recognised by a
  .dcm/.dicom name or, for PACS exports without an extension, by its 'DICM' marker.
- label (required): `label` or `class`: class names (any text) or integers. Classes are the
  sorted distinct labels of the training rows: numerically when every label is an integer
  ("2" before "10"), else as text.
- patient (optional): `patient` or `patient_id`: who the image belongs to. A blank cell, or
  no such column, takes a DICOM file's PatientID; an image with neither is its own patient.
- split (optional): `split`: `train` (also a blank cell), `test`, or `val` (merged into train).
  Without test rows the data set has no test split.
Other columns (age, view, ...) are ignored, and a note names them. Commas, semicolons or tabs
separate the cells (the one the header uses most; always tabs for .tsv); UTF-8, with or
without a byte-order mark.

Patient ids never reach memory beyond this module: each is replaced by a keyed pseudonym
(common/pseudonym.py; the secret in `.<table name>.salt` beside the table), stable across runs
and processes on this node, and only pseudonyms are kept in `Dataset.train_patients`, so that
one patient's images stay together through every split and partition.

Paths may leave the table's folder (`../scans/1.dcm`, absolute paths): the table is the
hospital's own file on its own node, not something a coordinator sends, so no boundary is
crossed. Sizes, colour and unreadable images follow the folder source's rules
(common/image_folder.py); everything else wrong with the table is refused with one line
naming the line number: no header, missing columns, an empty label, a missing file, a file
listed twice, an unknown split, a test label with no training rows, fewer than two classes.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from common.dataset import MAX_CLASSES, Dataset, short_list
from common.errors import UserError
from common.image_folder import decode_files, pseudonymised_patients

COLUMNS = {  # role -> accepted header names (lower case)
    "path": ("path", "image", "file"),
    "label": ("label", "class"),
    "patient": ("patient", "patient_id"),
    "split": ("split",),
}
_SPLITS = {"": "train", "train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}


def load_table(table, image_size, on_bad_image, color="gray") -> Dataset:
    """Load the labels table at `table` (an existing file) and its images; see the module docstring."""
    table = Path(table)
    rows, ignored = _read_rows(table)
    train_labels = [r["label"] for r in rows if r["split"] != "test"]
    if not train_labels:
        raise UserError(f"labels table {table} has only test rows; mark training rows with split train (or leave split blank)")
    numeric = _as_ints(set(train_labels)) is not None
    class_names = _class_names(train_labels)
    if len(class_names) < 2:
        raise UserError(f"labels table {table} has one class ({class_names[0]}) among its training rows; "
                        "a classifier needs at least two")
    if len(class_names) > MAX_CLASSES:
        raise UserError(f"labels table {table} has {len(class_names)} distinct labels, more than {MAX_CLASSES}; "
                        "is the label column really the class (not an id)?")
    label_of = {name: i for i, name in enumerate(class_names)}
    for r in rows:
        if _canonical(r["label"], numeric) not in label_of:
            raise UserError(f"labels table {table} line {r['line']}: test label {r['label']!r} has no training rows "
                            f"(training classes: {short_list(class_names, 8)})")

    images = decode_files([r["file"] for r in rows], image_size, on_bad_image, color, table)
    notes = [f"{table}: {len(rows)} rows, {len(class_names)} classes ({short_list(class_names, 8)}), images "
             + ("read as RGB colour" if color == "rgb" else "converted to grayscale (data.color: rgb keeps colour)")]
    if ignored:
        notes.append(f"{table}: ignored column(s) {short_list(ignored, 8)}")
    notes += images.notes

    # The table's patient column is the hospital's own mapping and wins over the files' PatientID.
    raw = [r["patient"] or pid for r, pid in zip(rows, images.patient_ids)]
    patients = pseudonymised_patients(raw, table, notes)
    labels = np.array([label_of[_canonical(r["label"], numeric)] for r in rows], dtype=np.int64)
    is_test = np.array([r["split"] == "test" for r in rows], dtype=bool) & images.keep
    is_train = np.array([r["split"] != "test" for r in rows], dtype=bool) & images.keep
    if not is_train.any():
        raise UserError(f"no readable training images in {table}; replace the corrupt files listed "
                        "with data.on_bad_image: refuse")
    if any(r["split"] == "val" for r in rows):
        notes.append(f"merged {int((np.array([r['split'] == 'val' for r in rows]) & images.keep).sum())} "
                     f"val rows of {table} into train")
    empty = [n for i, n in enumerate(class_names) if not (labels[is_train] == i).any()]
    if empty:
        notes.append(f"class(es) {short_list(empty)} in {table} have no readable training images left")
    has_test = bool(is_test.any())
    return Dataset(images.pixels[is_train], labels[is_train],
                   images.pixels[is_test] if has_test else None, labels[is_test] if has_test else None,
                   len(class_names), class_names, notes,
                   train_patients=None if patients is None else patients[is_train],
                   test_patients=None if patients is None or not has_test else patients[is_test])


def _read_rows(table):
    """([{line, file, label, patient, split}], [ignored column names]) from the table, checked row by row."""
    try:
        text = table.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"labels table {table} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        "save it as UTF-8 CSV") from None
    except OSError as err:
        raise UserError(f"cannot read labels table {table} ({err.strerror}); check data.path") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise UserError(f"labels table {table} is empty or its first line is blank; the first line names the "
                        f"columns: {_expected()}")
    reader = csv.reader(lines, delimiter=_delimiter(table, lines[0]))
    header = [h.strip().lower() for h in next(reader)]
    where = _columns(table, header)
    ignored = [h for i, h in enumerate(header) if i not in where.values() and h]

    rows, seen = [], {}
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue  # blank lines (a trailing newline, a spreadsheet's empty rows) are not rows
        cell = {role: (cells[i].strip() if i < len(cells) else "") for role, i in where.items()}
        if not cell["path"]:
            raise UserError(f"labels table {table} line {line}: the {header[where['path']]} cell is empty")
        if not cell["label"]:
            raise UserError(f"labels table {table} line {line} ({cell['path']}): the {header[where['label']]} "
                            "cell is empty; give every image a label or remove the row")
        split = cell.get("split", "").lower()
        if split not in _SPLITS:
            raise UserError(f"labels table {table} line {line}: split is {cell['split']!r}; use train, test or val")
        file = Path(cell["path"]).expanduser()
        file = file if file.is_absolute() else table.parent / file
        if not file.is_file():
            raise UserError(f"labels table {table} line {line}: image {cell['path']} not found (looked for {file})")
        key = file.resolve()
        if key in seen:
            raise UserError(f"labels table {table} line {line}: image {cell['path']} is already listed on line "
                            f"{seen[key]}; list each image once")
        seen[key] = line
        rows.append({"line": line, "file": file, "label": cell["label"], "patient": cell.get("patient") or None,
                     "split": _SPLITS[split]})
    if not rows:
        raise UserError(f"labels table {table} has a header but no rows; add one row per image")
    return rows, ignored


def _delimiter(table, header_line):
    if table.suffix.lower() == ".tsv":
        return "\t"
    # A spreadsheet saved as CSV in many locales separates by semicolons: take the header's most used.
    return max((",", ";", "\t"), key=header_line.count)


def _columns(table, header):
    """{role: column index} for the roles the header names; refuses a missing or doubled role."""
    where = {}
    for role, names in COLUMNS.items():
        found = [i for i, h in enumerate(header) if h in names]
        if len(found) > 1:
            raise UserError(f"labels table {table} has several {role} columns ({', '.join(header[i] for i in found)}); "
                            "keep one")
        if found:
            where[role] = found[0]
    missing = [role for role in ("path", "label") if role not in where]
    if missing:
        raise UserError(f"labels table {table} has no {' or '.join(missing)} column: its first line names "
                        f"{short_list([h for h in header if h] or ['nothing'], 8)}; expected {_expected()}")
    return where


def _expected():
    return ("path (or image, file), label (or class), optionally patient (or patient_id) and split")


def _class_names(labels):
    distinct = set(labels)
    ints = _as_ints(distinct)
    if ints is not None:
        return [str(i) for i in sorted(set(ints.values()))]
    return sorted(distinct)


def _as_ints(values):
    """{text: int} when every value is an integer, else None."""
    try:
        return {v: int(v) for v in values}
    except ValueError:
        return None


def _canonical(label, numeric):
    """The class name a label cell stands for: integer labels by value ("07" is class "7")."""
    try:
        return str(int(label)) if numeric else label
    except ValueError:
        return label
