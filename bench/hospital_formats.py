"""The blood-cell images as hospitals hold them: JPEG class folders, a PNG table, DICOM files with patients.

    uv run python -m bench.hospital_formats --out /tmp/formats --per-class 200

writes, from the first `--per-class` images of each class of ../shared/data/blood_cells,
- OUT/jpeg/<class>/*.jpg: the published JPEGs themselves (symbolic links);
- OUT/png/labels.csv + OUT/png/images/*.png: the same images decoded to grey, as PNG, one
  row per image in the folder's order (path, label);
- OUT/dicom/labels.csv + OUT/dicom/scans/*.dcm: the same grey pixels as uncompressed DICOM
  files, each with a PatientID: synthetic patients of 2 to 4 images of one class (a
  patient's smear), the table without a patient column, so patients come from the files.
The three hold identical pixels at every size (PNG and this DICOM are lossless, 8-bit with no
window), so a run on each differs only in what it knows about patients. Prints the commands
that run the 5-hospital simulation on each. No copies land in the project: OUT is yours.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from tests.dicom_files import write_dicom  # one writer of DICOM files, shared with the tests

BLOOD_CELLS = Path(__file__).resolve().parents[2] / "shared" / "data" / "blood_cells"
IMAGES_PER_PATIENT = (2, 4)  # inclusive range


def build(out: Path, per_class: int, seed: int = 0) -> dict:
    """Write the three forms under `out`; {images, patients, patient_ids (one per table row, in order)}."""
    if not BLOOD_CELLS.is_dir():
        raise SystemExit(f"error: {BLOOD_CELLS} is absent; this benchmark needs ../shared/data/blood_cells")
    rng = np.random.default_rng(seed)
    png_rows, dicom_rows, patient_ids, patients = [], [], [], 0
    for label in sorted(p.name for p in BLOOD_CELLS.iterdir() if p.is_dir()):
        files = sorted((BLOOD_CELLS / label).glob("*.jpg"))[:per_class]
        left = 0
        for index, file in enumerate(files):
            if left == 0:  # a new synthetic patient of this class
                patients += 1
                left = int(rng.integers(IMAGES_PER_PATIENT[0], IMAGES_PER_PATIENT[1] + 1))
            left -= 1
            link = out / "jpeg" / label / file.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(file)
            with Image.open(file) as image:
                grey = image.convert("L")
            name = f"{label}-{index:04d}"
            png = out / "png" / "images" / f"{name}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            grey.save(png)
            dcm = out / "dicom" / "scans" / f"{name}.dcm"
            dcm.parent.mkdir(parents=True, exist_ok=True)
            patient_ids.append(f"SYN{patients:05d}")
            write_dicom(dcm, np.asarray(grey), patient_ids[-1])
            png_rows.append([f"images/{png.name}", label])
            dicom_rows.append([f"scans/{dcm.name}", label])
    for kind, rows in (("png", png_rows), ("dicom", dicom_rows)):
        with open(out / kind / "labels.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            writer.writerows(rows)
    return {"images": len(png_rows), "patients": patients, "patient_ids": patient_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the three forms into")
    parser.add_argument("--per-class", type=int, default=200, help="images per class (8 classes)")
    args = parser.parse_args()
    counts = build(args.out.absolute(), args.per_class)
    print(f"{counts['images']} images of {counts['patients']} synthetic patients (2-4 images each) in "
          f"{args.out}/jpeg, {args.out}/png/labels.csv and {args.out}/dicom/labels.csv")
    common = ("--set hospitals=5 --set data.partition=dirichlet --set data.alpha=0.5 "
              "--set privacy.max_epsilon=3 --set privacy.odometer_dir=ODOMETER")
    for kind, source, path in (("jpeg", "folder", "jpeg"), ("png", "table", "png/labels.csv"),
                               ("dicom", "table", "dicom/labels.csv")):
        print(f"uv run simulate.py --set data.source={source} --set data.path={args.out / path} {common} "
              f"--out runs/formats-{kind}")


if __name__ == "__main__":
    main()
