"""Patient-level DP-SGD (issue 24 item 3): one patient's images are one unit, clipped as a whole."""
import numpy as np
import pytest

from common.config import ModelConfig
from common.dp_sgd import DPSGDEngine
from common.model import build_model, make_model, per_example_loss
from common.sampling import patient_sampling
from common.tf_setup import keras, tf
from common.unit_batch import UnitIndex

# Patient index of each of 12 images: patients of 1 to 4 images, not in image order.
UNITS = np.array([0, 1, 1, 2, 3, 2, 3, 3, 4, 3, 5, 5])


def patient_loop(model, x, y, units, clip):
    """Textbook patient-level clipping: per patient, the gradient of the sum of its images' losses,
    clipped to global norm `clip`; summed over patients (float64). Returns (sums, norms).

    The forward pass runs on the whole batch, as the engine's does, so that a convolution is
    rounded the same way (a near-tie in a max-pooling window could otherwise route the
    gradient to another input); images do not mix, so the per-patient loss sums are exact."""
    sums = [np.zeros(v.shape, np.float64) for v in model.trainable_variables]
    norms = []
    with tf.GradientTape(persistent=True) as tape:
        losses = per_example_loss(y, model(x, training=False))
        per_patient = [tf.reduce_sum(tf.gather(losses, np.flatnonzero(units == u))) for u in range(units.max() + 1)]
    for loss in per_patient:
        grads = [tf.zeros_like(v) if g is None else g
                 for g, v in zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)]
        norm = float(tf.linalg.global_norm(grads))
        norms.append(norm)
        for total, g in zip(sums, grads):
            total += min(1.0, clip / norm) * g.numpy().astype(np.float64)
    return sums, np.array(norms)


def relative_error(got, want):
    diff = np.sqrt(sum(np.sum((g.astype(np.float64) - w) ** 2) for g, w in zip(got, want)))
    return diff / np.sqrt(sum(np.sum(np.square(w)) for w in want))


def distance(a, b):
    return np.sqrt(sum(np.sum((u.astype(np.float64) - v) ** 2) for u, v in zip(a, b)))


def data(shape, classes, n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n)


def dense_model():
    return keras.Sequential([keras.layers.InputLayer(input_shape=(6,)),
                             keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")])


def conv_model():
    # valid padding, a stride, a layer without bias, a frozen layer, a non-square kernel.
    frozen = keras.layers.Conv2D(3, 1, activation="relu")
    model = keras.Sequential([keras.layers.InputLayer(input_shape=(9, 9, 2)),
                              keras.layers.Conv2D(4, (3, 2), strides=2, padding="valid", activation="tanh"),
                              frozen,
                              keras.layers.Conv2D(5, 3, padding="same", use_bias=False, activation="tanh"),
                              keras.layers.Flatten(),
                              keras.layers.Dense(4, activation="softmax")])
    frozen.trainable = False
    return model


def ghost_model():
    # Tiny feature maps, many channels: the planner picks the ghost norm (pairs' Gram blocks).
    return keras.Sequential([keras.layers.InputLayer(input_shape=(3, 3, 16)),
                             keras.layers.Conv2D(32, 3, padding="valid", activation="tanh"),
                             keras.layers.Conv2D(24, 3, strides=2, padding="same", activation="tanh"),
                             keras.layers.Flatten(),
                             keras.layers.Dense(3, activation="softmax")])


def slow_model():
    # LayerNormalization with weights: not in the layer walk, the exact per-example path.
    return keras.Sequential([keras.layers.InputLayer(input_shape=(8, 8, 1)),
                             keras.layers.Conv2D(4, 3, activation="tanh"),
                             keras.layers.LayerNormalization(),
                             keras.layers.Flatten(),
                             keras.layers.Dense(3, activation="softmax")])


CASES = {
    "dense": (dense_model, (6,), 3),
    "conv": (conv_model, (9, 9, 2), 4),
    "ghost": (ghost_model, (3, 3, 16), 3),
    # The default config's network (GroupNorm, max-pooling, a sigmoid output), at 16x16.
    "default_cnn": (lambda: make_model(ModelConfig(), (16, 16, 1), 2), (16, 16, 1), 2),
    "slow_path": (slow_model, (8, 8, 1), 3),
}


def clip_between(norms):
    """A clipping norm that some patients exceed and some do not."""
    clip = float(np.median(norms))
    assert (norms > clip * 1.001).any() and (norms < clip * 0.999).any()
    return clip


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("name", list(CASES))
def test_unit_clipped_sum_equals_a_loop_over_patients(name, jit):
    make, shape, classes = CASES[name]
    keras.utils.set_random_seed(1)
    model = make()
    x, y = data(shape, classes)
    _, norms = patient_loop(model, x, y, UNITS, 1.0)
    clip = clip_between(norms)
    want, _ = patient_loop(model, x, y, UNITS, clip)
    engine = DPSGDEngine(model, l2_norm_clip=clip, noise_multiplier=1.0, learning_rate=0.1, seed=0, jit_compile=jit)
    assert engine.fast_path == (name != "slow_path")
    if name == "ghost":
        assert [p.ghost for p in engine._plan if p.kind == "conv"] == [True, True]
    got = engine.clipped_gradient_sum(x, y, units=UNITS)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert relative_error(got, want) < 1e-5


def large_gradient_setup():
    """The default CNN at 16x16 with a clip far below its gradients: every patient is clipped."""
    keras.utils.set_random_seed(2)
    model = make_model(ModelConfig(), (16, 16, 1), 2)
    x, y = data((16, 16, 1), 2)
    _, norms = patient_loop(model, x, y, UNITS, 1.0)
    clip = float(norms.min()) / 20
    return model, x, y, clip


def test_one_patient_moves_the_clipped_sum_by_at_most_c_whatever_its_images():
    model, x, y, clip = large_gradient_setup()
    engine = DPSGDEngine(model, l2_norm_clip=clip, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    full = engine.clipped_gradient_sum(x, y, units=UNITS)
    for patient in range(UNITS.max() + 1):
        others = UNITS != patient
        rest = UNITS[others]
        without = engine.clipped_gradient_sum(x[others], y[others], units=np.unique(rest, return_inverse=True)[1])
        moved = distance(full, without)
        assert moved <= clip * (1 + 1e-5)
        assert moved > 0.99 * clip  # the patient's whole (clipped) gradient, not a fraction of it
    # Per-image clipping would let the four-image patient move the sum by nearly 4 C.
    four = UNITS == 3
    per_image = distance(engine.clipped_gradient_sum(x, y), engine.clipped_gradient_sum(x[~four], y[~four]))
    assert per_image > 2 * clip


def test_every_image_its_own_patient_equals_per_image_clipping():
    keras.utils.set_random_seed(3)
    model = make_model(ModelConfig(), (16, 16, 1), 2)
    x, y = data((16, 16, 1), 2)
    engine = DPSGDEngine(model, l2_norm_clip=0.05, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    per_image = engine.clipped_gradient_sum(x, y)
    # units=None is the per-image path as before: the textbook loop with one image per patient.
    want, norms = patient_loop(model, x, y, np.arange(len(x)), 0.05)
    assert (norms > 0.05).any() and relative_error(per_image, want) < 1e-5
    assert relative_error(engine.clipped_gradient_sum(x, y, units=np.arange(len(x))), want) < 1e-5
    shuffled = np.random.default_rng(0).permutation(len(x))  # any numbering of singleton patients
    assert relative_error(engine.clipped_gradient_sum(x, y, units=shuffled), want) < 1e-5


def test_a_non_finite_image_counts_as_zero_within_its_patient():
    keras.utils.set_random_seed(4)
    model = dense_model()
    x, y = data((6,), 3)
    bad = 6  # one of patient 3's four images
    x_bad = x.copy()
    x_bad[bad, 0] = np.inf
    engine = DPSGDEngine(model, l2_norm_clip=0.5, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    got = engine.clipped_gradient_sum(x_bad, y, units=UNITS)
    keep = np.arange(len(x)) != bad
    want, _ = patient_loop(model, x[keep], y[keep], UNITS[keep], 0.5)
    assert all(np.isfinite(g).all() for g in got)
    assert relative_error(got, want) < 1e-5


def test_training_divides_by_the_expected_number_of_patients():
    """q = 1, no noise: the update is lr * clipped patient sum / P (P = 6 patients, 12 images)."""
    keras.utils.set_random_seed(5)
    model = dense_model()
    x, y = data((6,), 3)
    engine = DPSGDEngine(model, l2_norm_clip=0.5, noise_multiplier=0.0, learning_rate=0.3, seed=0)
    clean = engine.clipped_gradient_sum(x, y, units=UNITS)
    before = [v.numpy().copy() for v in model.trainable_variables]
    stats = engine.train(x, y, sampling_rate=1.0, steps=1, units=UNITS)
    assert stats.batch_sizes == [6] and stats.images == [12] and np.isfinite(stats.mean_loss)
    for v, b, g in zip(model.trainable_variables, before, clean):
        np.testing.assert_allclose(v.numpy() - b, -0.3 * g / 6, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_poisson_draws_of_patients_without_retracing(jit):
    keras.utils.set_random_seed(6)
    model = dense_model()
    rng = np.random.default_rng(7)
    units = np.repeat(np.arange(100), rng.integers(1, 5, 100))  # 100 patients of 1-4 images
    x, y = data((6,), 3, n=len(units))
    q = 0.1
    engine = DPSGDEngine(model, l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.05, seed=8, jit_compile=jit)
    stats = engine.train(x, y, sampling_rate=q, steps=200, units=units)
    drawn = np.array(stats.batch_sizes)
    assert abs(drawn.mean() - 100 * q) < 1.0 and len(set(drawn)) > 5  # patients, Poisson
    assert len(set(stats.images)) > len(set(drawn))  # images vary more than patients
    assert np.isfinite(stats.mean_loss)
    (fns,) = engine._functions.values()
    assert fns["unit_step"].experimental_get_tracing_count() == 1
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_an_empty_draw_of_patients_is_a_noise_only_step(jit):
    keras.utils.set_random_seed(9)
    model = dense_model()
    x, y = data((6,), 3)
    before = [v.numpy().copy() for v in model.trainable_variables]
    engine = DPSGDEngine(model, l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1, seed=10, jit_compile=jit)
    stats = engine.train(x, y, sampling_rate=1e-6, steps=3, units=UNITS)
    assert stats.batch_sizes == [0, 0, 0] and stats.images == [0, 0, 0]
    assert np.isnan(stats.mean_loss)
    after = [v.numpy() for v in model.trainable_variables]
    assert all(np.isfinite(a).all() for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))  # noise was added


def test_patients_larger_than_the_memory_chunk_are_kept_whole():
    """A memory budget below one image: each patient is its own chunk, never split."""
    keras.utils.set_random_seed(11)
    model = build_model((16, 16, 1), 3, (4, 8), 8)
    x, y = data((16, 16, 1), 3)
    whole = DPSGDEngine(model, l2_norm_clip=0.2, noise_multiplier=1.0, learning_rate=0.1, seed=0)
    tiny = DPSGDEngine(model, l2_norm_clip=0.2, noise_multiplier=1.0, learning_rate=0.1, seed=0, memory_budget=1)
    assert tiny.chunk_size == 1
    want, _ = patient_loop(model, x, y, UNITS, 0.2)
    assert relative_error(tiny.clipped_gradient_sum(x, y, units=UNITS), want) < 1e-5
    assert relative_error(whole.clipped_gradient_sum(x, y, units=UNITS), want) < 1e-5
    stats = tiny.train(x, y, sampling_rate=0.7, steps=2, units=UNITS)  # through the chunked path
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables) and stats.steps == 2


@pytest.mark.parametrize("units, message", [
    (UNITS[:-1], "one entry per image"),
    (UNITS.astype(np.float32), "int array"),
    (np.where(UNITS == 0, -1, UNITS), "negative"),
    (np.where(UNITS == 2, 7, UNITS), "every index used"),
])
def test_bad_unit_arrays_are_refused(units, message):
    engine = DPSGDEngine(dense_model(), l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.1)
    x, y = data((6,), 3)
    with pytest.raises(ValueError, match=message):
        engine.train(x, y, sampling_rate=0.5, steps=1, units=units)


def test_unit_batches_list_every_same_patient_pair_once():
    index = UnitIndex(UNITS, len(UNITS))
    assert index.count == 6 and index.sizes.tolist() == [1, 2, 2, 4, 1, 2]
    batch = index.batch(np.array([3, 1]))
    assert sorted(batch.idx[:4].tolist()) == [4, 6, 7, 9] and sorted(batch.idx[4:].tolist()) == [1, 2]
    assert batch.segment.tolist() == [0, 0, 0, 0, 1, 1]
    assert batch.pairs == 10 + 3 == index.pair_count([3, 1])
    assert (batch.weight == np.where(batch.first == batch.second, 1, 2)).all()
    assert batch.weight.sum() == 4 ** 2 + 2 ** 2  # every ordered pair (i, j) of each patient
    assert [c.tolist() for c in index.chunks(np.array([3, 1, 0, 5]), 4)] == [[3], [1, 0], [5]]


def test_patient_sampling_counts_patients():
    q, steps = patient_sampling(16, 2.0, 200)
    assert q == pytest.approx(16 / 200) and steps == 25
    assert patient_sampling(64, 1.0, 30) == (1.0, 1)
