"""The "npz" source: a MedMNIST-style archive (`train_images`, `train_labels`, optional val_* and test_*)."""
from __future__ import annotations

import zipfile
import zlib

import numpy as np

from common.dataset import MAX_CLASSES, Dataset, as_pixels, one_line, resize_batch, short_list
from common.errors import UserError


def load_npz(path, image_size):
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # NumPy's text for a file that is not an archive suggests unpickling it ("allow_pickle"):
        # code execution from a file, never advice to give a hospital.
        why = "not an .npz archive" if "pickle" in str(err) else one_line(err)
        raise UserError(f"cannot read {path} as an .npz archive ({why}); save it "
                        "with numpy.savez / savez_compressed") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array, not an .npz archive; save it with "
                        "numpy.savez(path, train_images=..., train_labels=...)")
    with archive:
        keys = set(archive.files)
        missing = [k for k in ("train_images", "train_labels") if k not in keys]
        if missing:
            raise UserError(f"{path} lacks {' and '.join(missing)} (has: {short_list(sorted(keys), 8)}); "
                            "save the training arrays under the keys train_images and train_labels")
        splits = {}
        for split in ("train", "val", "test"):
            ik, lk = f"{split}_images", f"{split}_labels"
            if (ik in keys) != (lk in keys):
                have, lack = (ik, lk) if ik in keys else (lk, ik)
                raise UserError(f"{path} has {have} but no {lack}; add {lack} or remove {have}")
            if ik in keys:
                splits[split] = (_read_array(archive, ik, path), _read_array(archive, lk, path))

    notes = []
    prepared = {}
    for split, (images, labels) in splits.items():
        x, note = _npz_images(images, f"{split}_images", path)
        if note:
            notes.append(note)
        y = _npz_labels(labels, f"{split}_labels", path)
        if len(x) != len(y):
            raise UserError(f"{path}: {split}_images has {len(x)} images but {split}_labels has "
                            f"{len(y)} labels; they must match one to one")
        prepared[split] = (as_pixels(x), y)

    train_x, train_y = prepared["train"]
    if len(train_x) == 0:
        raise UserError(f"{path}: train_images is empty; the data set needs training images")
    # One model input per run: every split must share the channel count, and the image
    # size too unless everything is resized below.
    for split, (x, _) in prepared.items():
        if x.shape[3] != train_x.shape[3]:
            raise UserError(f"{path}: {split}_images has {x.shape[3]} channel(s) but train_images "
                            f"has {train_x.shape[3]}; store all splits in the same colour format")
        if not image_size and x.shape[1:3] != train_x.shape[1:3]:
            raise UserError(f"{path}: {split}_images are {x.shape[1]}x{x.shape[2]} but "
                            f"train_images are {train_x.shape[1]}x{train_x.shape[2]}; set "
                            "data.image_size to resize them to one size")
    if "val" in prepared:
        val_x, val_y = prepared["val"]
        train_x = np.concatenate([train_x, val_x])
        train_y = np.concatenate([train_y, val_y])
        notes.append(f"merged {len(val_x)} examples from val_images/val_labels in {path} into train")
    test_x, test_y = prepared.get("test", (None, None))
    if test_x is not None and len(test_x) == 0:
        test_x = test_y = None
        notes.append(f"test_images in {path} is empty: treated as no test split")

    num_classes = int(max(int(y.max()) for _, y in prepared.values() if len(y)) + 1)
    if num_classes < 2:
        raise UserError(f"{path}: every label is 0, so there is only one class; a classifier "
                        "needs labels from at least two classes (0..K-1)")
    # Checked before anything is sized by the label range (one stray 1e9 would allocate GiBs).
    examples = sum(len(y) for _, y in prepared.values())
    if num_classes > min(MAX_CLASSES, examples):
        raise UserError(f"{path}: the largest label is {num_classes - 1}, more classes than "
                        f"{'examples' if examples < MAX_CLASSES else f'the {MAX_CLASSES} supported'}; "
                        "labels must be class indices 0..K-1")
    present = np.unique(train_y)
    if len(present) < 2:
        raise UserError(f"{path}: every training label is {int(present[0])}; a classifier needs "
                        "training examples of at least two classes")
    if image_size:
        native = train_x.shape[1:3]
        if native != (image_size, image_size):
            notes.append(f"resized {len(train_x)} images in {path} from {native[0]}x{native[1]} "
                         f"to {image_size}x{image_size}")
        train_x = resize_batch(train_x, image_size)
        if test_x is not None:
            test_x = resize_batch(test_x, image_size)
    names = [str(i) for i in range(num_classes)]
    return Dataset(as_pixels(train_x), train_y, None if test_x is None else as_pixels(test_x),
                   test_y, num_classes, names, notes)


def _read_array(archive, key, path):
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # allow_pickle=False makes object arrays fail here instead of running pickled code.
        raise UserError(f"cannot read {key} in {path} ({one_line(err)}); store it as a plain "
                        "numeric array") from None


def _npz_images(a, key, path):
    """Validate one image array; return (N, H, W, C) pixels (uint8, or float in [0, 1]) and an optional note."""
    if a.ndim == 3:
        a = a[..., None]
    elif a.ndim == 4 and a.shape[3] not in (1, 3):
        raise UserError(f"{path}: {key} has shape {a.shape}, i.e. {a.shape[3]} channels; "
                        "use 1 (grayscale) or 3 (RGB) channels as the last axis")
    elif a.ndim != 4:
        raise UserError(f"{path}: {key} has shape {a.shape} ({a.ndim}-D); expected (N, H, W) "
                        "grayscale or (N, H, W, 3) colour images (reshape flattened images first)")
    if 0 in a.shape[1:]:
        raise UserError(f"{path}: {key} has shape {a.shape}; images need a height and width of at least 1")
    note = None
    if a.dtype == np.uint8:
        x = a  # held as it is: uint8 is how every data set is kept in memory
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 255:
            raise UserError(f"{path}: {key} ({a.dtype}) has values {lo}..{hi}; store pixels as "
                            "uint8 0..255 or float in [0, 1]")
        x = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).sum())
            raise UserError(f"{path}: {key} has {bad} NaN or infinite pixel values; clean or "
                            "drop those images")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0.0 or hi > 255.0:
            raise UserError(f"{path}: {key} has float values {lo:g}..{hi:g}; store pixels in "
                            "[0, 1] (or 0..255), not standardised")
        if hi > 1.0:
            x /= 255.0
            note = f"{key} in {path} held float values up to {hi:g}: read as 0..255 and divided by 255"
    else:
        raise UserError(f"{path}: {key} has dtype {a.dtype}; store pixels as uint8 0..255 or "
                        "float in [0, 1]")
    return x, note




def _npz_labels(a, key, path):
    """Validate one label array; return (N,) int64 class indices."""
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise UserError(f"{path}: {key} has shape {a.shape}; store one class index per image, "
                        "shape (N,) or (N, 1) (not one-hot or multi-label)")
    if a.dtype == np.bool_:
        a = a.astype(np.int64)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or not np.all(a == np.round(a)):
            raise UserError(f"{path}: {key} holds non-integer values (e.g. "
                            f"{float(a[~np.isfinite(a) | (a != np.round(a))][0]):g}); labels must be "
                            "class indices 0..K-1")
    elif not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"{path}: {key} has dtype {a.dtype}; labels must be integer class "
                        "indices 0..K-1")
    if a.size and a.min() < 0:
        raise UserError(f"{path}: {key} has negative label {a.min()}; labels must be class "
                        "indices 0..K-1")
    return a.astype(np.int64)
