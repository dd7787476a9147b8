"""The "folder" source: a folder of class subfolders of PNG/JPEG/DICOM files, as hospitals hold them.

Layout: `ROOT/<class>/*.png|*.jpg|*.jpeg|*.dcm` (extensions in any case, subfolders of a class
folder included), or `ROOT/train/<class>/...` with optional `ROOT/test/<class>/...` and
`ROOT/val/<class>/...` (val is merged into train). Classes are the sorted train class folder
names; hidden and tool folders (.git, __MACOSX) are never classes.

Colour (`data.color`): "gray" converts every image to one channel, a fixed rule so that every
hospital derives the same input shape from its own files whatever they hold (16-bit PNGs
keep their full range); "rgb" keeps three channels (stains, fundus, skin).

Size: `image_size` N > 0 resizes every image to N x N; 0 takes the most common size, except
that a folder whose most common size is larger than DEFAULT_FOLDER_SIZE is trained at
DEFAULT_FOLDER_SIZE (a note says so): DP-SGD on a CPU trains small images well and large
ones slowly. Images are read in
two passes: headers first (to find the size), then pixels decoded on threads straight to the
target, JPEGs at a reduced size where the format allows, into one uint8 array.

DICOM files (.dcm, .dicom) are decoded by common/dicom.py (rescale, window, MONOCHROME1, the
first frame of a multi-frame file). Where they carry a PatientID, the data set names each
image's patient by a pseudonym (common/pseudonym.py, the secret in ROOT/.patients.salt), so
that one patient's images stay together in every split; the raw ids are never kept.
`decode_files` is the part the labels table (common/table.py) shares.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.cpus import usable_cpus
from common.dataset import Dataset, beyond_machine_share, one_line, short_list, to_uint8
from common.dicom import DICOM_EXTENSIONS, decode_dicom, is_dicom, read_header
from common.errors import UserError
from common.pseudonym import pseudonymise

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg") + DICOM_EXTENSIONS
DEFAULT_FOLDER_SIZE = 32  # side a folder of larger images is trained at unless data.image_size says
_SPLIT_DIRS = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _visible_dirs(p):
    # Skip hidden and tool folders (.git, __MACOSX) that are never classes.
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))


def _folder_layout(root):
    """Map split name -> folder holding class subfolders: {"train": ..., "test": ..., "val": ...}."""
    subdirs = _visible_dirs(root)
    split_dirs = {d: _SPLIT_DIRS[d.name.lower()] for d in subdirs if d.name.lower() in _SPLIT_DIRS}
    if not split_dirs:
        return {"train": root}
    others = [d.name for d in subdirs if d not in split_dirs]
    found = {v: d for d, v in split_dirs.items()}
    if "train" not in found:
        raise UserError(f"{root} has a {next(iter(split_dirs)).name}/ folder but no train/ "
                        f"folder; put training images in {root / 'train'}/<class>/")
    if others:
        raise UserError(f"{root} mixes split folders (train/) with other folders "
                        f"({short_list(others)}); put class folders inside train/ and test/")
    if len(split_dirs) != len(found):
        dup = sorted(d.name for d in split_dirs)
        raise UserError(f"{root} has several folders for one split ({', '.join(dup)}); keep one "
                        "train/, one test/ and one val/")
    return found


def _class_files(split_dir):
    """[(class name, [image paths])] for one split folder, validated."""
    classes = _visible_dirs(split_dir)
    if not classes:
        loose = [f for f in split_dir.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            raise UserError(f"{split_dir} holds images directly but no class folders; move "
                            f"them into {split_dir}/<class name>/")
        raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/*.png "
                        f"(or .jpg, .jpeg, .dcm)")
    out = []
    for d in classes:
        files, other = [], Counter()
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith((".", "__")))
            for name in sorted(filenames):
                suffix = Path(name).suffix.lower()
                if name.startswith("."):
                    continue
                if suffix in IMAGE_EXTENSIONS:
                    files.append(Path(dirpath) / name)
                else:
                    other[suffix or name] += 1
        if not files:
            seen = f" (found only {short_list([f'{k} x{v}' for k, v in other.most_common()])})" if other else ""
            raise UserError(f"class folder {d} has no .png/.jpg/.jpeg/.dcm images{seen}; add images "
                            "(DICOM files need the .dcm extension here, or list them in a labels table: "
                            "data.source table) or remove the folder")
        out.append((d.name, files))
    return out


def load_folder(root, image_size, on_bad_image, color="gray"):
    """Load the folder at `root` (an existing directory) as a Dataset; see the module docstring."""
    layout = _folder_layout(root)
    per_split = {split: _class_files(d) for split, d in layout.items()}
    class_names = [name for name, _ in per_split["train"]]
    label_of = {name: i for i, name in enumerate(class_names)}
    for split, classes in per_split.items():
        for name, _ in classes:
            if name not in label_of:
                raise UserError(f"{split} class folder {layout[split] / name} is not a train class "
                                f"(train has {short_list(class_names, 8)}); rename it or add "
                                f"{layout['train'] / name}")
    if len(class_names) < 2:
        raise UserError(f"{layout['train']} has one class folder ({class_names[0]}); a "
                        "classifier needs at least two class folders")

    paths = [f for classes in per_split.values() for _, files in classes for f in files]
    splits = [split for split, classes in per_split.items() for _, files in classes for _ in files]
    labels = np.array([label_of[name] for classes in per_split.values() for name, files in classes for _ in files],
                      dtype=np.int64)
    images = decode_files(paths, image_size, on_bad_image, color, root)
    keep = images.keep

    notes = [f"{root}: {len(class_names)} classes ({short_list(class_names, 8)}), images "
             + ("read as RGB colour" if color == "rgb" else "converted to grayscale (data.color: rgb keeps colour)")]
    if "val" in layout:
        notes.append(f"merged {sum(1 for s, k in zip(splits, keep) if k and s == 'val')} "
                     f"images from {layout['val']} into train")
    notes += images.notes

    is_train = np.array([s in ("train", "val") for s in splits], dtype=bool) & keep
    is_test = np.array([s == "test" for s in splits], dtype=bool) & keep
    if not is_train.any():
        raise UserError(f"no readable training images in {layout['train']}; replace the "
                        "corrupt files listed with data.on_bad_image: refuse")
    empty = [n for i, n in enumerate(class_names) if not (labels[is_train] == i).any()]
    if empty:
        notes.append(f"class(es) {short_list(empty)} in {root} have no readable training images left")
    patients = pseudonymised_patients(images.patient_ids, root, notes)
    arrays = images.pixels
    test_x = arrays[is_test] if is_test.any() else None
    test_y = labels[is_test] if is_test.any() else None
    return Dataset(arrays[is_train], labels[is_train], test_x, test_y, len(class_names), class_names, notes,
                   train_patients=None if patients is None else patients[is_train],
                   test_patients=None if patients is None or not is_test.any() else patients[is_test])


@dataclass
class DecodedImages:
    pixels: np.ndarray  # (n, h, w, C) uint8, one row per path (zeros where keep is False)
    keep: np.ndarray  # (n,) bool: the path was read
    patient_ids: list  # (n,) the raw PatientID of a DICOM file, else None: pseudonymise before keeping
    notes: list[str]  # skipped files, multi-frame files, the size chosen and resizing


def decode_files(paths, image_size, on_bad_image, color, where) -> DecodedImages:
    """Decode PNG/JPEG/DICOM `paths` to one uint8 array at one size; `where` names the data set in notes.

    The size rule and the bad-image policy are the module docstring's; the folder and table loaders share them.
    """
    # Header pass: only headers are read here, cheap even for large X-rays. It finds the target
    # size before any pixel is decoded, so JPEGs can be decoded at reduced size.
    sizes, patient_ids, frames = [None] * len(paths), [None] * len(paths), []
    bad = []  # (path, reason)
    for i, f in enumerate(paths):
        try:
            if is_dicom(f):
                header = read_header(f)
                sizes[i], patient_ids[i] = header.size, header.patient_id
                if header.frames > 1:
                    frames.append(f)
            else:
                with Image.open(f) as im:
                    sizes[i] = im.size
        except MemoryError:  # not a bad file: let it surface
            raise
        except Exception as err:  # Pillow and pydicom raise many types for malformed files
            bad.append((f, one_line(err)))
            if on_bad_image == "refuse":
                _refuse(f, err)
    readable = [s for s in sizes if s is not None]
    if not readable:
        raise UserError(f"no readable images in {where}; check the files "
                        "or set data.on_bad_image: refuse to see the first error")

    size_note = None
    if image_size:
        target = (image_size, image_size)
    else:
        counts = Counter(readable)
        # Most common size; ties go to the larger image so that no detail is thrown away.
        target = max(counts, key=lambda s: (counts[s], s[0] * s[1], s))
        if max(target) > DEFAULT_FOLDER_SIZE:
            size_note = (f"images in {where} are {target[0]}x{target[1]} (most common size); training at "
                         f"{DEFAULT_FOLDER_SIZE}x{DEFAULT_FOLDER_SIZE}, a size DP-SGD trains well on a CPU "
                         "(set data.image_size to choose another)")
            target = (DEFAULT_FOLDER_SIZE, DEFAULT_FOLDER_SIZE)
    channels = 3 if color == "rgb" else 1
    too_large = beyond_machine_share(len(readable) * target[0] * target[1] * channels)  # one uint8 copy of each image
    if too_large:
        raise UserError(f"{len(readable)} images at {target[0]}x{target[1]}x{channels} take {too_large}: "
                        "lower data.image_size")
    arrays = np.zeros((len(paths), target[1], target[0], channels), dtype=np.uint8)

    def decode(i):
        if sizes[i] is None:
            return None
        try:
            arrays[i] = _decode(paths[i], target, color)
            return None
        except MemoryError:  # not a bad file: let it surface
            raise
        except Exception as err:  # truncated or corrupt pixel data shows up only here
            return err

    # Pillow and the DICOM codecs release the GIL while decoding, so threads use both cores without copies.
    workers = max(1, min(4, usable_cpus()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(pool.map(decode, range(len(paths))))
    keep = np.array([s is not None for s in sizes], dtype=bool)
    for i, err in enumerate(errors):
        if err is not None:
            if on_bad_image == "refuse":
                _refuse(paths[i], err)
            bad.append((paths[i], one_line(err)))
            keep[i] = False

    notes = []
    if bad:
        notes.append(f"skipped {len(bad)} unreadable image file(s) in {where}: "
                     f"{short_list([str(p) for p, _ in bad])}")
    if frames:
        notes.append(f"{len(frames)} multi-frame DICOM file(s) in {where} contribute their first frame only: "
                     f"{short_list([str(p) for p in frames])}")
    resized = sum(1 for s, k in zip(sizes, keep) if k and s != target)
    largest = max(max(s) for s in readable)
    if size_note:
        notes.append(size_note)
    elif image_size and image_size > largest:
        notes.append(f"data.image_size={image_size} enlarges every image in {where} (the largest side is {largest} px): "
                     "that adds no detail, only compute and memory")
    elif resized:
        why = "" if image_size else " (the most common size; set data.image_size to choose)"
        notes.append(f"resized {resized} of {int(keep.sum())} images in {where} to "
                     f"{target[0]}x{target[1]}{why}")
    return DecodedImages(arrays, keep, patient_ids, notes)


def pseudonymised_patients(raw_ids, data_path, notes):
    """(n,) str pseudonyms where any image names its patient, else None; an image naming none stands alone."""
    named = [i for i, p in enumerate(raw_ids) if p is not None]
    if not named:
        return None
    out = np.empty(len(raw_ids), dtype=object)
    out[named] = pseudonymise([raw_ids[i] for i in named], data_path)
    # An image with no patient id is its own patient: grouping it with other such images would
    # tie unrelated people together, and a pseudonym's hex can never equal these names.
    for i in set(range(len(raw_ids))) - set(named):
        out[i] = f"image-{i}"
    if len(named) < len(raw_ids):
        notes.append(f"{len(raw_ids) - len(named)} of {len(raw_ids)} images in {data_path} name no patient; "
                     "each is treated as its own patient")
    return out.astype(str)


def _refuse(path, err):
    raise UserError(f"cannot read image {path} ({one_line(err)}); replace or delete it, or "
                    "set data.on_bad_image: skip to leave unreadable images out") from None


def _decode(path, target, color):
    """Decode one image file to (h, w, 1) or, for color "rgb", (h, w, 3) uint8 at `target` (w, h)."""
    if is_dicom(path):
        return decode_dicom(path, target, color)
    gray = _decode_gray(path, target) if color != "rgb" else None
    if gray is not None:
        return gray[..., None]
    with Image.open(path) as im:
        if im.mode in _SIXTEEN_BIT_MODES or im.mode == "F":
            return np.repeat(_decode_gray(path, target)[..., None], 3, axis=-1)
        im.draft("RGB", target)
        im = im.convert("RGB")
        if im.size != target:
            im = im.resize(target, Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _decode_gray(path, target):
    """Decode one image file to (h, w) uint8 at `target` (w, h)."""
    with Image.open(path) as im:
        if im.mode in _SIXTEEN_BIT_MODES:
            # convert("L") would clip 16-bit values at 255; scale the full range instead.
            if im.size != target:
                im = im.convert("F").resize(target, Image.Resampling.BILINEAR)
            return to_uint8(np.asarray(im, dtype=np.float32) / 65535.0)
        if im.mode == "F":
            raise ValueError("32-bit float images are not supported; save as 8- or 16-bit")
        # For a JPEG, decode straight to grayscale and at a power-of-two reduction that is
        # still at least the target size; other formats ignore draft().
        im.draft("L", target)
        im = im.convert("L")
        if im.size != target:
            im = im.resize(target, Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)
