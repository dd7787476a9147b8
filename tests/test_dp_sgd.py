"""DP-SGD engine: equals the textbook algorithm (one example at a time), noise, Poisson sampling."""
import logging

import numpy as np
import pytest

from common import dp_sgd
from common.dp_sgd import DPSGDEngine
from common.model import build_model, per_example_loss
from common.tf_setup import keras, tf, tf_privacy


def naive_clipped_sum(model, x, y, clip):
    """Textbook clipping: one example's gradient at a time, clip by global norm, sum. Returns (sums, norms).

    The forward pass runs on the whole batch, as the engine's does: a batch of one can round a
    convolution differently, and where two inputs of a max-pooling window nearly tie, that
    rounding routes the gradient to the other input. Examples do not mix (no batch statistics,
    no dropout at training=False), so each loss's gradient is that example's gradient."""
    sums = [np.zeros(v.shape, np.float64) for v in model.trainable_variables]
    norms = []
    with tf.GradientTape(persistent=True) as tape:
        losses = per_example_loss(y, model(x, training=False))
        per_example = [losses[i] for i in range(len(x))]
    for loss in per_example:
        grads = tape.gradient(loss, model.trainable_variables)
        norm = float(tf.linalg.global_norm(grads))
        norms.append(norm)
        for total, g in zip(sums, grads):
            total += min(1.0, clip / norm) * g.numpy()
    return sums, np.array(norms)


def clip_between(norms):
    """A clipping norm that some examples exceed and some do not."""
    clip = float(np.median(norms))
    assert (norms > clip * 1.001).any() and (norms < clip * 0.999).any()
    return clip


def assert_sums_close(got, want):
    # float32 sums over examples and pixels cancel: an entry near zero carries the rounding of the
    # large terms it sums, so the absolute slack scales with the layer's largest entry. A wrong clip
    # factor or a lost example moves entries by 1e-2 or more.
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-4 * max(1.0, np.abs(w).max()))


def data(shape, classes, n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n)


def dense_model():
    return keras.Sequential([keras.layers.InputLayer(input_shape=(6,)),
                             keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")])


def conv_model():
    # valid padding, a stride, no bias on one layer, a frozen layer, a non-square kernel.
    frozen = keras.layers.Conv2D(3, 1, activation="relu")
    model = keras.Sequential([keras.layers.InputLayer(input_shape=(9, 9, 2)),
                              keras.layers.Conv2D(4, (3, 2), strides=2, padding="valid", activation="tanh"),
                              frozen,
                              keras.layers.Conv2D(5, 3, padding="same", use_bias=False, activation="relu"),
                              keras.layers.Flatten(),
                              keras.layers.Dense(4, activation="softmax")])
    frozen.trainable = False
    return model


def pooling_model():
    return keras.Sequential([keras.layers.InputLayer(input_shape=(10, 10, 1)),
                             keras.layers.Conv2D(4, 3, padding="same"),
                             keras.layers.Activation("elu"),
                             keras.layers.AveragePooling2D(2),
                             keras.layers.Conv2D(6, 3, padding="same", activation="sigmoid"),
                             keras.layers.MaxPooling2D(2, padding="same"),
                             keras.layers.Dropout(0.5),
                             keras.layers.Flatten(),
                             keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(3),
                             keras.layers.Softmax()])


def strided_model(shape, classes):
    """Strided tanh convolutions and no max pooling, for comparisons between two computations
    that may round a convolution differently (chunks of one against the whole batch, XLA against
    eager): where two inputs of a pooling window nearly tie, that rounding would move the
    gradient to the other input."""
    return keras.Sequential([keras.layers.InputLayer(input_shape=shape),
                             keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="tanh"),
                             keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="tanh"),
                             keras.layers.Flatten(),
                             keras.layers.Dense(classes, activation="softmax")])


CASES = {
    "dense": (dense_model, (6,), 3),
    "conv": (conv_model, (9, 9, 2), 4),
    "pooling": (pooling_model, (10, 10, 1), 3),
    "cnn28": (lambda: build_model((28, 28, 1), 10), (28, 28, 1), 10),
    "binary16": (lambda: build_model((16, 16, 1), 2), (16, 16, 1), 2),
    "groupnorm_rgb": (lambda: build_model((12, 12, 3), 5, (8, 12), 16, normalization="group"), (12, 12, 3), 5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_clipped_sum_equals_naive_loop(name):
    make, shape, classes = CASES[name]
    keras.utils.set_random_seed(1)
    model = make()
    x, y = data(shape, classes)
    _, norms = naive_clipped_sum(model, x, y, 1.0)
    clip = clip_between(norms)
    want, _ = naive_clipped_sum(model, x, y, clip)
    engine = DPSGDEngine(model, l2_norm_clip=clip, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    assert engine.fast_path
    assert_sums_close(engine.clipped_gradient_sum(x, y), want)


class _MyFlatten(keras.layers.Flatten):
    pass


@pytest.mark.parametrize("mixer", [
    lambda: keras.layers.Softmax(axis=0),
    lambda: keras.layers.LayerNormalization(axis=0, center=False, scale=False),
    lambda: keras.layers.Activation(lambda t: t - tf.reduce_mean(t, axis=0)),
    lambda: keras.layers.Dense(6, activation=lambda t: t - tf.reduce_mean(t, axis=0)),
    lambda: _MyFlatten(),  # a subclass may do anything in call()
])
def test_layers_that_may_mix_examples_take_the_exact_slow_path(mixer):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.layers.InputLayer(input_shape=(6,)), keras.layers.Dense(6, activation="tanh"),
                              mixer(), keras.layers.Dense(3, activation="softmax")])
    engine = DPSGDEngine(model, l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    assert not engine.fast_path
    # One example's influence on the clipped sum stays within the clip, whatever the layer does.
    x, y = data((6,), 3)
    full = engine.clipped_gradient_sum(x, y)
    without = engine.clipped_gradient_sum(x[1:], y[1:])
    assert np.sqrt(sum(np.sum((a.astype(np.float64) - b) ** 2) for a, b in zip(full, without))) <= 1.0 + 1e-5


def test_ghost_norm_conv_layer_equals_naive_loop():
    # Tiny feature maps, many channels: the planner picks the ghost norm for both convs.
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.layers.InputLayer(input_shape=(3, 3, 16)),
                              keras.layers.Conv2D(32, 3, padding="valid", activation="tanh"),
                              keras.layers.Conv2D(24, 3, strides=2, padding="same", activation="tanh"),
                              keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    x, y = data((3, 3, 16), 3, n=10)
    _, norms = naive_clipped_sum(model, x, y, 1.0)
    clip = clip_between(norms)
    want, _ = naive_clipped_sum(model, x, y, clip)
    engine = DPSGDEngine(model, l2_norm_clip=clip, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    assert [p.ghost for p in engine._plan if p.kind == "conv"] == [True, True]
    assert_sums_close(engine.clipped_gradient_sum(x, y), want)


def test_xla_padded_path_equals_naive_loop():
    keras.utils.set_random_seed(3)
    model = strided_model((16, 16, 1), 3)
    x, y = data((16, 16, 1), 3, n=10)
    _, norms = naive_clipped_sum(model, x, y, 1.0)
    clip = clip_between(norms)
    want, _ = naive_clipped_sum(model, x, y, clip)
    engine = DPSGDEngine(model, l2_norm_clip=clip, noise_multiplier=1.0, learning_rate=0.1, seed=0,
                         jit_compile=True)
    assert_sums_close(engine.clipped_gradient_sum(x, y), want)
    stats = engine.train(x, y, sampling_rate=0.5, steps=3)
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    assert len(stats.batch_sizes) == 3


def test_matches_tensorflow_privacy_vectorized_optimizer():
    """tf-privacy with noise 0 returns the clipped MEAN over the batch: times n is our sum."""
    _, dp_vectorized, _ = tf_privacy()
    keras.utils.set_random_seed(4)
    model = build_model((16, 16, 1), 3)
    x, y = data((16, 16, 1), 3, n=8)
    _, norms = naive_clipped_sum(model, x, y, 1.0)
    clip = clip_between(norms)
    opt = dp_vectorized.VectorizedDPKerasSGDOptimizer(l2_norm_clip=clip, noise_multiplier=0.0,
                                                      learning_rate=1.0)
    grads_and_vars = opt._compute_gradients(lambda: per_example_loss(y, model(x, training=False)),
                                            model.trainable_variables)
    want = [g.numpy() * len(x) for g, _ in grads_and_vars]
    engine = DPSGDEngine(model, l2_norm_clip=clip, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    assert_sums_close(engine.clipped_gradient_sum(x, y), want)


def test_unsupported_layer_uses_slow_path_and_is_exact(caplog, monkeypatch):
    monkeypatch.setattr(dp_sgd, "_warned", set())  # the warning is once per process
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.layers.InputLayer(input_shape=(8, 8, 1)),
                              keras.layers.Conv2D(4, 3, activation="tanh"),
                              keras.layers.LayerNormalization(),
                              keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    x, y = data((8, 8, 1), 3, n=10)
    _, norms = naive_clipped_sum(model, x, y, 1.0)
    clip = clip_between(norms)
    want, _ = naive_clipped_sum(model, x, y, clip)
    with caplog.at_level(logging.WARNING, logger="common.dp_sgd"):
        engine = DPSGDEngine(model, l2_norm_clip=clip, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    assert not engine.fast_path
    assert any("LayerNormalization" in r.getMessage() for r in caplog.records)
    assert_sums_close(engine.clipped_gradient_sum(x, y), want)
    before = [v.numpy().copy() for v in model.trainable_variables]
    engine.train(x, y, sampling_rate=0.5, steps=2)
    after = [v.numpy() for v in model.trainable_variables]
    assert all(np.isfinite(a).all() for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))


def test_noise_has_std_sigma_c_over_expected_batch():
    """With q = 1 every example is drawn: update minus noise-free update is lr * noise / n."""
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.layers.InputLayer(input_shape=(200,)),
                              keras.layers.Dense(100, activation="tanh"),
                              keras.layers.Dense(2, activation="softmax")])
    x, y = data((200,), 2, n=16)
    clip, sigma, lr = 0.5, 2.0, 0.1
    engine = DPSGDEngine(model, l2_norm_clip=clip, noise_multiplier=sigma, learning_rate=lr, seed=7)
    clean = engine.clipped_gradient_sum(x, y)
    before = [v.numpy().copy() for v in model.trainable_variables]
    stats = engine.train(x, y, sampling_rate=1.0, steps=1)
    assert stats.batch_sizes == [16]
    residual = np.concatenate([(a.numpy() - b + lr * c / 16).ravel()
                               for a, b, c in zip(model.trainable_variables, before, clean)])
    want = sigma * clip * lr / 16
    assert residual.size > 20000
    assert abs(residual.std() / want - 1) < 0.03
    assert abs(residual.mean()) < 0.03 * want


def test_divides_by_expected_not_drawn_batch_size():
    """Identical examples: the update is lr * k * clipped_grad / (q n) for the drawn k."""
    keras.utils.set_random_seed(8)
    model = dense_model()
    x = np.tile(np.linspace(-1, 1, 6, dtype=np.float32), (40, 1))
    y = np.full(40, 2)
    lr, q = 0.5, 0.25
    engine = DPSGDEngine(model, l2_norm_clip=0.01, noise_multiplier=0.0, learning_rate=lr, seed=9)
    one = engine.clipped_gradient_sum(x[:1], y[:1])
    assert np.sqrt(sum((g ** 2).sum() for g in one)) == pytest.approx(0.01, rel=1e-4)  # clipped
    before = [v.numpy().copy() for v in model.trainable_variables]
    stats = engine.train(x, y, sampling_rate=q, steps=1)
    k = stats.batch_sizes[0]
    assert k != q * 40  # the draw differs from its expectation for this seed
    for v, b, g in zip(model.trainable_variables, before, one):
        np.testing.assert_allclose(v.numpy() - b, -lr * k * g / (q * 40), rtol=1e-4, atol=1e-7)


def test_momentum_matches_keras_legacy_sgd():
    keras.utils.set_random_seed(10)
    model = dense_model()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    x, y = data((6,), 3, n=8)
    engine = DPSGDEngine(model, l2_norm_clip=0.3, noise_multiplier=0.0, learning_rate=0.2,
                         momentum=0.9, seed=0)
    ref_engine = DPSGDEngine(reference, l2_norm_clip=0.3, noise_multiplier=0.0, learning_rate=0.2, seed=0)
    opt = keras.optimizers.legacy.SGD(learning_rate=0.2, momentum=0.9)
    for _ in range(3):
        grads = [tf.constant(g / 8) for g in ref_engine.clipped_gradient_sum(x, y)]
        opt.apply_gradients(zip(grads, reference.trainable_variables))
        engine.train(x, y, sampling_rate=1.0, steps=1)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_poisson_batch_sizes_and_no_retrace():
    keras.utils.set_random_seed(11)
    model = dense_model()
    x, y = data((6,), 3, n=200)
    n, q = 200, 0.1
    engine = DPSGDEngine(model, l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.05, seed=12)
    stats = engine.train(x, y, sampling_rate=q, steps=300)
    sizes = np.array(stats.batch_sizes)
    assert stats.steps == 300 and len(sizes) == 300
    assert abs(sizes.mean() - n * q) < 1.0
    assert 0.7 < sizes.var() / (n * q * (1 - q)) < 1.3
    assert len(set(sizes)) > 10
    assert np.isfinite(stats.mean_loss) and stats.seconds > 0
    (step,) = [f["step"] for f in engine._functions.values()]
    assert step.experimental_get_tracing_count() == 1  # no retrace per batch size


def test_empty_draws_are_noise_only_steps():
    keras.utils.set_random_seed(13)
    model = dense_model()
    x, y = data((6,), 3, n=5)
    before = [v.numpy().copy() for v in model.trainable_variables]
    engine = DPSGDEngine(model, l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1, seed=14)
    stats = engine.train(x, y, sampling_rate=1e-6, steps=3)
    assert stats.batch_sizes == [0, 0, 0]
    assert np.isnan(stats.mean_loss)
    after = [v.numpy() for v in model.trainable_variables]
    assert all(np.isfinite(a).all() for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))  # noise was added


def _train_copy(weights, seed):
    model = dense_model()
    model.set_weights(weights)
    x, y = data((6,), 3, n=30)
    stats = DPSGDEngine(model, l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1,
                        seed=seed).train(x, y, sampling_rate=0.2, steps=4)
    return model.get_weights(), stats.batch_sizes


def test_seed_reproduces_and_none_is_unpredictable():
    weights = dense_model().get_weights()
    a, sizes_a = _train_copy(weights, 21)
    b, sizes_b = _train_copy(weights, 21)
    assert sizes_a == sizes_b
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    c, _ = _train_copy(weights, None)
    d, _ = _train_copy(weights, None)
    assert not all(np.array_equal(u, v) for u, v in zip(c, d))
    assert all(np.isfinite(u).all() for u in a + c + d)


def test_training_changes_weights_and_lowers_loss_without_noise():
    keras.utils.set_random_seed(15)
    model = build_model((16, 16, 1), 2)
    x, y = data((16, 16, 1), 2, n=32)
    engine = DPSGDEngine(model, l2_norm_clip=10.0, noise_multiplier=0.0, learning_rate=0.05, seed=16)
    before = [v.numpy().copy() for v in model.trainable_variables]
    first = engine.train(x, y, sampling_rate=0.5, steps=20).mean_loss
    last = engine.train(x, y, sampling_rate=0.5, steps=20).mean_loss
    assert last < first
    after = [v.numpy() for v in model.trainable_variables]
    assert all(np.isfinite(a).all() and not np.array_equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("kwargs", [
    {"l2_norm_clip": 0.0}, {"l2_norm_clip": float("nan")}, {"noise_multiplier": -1.0},
    {"learning_rate": 0.0}, {"momentum": 1.0},
])
def test_bad_arguments_are_refused(kwargs):
    args = {"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "learning_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DPSGDEngine(dense_model(), **args)


@pytest.mark.parametrize("q, steps", [(0.0, 1), (1.5, 1), (0.1, -1)])
def test_bad_train_arguments_are_refused(q, steps):
    engine = DPSGDEngine(dense_model(), l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1)
    x, y = data((6,), 3, n=5)
    with pytest.raises(ValueError):
        engine.train(x, y, sampling_rate=q, steps=steps)


def test_large_images_are_processed_in_chunks_exactly():
    """A memory budget smaller than one batch splits the per-example work; the sum is unchanged."""
    keras.utils.set_random_seed(2)
    model = strided_model((32, 32, 1), 3)
    x, y = data((32, 32, 1), 3, n=24)
    whole = DPSGDEngine(model, l2_norm_clip=0.5, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    tiny = DPSGDEngine(model, l2_norm_clip=0.5, noise_multiplier=1.0, learning_rate=0.1, seed=0,
                       memory_budget=1)
    assert tiny.chunk_size == 1 and whole.chunk_size >= 24
    assert_sums_close(tiny.clipped_gradient_sum(x, y), whole.clipped_gradient_sum(x, y))
    before = [w.copy() for w in model.get_weights()]
    stats = tiny.train(x, y, sampling_rate=0.5, steps=3)  # every step goes through the chunked path
    assert stats.steps == 3 and any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))


def test_uint8_images_are_scaled_like_floats():
    keras.utils.set_random_seed(3)
    model = build_model((8, 8, 1), 3, (4,), 8)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(10, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 3, size=10)
    engine = DPSGDEngine(model, l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    assert_sums_close(engine.clipped_gradient_sum(pixels, y),
                      engine.clipped_gradient_sum(pixels.astype(np.float32) * np.float32(1 / 255), y))


def test_the_cosine_schedule_starts_at_the_base_rate_and_never_exceeds_it():
    from common.dp_sgd import scheduled_learning_rate

    rates = [scheduled_learning_rate(0.2, "cosine", r, 20) for r in range(1, 21)]
    assert rates[0] == pytest.approx(0.2) and rates[10] == pytest.approx(0.1)
    assert all(a > b > 0 for a, b in zip(rates, rates[1:]))
    assert scheduled_learning_rate(0.2, "constant", 19, 20) == 0.2
    with pytest.raises(ValueError):
        scheduled_learning_rate(0.2, "linear", 1, 20)
