"""Federated evaluation under DP: what a hospital releases about its held-out split, and its epsilon.

The release. For the global model it is sent, a hospital counts, per true class c, the
examples the model classifies correctly (`correct[c]`) and the ones it misses (`missed[c]`),
and releases those 2K counts with independent Gaussian noise of standard deviation sigma
on each. Nothing else about the split leaves: no loss, no AUC, no per-example score. Its
number of held-out units (images, or patients when the data names them) is public metadata,
as the training n is (DESIGN.md). Everything the coordinator shows (accuracy, per-class
recall, balanced accuracy, their federated means) is computed from these noisy counts:
post-processing, free.

Sensitivity (zero-out adjacency, as for training: one unit's records replaced by nothing).
- Unit "image": an image falls in exactly one cell, with weight 1. Removing it changes one
  count by 1: L1 and L2 sensitivity 1.
- Unit "patient": a patient with k held-out images gives each of them weight 1/k, so the
  patient's contribution is a non-negative vector whose entries sum to 1 (L1 norm 1) and
  whose L2 norm is at most 1 (equality when all k images land in one cell). Removing the
  patient moves the counts by that vector: L2 sensitivity 1 whatever k is. The counts are
  then patient-weighted (each patient counts once, split over their images), and so are
  the scores computed from them.
Replacing one unit by another (rather than removing it) could move two cells: sensitivity
sqrt(2); the project's adjacency is zero-out throughout, so the noise is calibrated to 1.

Why not the full confusion matrix: its row sums (the class sizes a recall divides by) would
carry the noise of K cells instead of 2, and accuracy the noise of K diagonal cells either
way; per-true-class correct and missed counts give recall and accuracy with less noise. For
two classes they are the confusion matrix.

Accounting. One release is the Gaussian mechanism with L2 sensitivity 1 and noise sigma: the
dp-accounting event GaussianDpEvent(sigma), written in this project's plain-data form as
`PrivacyEvent(sigma, sampling_rate=1.0, steps=1)` (Poisson sampling at rate 1 is no
sampling), so the odometer, the ledger and the audit compose it with the same PLD accountant
as DP-SGD (common/privacy.py). A hospital's evaluation epsilon composes every evaluation it
has ever answered on its held-out split, against its own evaluation budget; its held-out
patients are not in its training set (the split keeps a patient's images on one side), so
each patient's epsilon is the larger of the training and the evaluation epsilon.

Estimators. With the public total n, accuracy is estimated from both halves of the release,
(sum(correct) + n - sum(missed)) / (2 n): its noise has standard deviation sigma sqrt(K / 2) / n,
against sigma sqrt(K) / n from the correct counts alone. Recall of class c is
correct[c] / (correct[c] + missed[c]), clipped to [0, 1] (a class whose noisy size is below
1/2 has no recall); balanced accuracy is the mean of the recalls that exist. Clipping makes
these estimates slightly biased; it never affects privacy.
"""
from __future__ import annotations

import math

import numpy as np

from common.config import MAX_PLANNED_EVALUATIONS  # noqa: F401 - re-exported
from common.privacy import PrivacyEvent

SENSITIVITY = 1.0  # L2 (and L1) sensitivity of the counts, per unit of privacy (see above)
SAMPLING_RATE = 1.0  # an evaluation looks at every held-out unit: no sampling
MECHANISM = "gaussian-counts"  # what the ledger and replies name the release
# MAX_PLANNED_EVALUATIONS (common/config.py): the most evaluations a hospital accounts for in one
# run; PLD self-composition of that many Gaussians stays within seconds.
MIN_CLASS_SIZE = 0.5  # a class whose noisy size is below this has no recall estimate


def query_event(noise_multiplier: float, queries: int = 1) -> PrivacyEvent:
    """`queries` releases of the counts with Gaussian noise sigma * SENSITIVITY on each count."""
    return PrivacyEvent(float(noise_multiplier), SAMPLING_RATE, int(queries))


def useful_eval_noise(num_units: int) -> float:
    """The largest sigma worth answering with: beyond half the split's size per count, the scores are noise.

    A heuristic, like common.privacy.useful_noise_limit: it only ever makes a hospital decline."""
    return max(2.0, num_units / 2)


def unit_weights(units: np.ndarray | None, size: int) -> np.ndarray:
    """Each held-out image's weight: 1, or 1/k for each of a patient's k images."""
    if units is None:
        return np.ones(size, np.float64)
    units = np.asarray(units)
    if units.shape != (size,):
        raise ValueError(f"units must name one unit per held-out image: {units.shape} for {size} images")
    _, inverse, counts = np.unique(units, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def exact_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int,
                 units: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(correct, missed): per true class, the (unit-weighted) counts of hits and misses. Never released as is."""
    y_true, y_pred = np.asarray(y_true, np.int64).ravel(), np.asarray(y_pred, np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError("y_true and y_pred differ in length")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    weights = unit_weights(units, len(y_true))
    hit = y_true == y_pred
    correct = np.bincount(y_true[hit], weights=weights[hit], minlength=num_classes)
    missed = np.bincount(y_true[~hit], weights=weights[~hit], minlength=num_classes)
    return correct.astype(np.float64), missed.astype(np.float64)


def add_noise(counts: np.ndarray, noise_multiplier: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """counts + N(0, (sigma * SENSITIVITY)^2) on each; the generator is seeded from OS entropy unless given."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier!r}")
    rng = rng if rng is not None else np.random.default_rng()  # SeedSequence(None): OS entropy
    counts = np.asarray(counts, np.float64)
    return counts + rng.normal(0.0, noise_multiplier * SENSITIVITY, size=counts.shape)


def scores(correct, missed, num_units: float) -> dict:
    """Accuracy, per-class recall and balanced accuracy estimated from (noisy) counts; see the docstring."""
    correct, missed = np.asarray(correct, np.float64), np.asarray(missed, np.float64)
    result = {}
    if num_units > 0:
        accuracy = (correct.sum() + num_units - missed.sum()) / (2.0 * num_units)
        result["accuracy"] = float(np.clip(accuracy, 0.0, 1.0))
    size = correct + missed
    recalls = [float(np.clip(c / s, 0.0, 1.0)) if s >= MIN_CLASS_SIZE else math.nan
               for c, s in zip(correct, size)]
    known = [r for r in recalls if not math.isnan(r)]
    if known:
        result["balanced_accuracy"] = float(np.mean(known))
    result["recall"] = recalls
    return result


def federated_scores(replies: list[tuple[list, list, float]]) -> dict:
    """Scores of the sum of every hospital's noisy counts: [(correct, missed, num_units), ...]."""
    if not replies:
        return {}
    correct = np.sum([np.asarray(c, np.float64) for c, _, _ in replies], axis=0)
    missed = np.sum([np.asarray(m, np.float64) for _, m, _ in replies], axis=0)
    return scores(correct, missed, float(sum(n for _, _, n in replies)))
