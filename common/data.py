"""Loading a hospital's images into arrays, and refusing bad data before any training starts.

Three sources (`data.source`):
- "digits": scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no
  test split). Needs no files; handy for smoke tests.
- "npz": a MedMNIST-style archive with `train_images`, `train_labels`, optional
  `val_images`/`val_labels` (merged into train, with a note) and optional
  `test_images`/`test_labels`. Images are (N, H, W) grayscale or (N, H, W, 1|3), uint8
  0..255 (uint16 0..65535) or float in [0, 1]; labels are class indices, (N,) or (N, 1).
  Colour stays colour (3 channels). Classes are 0..max label, named "0", "1", ...
- "folder": a folder of class subfolders of PNG/JPEG files (common/image_folder.py).

`image_size` 0 keeps the native size (for a folder: see common/image_folder.py); N > 0
resizes every image to N x N. Pixels come out uint8 (held once per process at a quarter of
float32's memory; common.model.model_input scales each batch to [0, 1]), 16-bit images
scaled to 8 bits; labels int64.

Every problem a person can fix (missing path, corrupt image, wrong array shape, bad labels,
empty class folder, ...) raises `UserError` with one line naming the file and the fix.
Nothing is cached on disk: load once per process and partition the arrays (common/partition.py).
"""
from __future__ import annotations

import importlib.util
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserError

# What one process may hold of the machine's memory: a simulation runs several at once (simulate.py,
# the coordinator, one worker per core), and a hospital's node runs its own services beside it.
MACHINE_SHARE = 1 / 4


def beyond_machine_share(nbytes: float) -> str | None:
    """'X GB ... this machine's Y GB' when `nbytes` exceeds what one process may hold, else None."""
    import psutil

    machine = psutil.virtual_memory().total
    if nbytes <= machine * MACHINE_SHARE:
        return None
    return f"{nbytes / 2**30:.1f} GB in every process that holds them, too much for this machine's {machine / 2**30:.0f} GB"

SOURCES = ("digits", "npz", "folder")
BAD_IMAGE_POLICIES = ("refuse", "skip")
_MAX_NAMED = 3  # how many bad files a note names before "and N more"


@dataclass
class Dataset:
    """One data set in memory: images (N, H, W, C) uint8 0..255, labels (N,) int64."""

    train_x: np.ndarray  # (N, H, W, C) uint8: a quarter of float32's memory; scaled per batch when used
    train_y: np.ndarray  # (N,) int64 in [0, num_classes)
    test_x: np.ndarray | None  # (M, H, W, C) or None when the source has no test split
    test_y: np.ndarray | None  # (M,) or None
    num_classes: int
    class_names: list[str]
    notes: list[str] = field(default_factory=list)  # what loading changed, for the run log

    def __repr__(self):
        # A summary: the default repr would print every pixel into the run log.
        test = "none" if self.test_x is None else len(self.test_x)
        return (f"Dataset(train={len(self.train_x)}, test={test}, input_shape={self.input_shape}, "
                f"classes={self.class_names!r}, notes={self.notes!r})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        h, w, c = self.train_x.shape[1:]
        return int(h), int(w), int(c)


def load_dataset(source: str, path: str = "", *, image_size: int = 0,
                 on_bad_image: str = "refuse", color: str = "gray") -> Dataset:
    """Load `source` ("digits", "npz" or "folder") from `path`; see the module docstring."""
    _check_options(source, image_size, on_bad_image)
    if source == "digits":
        return _load_digits(image_size)
    root = _existing_path(path, want_dir=(source == "folder"))
    if source == "npz":
        return _load_npz(root, image_size)
    # Imported here: common/image_folder.py builds on this module's Dataset and helpers.
    from common.image_folder import load_folder

    return load_folder(root, image_size, on_bad_image, color)


def load_hospital_paths(source: str, paths: list[str], *, image_size: int = 0,
                        on_bad_image: str = "refuse", color: str = "gray") -> list[Dataset]:
    """Load one file or folder per hospital and check they describe the same task.

    All hospitals must agree on the input shape (set `image_size` to resize them to one
    size) and on the classes (same class folder names, or the same label range for npz),
    because they train one shared model.
    """
    if not paths:
        raise UserError("data.paths is empty: give one data file or folder per hospital")
    datasets = [load_dataset(source, p, image_size=image_size, on_bad_image=on_bad_image, color=color)
                for p in paths]
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


def _existing_path(path, *, want_dir):
    kind = "folder" if want_dir else ".npz file"
    if not path:
        raise UserError(f"data.path is empty; set it to the {kind} holding the images")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data path {p} does not exist; check data.path (it should be a {kind})")
    if want_dir and not p.is_dir():
        raise UserError(f"data path {p} is a file but data.source 'folder' needs a folder of "
                        "class subfolders; point data.path at the folder or use data.source npz")
    if not want_dir and p.is_dir():
        raise UserError(f"data path {p} is a folder but data.source 'npz' needs an .npz file; "
                        "point data.path at the file or use data.source folder")
    return p


def short_list(items, limit=_MAX_NAMED):
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def one_line(err):
    """Pillow and numpy messages sometimes span lines; the user sees exactly one."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


# --------------------------------------------------------------------------- pixels

def to_uint8(x):
    """Pixels in [0, 1] (any float array) to uint8 0..255: how every data set is held in memory."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- resizing

def _resize_matrix(n_in, n_out):
    """(n_out, n_in) bilinear weights, with Pillow's antialiasing when shrinking.

    The triangle filter widens by the shrink factor so every input pixel contributes,
    which is what PIL's BILINEAR resize does; one matrix per axis resizes a whole batch
    with two matrix products instead of one Pillow call per image and channel.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale  # output pixel centres in input coordinates
    dist = (np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / support
    weights = np.clip(1.0 - np.abs(dist), 0.0, None)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _resize_batch(x, size):
    """Resize (N, H, W, C) pixels (uint8, or float in [0, 1]) to (N, size, size, C) uint8, bilinear."""
    n, h, w, c = x.shape
    if (h, w) == (size, size):
        return _as_pixels(x)
    rows, cols = _resize_matrix(h, size), _resize_matrix(w, size)
    out = np.empty((n, size, size, c), dtype=np.uint8)
    scale = np.float32(1 / 255) if x.dtype == np.uint8 else np.float32(1)
    step = max(1, 2**24 // max(1, h * w * c))  # bound the temporaries to ~64 MB per chunk
    for start in range(0, n, step):
        chunk = np.moveaxis(x[start:start + step], 3, 1).astype(np.float32) * scale  # (n, C, H, W)
        chunk = rows @ chunk @ cols.T  # (n, C, size, size)
        out[start:start + step] = to_uint8(np.moveaxis(chunk, 1, 3))
    return out


def _as_pixels(x):
    """uint8 as it is (no copy); float pixels in [0, 1] converted."""
    return x if x.dtype == np.uint8 else to_uint8(x)


# --------------------------------------------------------------------------- digits

def _digits_arrays():
    """(images (1797, 8, 8) in 0..16, labels) from the copy bundled with scikit-learn."""
    # Importing sklearn.datasets pulls in SciPy (seconds on a busy 2-core node, once per
    # simulated client process); the bundled CSV it reads is found without importing it.
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)  # 64 pixels, then the label
        return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits  # layout changed: take the public route

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def _load_digits(image_size):
    images, labels = _digits_arrays()
    x = (images / 16.0)[..., None]  # 0..16 -> [0, 1]
    notes = ["digits: scikit-learn's 8x8 handwritten digits, no test split"]
    if image_size:
        x = _resize_batch(x, image_size)
        notes.append(f"resized {len(x)} images in digits from 8x8 to {image_size}x{image_size}")
    names = [str(i) for i in range(10)]
    return Dataset(_as_pixels(x), labels, None, None, len(names), names, notes)


# --------------------------------------------------------------------------- npz

def _load_npz(path, image_size):
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
        prepared[split] = (_as_pixels(x), y)

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
        train_x = _resize_batch(train_x, image_size)
        if test_x is not None:
            test_x = _resize_batch(test_x, image_size)
    names = [str(i) for i in range(num_classes)]
    return Dataset(_as_pixels(train_x), train_y, None if test_x is None else _as_pixels(test_x),
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


MAX_CLASSES = 1000  # a label beyond this is a data error, not a task


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
