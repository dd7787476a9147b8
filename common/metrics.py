"""Scores of a model on held-out data: loss, accuracy, and AUC for binary tasks."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from common.model import per_example_loss


def evaluate_model(model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict:
    """{"loss", "accuracy"} and, for two classes with both present, {"auc"}."""
    probabilities = model.predict(x, batch_size=batch_size, verbose=0)
    loss = float(np.mean(per_example_loss(y, probabilities)))
    if probabilities.shape[-1] == 1:
        scores = probabilities[:, 0]
        predictions = (scores >= 0.5).astype(np.int64)
    else:
        scores = None
        predictions = probabilities.argmax(axis=-1)
    result = {"loss": loss, "accuracy": float(np.mean(predictions == y))}
    if scores is not None and len(np.unique(y)) == 2:
        result["auc"] = float(roc_auc_score(y, scores))
    return result
