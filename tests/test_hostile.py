"""A hostile coordinator: weights crafted so that one example's loss overflows.

Without protection the clipped sum becomes NaN exactly when the target example is in the
batch, which reveals its presence. With it, a non-finite example counts as zero, so it moves
the sum by at most C (here: not at all) whatever the weights.
"""
import numpy as np
import pytest

from common.dp_sgd import DPSGDEngine
from common.tf_setup import keras

CLIP = 1.0
TARGET = 3


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 8, 8, 1)).astype(np.float32)
    x[TARGET] += 10.0  # the image the coordinator wants to detect
    return x, rng.integers(0, 3, 10)


def _layers():
    return [keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax")]


def _hostile(model):
    """Weights under which only the target's 3x3 patches pass the ReLU, at ~1e36, then logits overflow."""
    conv, dense = [layer for layer in model.layers if layer.weights]
    conv.set_weights([np.full((3, 3, 1, 4), 1e35, np.float32), np.full(4, -1e35 * 54, np.float32)])
    dense.set_weights([np.full(dense.kernel.shape, 1e10, np.float32), np.zeros(3, np.float32)])
    return model


def _sequential():
    return _hostile(keras.Sequential([keras.layers.InputLayer(input_shape=(8, 8, 1)), *_layers()]))


def _functional():  # not a Sequential: the engine takes its per-example-gradient (slow) path
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for layer in _layers():
        h = layer(h)
    return _hostile(keras.Model(inputs, h))


@pytest.mark.parametrize("build, jit", [(_sequential, False), (_sequential, True), (_functional, False)])
def test_an_overflowing_example_moves_the_clipped_sum_by_at_most_c(build, jit):
    x, y = _data()
    model = build()
    engine = DPSGDEngine(model, l2_norm_clip=CLIP, noise_multiplier=1.0, learning_rate=0.1, seed=0,
                         jit_compile=jit)
    assert engine.fast_path == (build is _sequential)
    # The crafted weights do overflow the target (and only the target) in the forward pass.
    outputs = model(x, training=False).numpy()
    assert not np.all(np.isfinite(outputs[TARGET]))
    assert np.all(np.isfinite(np.delete(outputs, TARGET, axis=0)))

    others = [i for i in range(len(x)) if i != TARGET]
    with_target = engine.clipped_gradient_sum(x, y)
    without = engine.clipped_gradient_sum(x[others], y[others])
    assert all(np.all(np.isfinite(g)) for g in with_target)
    difference = np.sqrt(sum(np.sum((a.astype(np.float64) - b) ** 2) for a, b in zip(with_target, without)))
    assert difference <= CLIP * (1 + 1e-5)

    # A whole noisy training run on data holding the target returns finite weights.
    stats = engine.train(x, y, sampling_rate=1.0, steps=2)
    assert np.isfinite(stats.mean_loss)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
