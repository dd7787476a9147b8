"""Scores of a model on held-out data: loss, accuracy, balanced accuracy, and AUC for binary tasks.

Balanced accuracy (the mean of per-class recalls) sits beside accuracy because diagnoses are
imbalanced: a model that always answers the majority class scores its share in accuracy
but 1 / classes in balanced accuracy, and `single_class` flags it outright.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from common.model import model_input, per_example_loss


# Values (pixels x channels) of input per evaluation batch. A batch's activations grow with its
# input: at 224 px RGB a batch of 256 held 3.4 GB more than the data (measured), 32 held 0.5 GB.
# This keeps small images at 256 a batch and large ones near 32.
EVALUATION_VALUES_PER_BATCH = 2**22


def evaluation_batch_size(x: np.ndarray, largest: int = 256) -> int:
    """Examples per forward pass: `largest`, fewer for large images (bounded memory)."""
    values = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    return max(1, min(largest, EVALUATION_VALUES_PER_BATCH // max(1, values)))


def predict(model, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Class probabilities, batch by batch (uint8 images are scaled one batch at a time)."""
    batch_size = batch_size or evaluation_batch_size(x)
    parts = [model(model_input(x[start:start + batch_size]), training=False).numpy()
             for start in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def evaluate_model(model, x: np.ndarray, y: np.ndarray, batch_size: int | None = None) -> dict:
    """{"loss", "accuracy", "balanced_accuracy", "single_class", "classes"} and, for two classes
    with both present, {"auc"}. Chance level of balanced accuracy is 1 / classes."""
    probabilities = predict(model, x, batch_size)
    loss = float(np.mean(per_example_loss(y, probabilities)))
    if probabilities.shape[-1] == 1:
        scores = probabilities[:, 0]
        predictions = (scores >= 0.5).astype(np.int64)
    else:
        scores = None
        predictions = probabilities.argmax(axis=-1)
    result = {"loss": loss, "accuracy": float(np.mean(predictions == y)),
              "balanced_accuracy": float(balanced_accuracy_score(y, predictions)),
              "single_class": int(len(np.unique(predictions)) == 1),
              "classes": max(2, int(probabilities.shape[-1]))}
    if scores is not None and len(np.unique(y)) == 2:
        result["auc"] = float(roc_auc_score(y, scores))
    return result
