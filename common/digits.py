"""The "digits" source: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no test split)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from common.dataset import Dataset, as_pixels, resize_batch


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


def load_digits(image_size):
    images, labels = _digits_arrays()
    x = (images / 16.0)[..., None]  # 0..16 -> [0, 1]
    notes = ["digits: scikit-learn's 8x8 handwritten digits, no test split"]
    if image_size:
        x = resize_batch(x, image_size)
        notes.append(f"resized {len(x)} images in digits from 8x8 to {image_size}x{image_size}")
    names = [str(i) for i in range(10)]
    return Dataset(as_pixels(x), labels, None, None, len(names), names, notes)
