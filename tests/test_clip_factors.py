"""Clip factors from per-example squared norms: every factor is finite and in [0, 1] (issue 25 item 3)."""
import numpy as np

from common.layer_terms import clip_factors, finite_rows
from common.tf_setup import tf


def test_negative_and_non_finite_squared_norms_give_finite_factors():
    clip = 1.0
    # Per-example gradients: a zero one (its squared norm rounded to -1e-6, as Conv2D's Gram
    # formula can), one inside the clip, one NaN, one infinite, one far outside the clip.
    grads = np.array([[0.0, 0.0], [0.3, 0.4], [np.nan, 1.0], [np.inf, 0.0], [30.0, 40.0]], np.float32)
    sq_norm = np.array([-1e-6, 0.25, np.nan, np.inf, 2500.0], np.float32)
    losses = np.ones(5, np.float32)
    factors, finite = clip_factors(tf.constant(sq_norm), tf.constant(losses), clip)
    factors, finite = factors.numpy(), finite.numpy()
    assert np.isfinite(factors).all()
    np.testing.assert_allclose(factors, [1.0, 1.0, 0.0, 0.0, 0.02], rtol=1e-6)
    assert finite.tolist() == [True, True, False, False, True]
    # The clipped sum, built as the engine builds it, is finite and leaves out the bad examples.
    total = tf.tensordot(tf.constant(factors), finite_rows(tf.constant(grads), tf.constant(finite)), 1).numpy()
    assert np.isfinite(total).all()
    np.testing.assert_allclose(total, [0.3 + 0.6, 0.4 + 0.8], rtol=1e-6)


def test_non_finite_loss_zeroes_the_example():
    factors, finite = clip_factors(tf.constant([0.25, -0.0]), tf.constant([np.nan, 1.0]), 1.0)
    assert factors.numpy().tolist() == [0.0, 1.0] and finite.numpy().tolist() == [False, True]
