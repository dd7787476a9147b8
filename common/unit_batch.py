"""Patient-level DP-SGD batches: which images a draw of patients brings, and how they group.

With patient ids known, the DP-SGD unit is the patient: each step Poisson-samples patients,
and one patient's images form one unit whose summed gradient is clipped as a whole
(common/dp_sgd.py). This module turns a draw of patients into what the compiled step needs,
with numpy only:

- idx: the drawn patients' images, one patient's images next to each other;
- segment: each image's unit, numbered 0..k-1 within the batch;
- the pairs (first, second), first <= second, of images of one unit, with weight 2 for
  first < second (the pair stands for (i, j) and (j, i)) and 1 on the diagonal. A unit's
  squared gradient norm ||sum_i G_i||^2 is sum_{i,j} <G_i, G_j>, and the layer terms
  (common/layer_terms.py) compute <G_i, G_j> from activations without forming any G_i.

Every tensor has a batch-dependent length; padding (for XLA) appends rows that add nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class UnitBatch:
    """One batch of whole units, as index arrays into the training images."""

    idx: np.ndarray  # (b,) int32 image indices
    segment: np.ndarray  # (b,) int32 unit of each image, 0..k-1
    first: np.ndarray  # (p,) int32 positions in idx of each same-unit pair, first <= second
    second: np.ndarray
    weight: np.ndarray  # (p,) float32: 2 off the diagonal, 1 on it, 0 for padding

    @property
    def images(self) -> int:
        return len(self.idx)

    @property
    def pairs(self) -> int:
        return len(self.first)

    def padded(self, images: int, pairs: int) -> tuple[np.ndarray, ...]:
        """(idx, mask, segment, first, second, weight) padded to fixed lengths for XLA.

        Padding images repeat image idx[0] with mask 0 (their loss, hence gradient, is zero)
        in unit 0; padding pairs have weight 0. Neither adds anything to any unit."""
        if self.images > images or self.pairs > pairs:
            raise ValueError(f"batch of {self.images} images / {self.pairs} pairs exceeds {images} / {pairs}")
        mask = np.zeros(images, np.float32)
        mask[: self.images] = 1.0
        return (_pad(self.idx, images), mask, _pad(self.segment, images), _pad(self.first, pairs),
                _pad(self.second, pairs), _pad(self.weight, pairs))


def _pad(values, size):
    out = np.zeros(size, values.dtype)
    out[: len(values)] = values
    return out


class UnitIndex:
    """Which images belong to which of P units (patients), for drawing patient-level batches."""

    def __init__(self, units, num_images: int):
        units = np.asarray(units)
        if units.shape != (num_images,) or not np.issubdtype(units.dtype, np.integer):
            raise ValueError(f"units must be an int array with one entry per image ({num_images}), "
                             f"got {units.dtype} of shape {units.shape}")
        if num_images and units.min() < 0:
            raise ValueError("units: patient indices must be 0..P-1, got a negative one")
        sizes = np.bincount(units) if num_images else np.zeros(0, np.int64)
        if (sizes == 0).any():
            # An index with no image would still count in P, hence in the divisor q*P and in
            # the accounting's population: refuse rather than dilute silently.
            raise ValueError(f"units: patient indices must be 0..P-1 with every index used; "
                             f"{int((sizes == 0).sum())} of 0..{len(sizes) - 1} have no image")
        self.count = len(sizes)  # P
        self.sizes = sizes
        self._order = np.argsort(units, kind="stable").astype(np.int32)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._triangles: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def pair_count(self, units=None) -> int:
        """Same-unit pairs (i <= j) of the given units (all by default): n(n+1)/2 each."""
        sizes = self.sizes if units is None else self.sizes[units]
        return int((sizes * (sizes + 1) // 2).sum())

    def batch(self, units) -> UnitBatch:
        """The images of `units` (unit indices, each once) as one batch."""
        idx, first, second = [], [], []
        offset = 0
        for u in units:
            n = int(self.sizes[u])
            idx.append(self._order[self._starts[u]:self._starts[u + 1]])
            i, j = self._triangle(n)
            first.append(i + offset)
            second.append(j + offset)
            offset += n
        if not idx:
            empty = np.zeros(0, np.int32)
            return UnitBatch(empty, empty, empty, empty, np.zeros(0, np.float32))
        first, second = np.concatenate(first), np.concatenate(second)
        segment = np.repeat(np.arange(len(idx), dtype=np.int32), self.sizes[np.asarray(units)])
        weight = np.where(first == second, 1.0, 2.0).astype(np.float32)
        return UnitBatch(np.concatenate(idx), segment, first, second, weight)

    def _triangle(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions (i, j), i <= j, of the pairs among n images (cached: units share sizes)."""
        if n not in self._triangles:
            i, j = np.triu_indices(n)
            self._triangles[n] = (i.astype(np.int32), j.astype(np.int32))
        return self._triangles[n]

    def chunks(self, units, max_images: int, max_pairs: int | None = None) -> list[np.ndarray]:
        """`units` split into runs of whole units of at most max_images images (and max_pairs pairs).

        A unit is never split: its norm needs all of its images at once. A unit larger than
        the limit gets a chunk of its own (over the memory budget, but exact)."""
        out, start, images, pairs = [], 0, 0, 0
        units = np.asarray(units)
        for k, u in enumerate(units):
            n = int(self.sizes[u])
            p = n * (n + 1) // 2
            over = images + n > max_images or (max_pairs is not None and pairs + p > max_pairs)
            if k > start and over:
                out.append(units[start:k])
                start, images, pairs = k, 0, 0
            images += n
            pairs += p
        if start < len(units):
            out.append(units[start:])
        return out

    def pad_sizes(self, q: float) -> tuple[int, int]:
        """Fixed XLA lengths (images, pairs) for Poisson draws of units at rate q.

        Each is mean + 4 standard deviations of the drawn total, plus the largest unit (so
        that any unit fits, and an overflow can always be split into whole units), rounded
        up to 8 and at most the total."""
        pairs = self.sizes * (self.sizes + 1) // 2
        return _bound(self.sizes, q), _bound(pairs, q)


def _bound(per_unit: np.ndarray, q: float) -> int:
    mean = q * per_unit.sum()
    sd = math.sqrt(q * (1 - q) * float((per_unit.astype(np.float64) ** 2).sum()))
    bound = mean + 4 * sd + per_unit.max() + 1
    return int(min(per_unit.sum(), 8 * math.ceil(bound / 8)))
