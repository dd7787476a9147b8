"""Evaluation scores: the same whatever the batch, and large images evaluated in small batches."""
import numpy as np
import pytest

from common.config import ModelConfig
from common.metrics import evaluate_model, evaluation_batch_size
from common.model import make_model
from common.tf_setup import keras


def test_scores_do_not_depend_on_the_evaluation_batch():
    keras.utils.set_random_seed(0)  # the same weights whatever ran before
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (70, 32, 32, 1), dtype=np.uint8)
    y = rng.integers(0, 3, 70)
    model = make_model(ModelConfig(), (32, 32, 1), 3)
    whole = evaluate_model(model, x, y, batch_size=70)
    pieces = evaluate_model(model, x, y, batch_size=8)
    default = evaluate_model(model, x, y)
    for scores in (pieces, default):
        assert scores["accuracy"] == whole["accuracy"]
        assert scores["balanced_accuracy"] == whole["balanced_accuracy"]
        assert scores["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_large_images_are_evaluated_in_small_batches():
    # A batch's activations grow with its input: 256 images at 224 px RGB held 3.4 GB.
    assert evaluation_batch_size(np.zeros((1, 8, 8, 1), np.uint8)) == 256
    assert evaluation_batch_size(np.zeros((1, 32, 32, 1), np.uint8)) == 256
    assert evaluation_batch_size(np.zeros((1, 224, 224, 3), np.uint8)) == 27
    assert evaluation_batch_size(np.zeros((1, 256, 256, 1), np.uint8)) == 64
    assert evaluation_batch_size(np.zeros((1, 4096, 4096, 3), np.uint8)) == 1
