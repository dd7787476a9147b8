"""The types and pixel helpers every loader shares: `Dataset`, uint8 pixels, batch resizing, one-line messages.

Loaders (common/npz.py, common/image_folder.py, common/dicom.py, common/table.py, the digits in
common/digits.py) build on this module; common/data.py dispatches to them. Nothing here imports a loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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


_MAX_NAMED = 3  # how many bad files a note names before "and N more"
MAX_CLASSES = 1000  # a label beyond this is a data error, not a task


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
    # Which training (test) images belong to one patient: one id per image, pseudonymised where it
    # came from the files (common/table.py), or None when the source does not say (the unit is then
    # the image). Images of one patient always stay on one side of every split and in one hospital.
    train_patients: np.ndarray | None = None  # (N,) str
    test_patients: np.ndarray | None = None  # (M,) str
    # Set by common/duplicates.py at load time: the group of each training image (identical images and
    # one patient's images share one; splits keep groups whole), and its set of identical images
    # (-1 when it has no copy; None when there are no such sets).
    train_groups: np.ndarray | None = None  # (N,) int64
    identical_sets: np.ndarray | None = None  # (N,) int64

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

def resize_matrix(n_in, n_out):
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


def resize_batch(x, size):
    """Resize (N, H, W, C) pixels (uint8, or float in [0, 1]) to (N, size, size, C) uint8, bilinear."""
    n, h, w, c = x.shape
    if (h, w) == (size, size):
        return as_pixels(x)
    rows, cols = resize_matrix(h, size), resize_matrix(w, size)
    out = np.empty((n, size, size, c), dtype=np.uint8)
    scale = np.float32(1 / 255) if x.dtype == np.uint8 else np.float32(1)
    step = max(1, 2**24 // max(1, h * w * c))  # bound the temporaries to ~64 MB per chunk
    for start in range(0, n, step):
        chunk = np.moveaxis(x[start:start + step], 3, 1).astype(np.float32) * scale  # (n, C, H, W)
        chunk = rows @ chunk @ cols.T  # (n, C, size, size)
        out[start:start + step] = to_uint8(np.moveaxis(chunk, 1, 3))
    return out


def as_pixels(x):
    """uint8 as it is (no copy); float pixels in [0, 1] converted."""
    return x if x.dtype == np.uint8 else to_uint8(x)


