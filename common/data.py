"""Loading a hospital's images into arrays, and refusing bad data before any training starts.

Four sources (`data.source`):
- "digits": scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no
  test split). Needs no files; handy for smoke tests.
- "npz": a MedMNIST-style archive with `train_images`, `train_labels`, optional
  `val_images`/`val_labels` (merged into train, with a note) and optional
  `test_images`/`test_labels`. Images are (N, H, W) grayscale or (N, H, W, 1|3), uint8
  0..255 (uint16 0..65535) or float in [0, 1]; labels are class indices, (N,) or (N, 1).
  Colour stays colour (3 channels). Classes are 0..max label, named "0", "1", ...
- "folder": a folder of class subfolders of PNG/JPEG/DICOM files (common/image_folder.py).
- "table": a CSV/TSV labels table, one row per image file, with optional patient ids (common/table.py).

`image_size` 0 keeps the native size (for a folder: see common/image_folder.py); N > 0
resizes every image to N x N. Pixels come out uint8 (held once per process at a quarter of
float32's memory; common.model.model_input scales each batch to [0, 1]), 16-bit images
scaled to 8 bits; labels int64.

Every problem a person can fix (missing path, corrupt image, wrong array shape, bad labels,
empty class folder, ...) raises `UserError` with one line naming the file and the fix.
Nothing is cached on disk: load once per process and partition the arrays (common/partition.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.dataset import Dataset, short_list
from common.digits import load_digits
from common.duplicates import POLICIES as DUPLICATE_POLICIES, grouped
from common.errors import UserError
from common.image_folder import load_folder
from common.npz import load_npz
from common.table import load_table

SOURCES = ("digits", "npz", "folder", "table")
BAD_IMAGE_POLICIES = ("refuse", "skip")


def load_dataset(source: str, path: str = "", *, image_size: int = 0,
                 on_bad_image: str = "refuse", color: str = "gray", duplicates: str = "group") -> Dataset:
    """Load `source` from `path`, duplicates handled by `duplicates` (common/duplicates.py); see the module docstring."""
    _check_options(source, image_size, on_bad_image)
    if duplicates not in DUPLICATE_POLICIES:
        raise UserError(f"data.duplicates is {duplicates!r}; use 'group' (keep identical images together) or 'drop'")
    return grouped(_load_source(source, path, image_size, on_bad_image, color), duplicates)


def _load_source(source, path, image_size, on_bad_image, color) -> Dataset:
    if source == "digits":
        return load_digits(image_size)
    root = _existing_path(path, want_dir=(source == "folder"), source=source)
    if source == "npz":
        return load_npz(root, image_size)
    if source == "table":
        return load_table(root, image_size, on_bad_image, color)
    return load_folder(root, image_size, on_bad_image, color)


def load_hospital_paths(source: str, paths: list[str], *, image_size: int = 0,
                        on_bad_image: str = "refuse", color: str = "gray", duplicates: str = "group") -> list[Dataset]:
    """Load one file or folder per hospital and check they describe the same task.

    All hospitals must agree on the input shape (set `image_size` to resize them to one
    size) and on the classes (same class folder names, or the same label range for npz),
    because they train one shared model.
    """
    if not paths:
        raise UserError("data.paths is empty: give one data file or folder per hospital")
    datasets = [load_dataset(source, p, image_size=image_size, on_bad_image=on_bad_image, color=color,
                             duplicates=duplicates) for p in paths]
    first, ref = paths[0], datasets[0]
    for p, ds in zip(paths[1:], datasets[1:]):
        if ds.input_shape != ref.input_shape:
            hint = ("set data.image_size to resize every hospital to one size"
                    if ds.input_shape[2] == ref.input_shape[2]
                    else "store every hospital's images with the same number of channels")
            raise UserError(f"hospital data {p} has images of shape {ds.input_shape} but {first} "
                            f"has {ref.input_shape}; {hint}")
        if ds.class_names != ref.class_names:
            raise UserError(f"hospital data {p} has classes {short_list(ds.class_names)} but "
                            f"{first} has {short_list(ref.class_names)}; every hospital needs "
                            "the same class folders (or the same label range 0..K-1)")
    return datasets


# --------------------------------------------------------------------------- checks

def _check_options(source, image_size, on_bad_image):
    if source not in SOURCES:
        raise UserError(f"data.source is {source!r}; use one of {', '.join(SOURCES)}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 0:
        raise UserError(f"data.image_size is {image_size!r}; use 0 (native size) or a positive "
                        "side length in pixels, e.g. 64")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise UserError(f"data.on_bad_image is {on_bad_image!r}; use 'refuse' (stop on an "
                        "unreadable image) or 'skip' (leave it out and count it)")


def _existing_path(path, *, want_dir, source="npz"):
    kind = "folder" if want_dir else ("labels table (.csv or .tsv)" if source == "table" else ".npz file")
    if not path:
        raise UserError(f"data.path is empty; set it to the {kind} holding the images")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data path {p} does not exist; check data.path (it should be a {kind})")
    if want_dir and not p.is_dir():
        raise UserError(f"data path {p} is a file but data.source 'folder' needs a folder of "
                        "class subfolders; point data.path at the folder or use data.source npz")
    if not want_dir and p.is_dir():
        raise UserError(f"data path {p} is a folder but data.source '{source}' needs a {kind}; "
                        "point data.path at the file or use data.source folder")
    return p
