"""One epoch of the default CNN: plain Keras vs our DP-SGD engine vs tensorflow-privacy.

    uv run python -m bench.dp_sgd            # readable table
    uv run python -m bench.dp_sgd --json     # one JSON object keyed by input size

Synthetic random images, batch 64 (the engine: Poisson rate q = 64/n, n/64 steps), same n
for every method at a given size. Every method is warmed up first (tracing and XLA
compilation are not timed); repetitions are interleaved across methods so that load from
other processes hits them alike, and the median is reported, as wall-clock seconds and as
process CPU seconds (the steadier figure on a shared machine).
"""
import argparse
import json
import statistics
import time

import numpy as np

from common.dp_sgd import DPSGDEngine
from common.model import build_model, per_example_loss
from common.tf_setup import keras, tf, tf_privacy

# ---- settings ------------------------------------------------------------------------------
SIZES = {28: 1536, 64: 768}  # input side -> examples per epoch (fewer at 64: tf-privacy is slow)
BATCH = 64  # (expected) batch size
CLASSES = 10
LR = 0.05  # SGD learning rate for every method
CLIP, NOISE = 1.0, 1.0  # DP-SGD clipping norm C and noise multiplier sigma


def _data(side, n):
    rng = np.random.default_rng(side)
    return rng.normal(size=(n, side, side, 1)).astype(np.float32), rng.integers(0, CLASSES, n).astype(np.int32)


def _loop_epoch(step, x, y, rng, m):
    """Shuffled 64-batches of the first m examples through a compiled step; one loss fetch."""
    order = rng.permutation(m)
    loss = None
    for start in range(0, m - BATCH + 1, BATCH):
        idx = order[start:start + BATCH]
        loss = step(tf.constant(x[idx]), tf.constant(y[idx]))
    float(loss)


def make_methods(side, x, y):
    """name -> function(m) running one epoch over the first m examples (each owns its model)."""
    n = len(x)
    rng = np.random.default_rng(0)
    methods = {}

    plain = build_model((side, side, 1), CLASSES)
    plain_opt = keras.optimizers.legacy.SGD(LR)

    @tf.function
    def plain_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(yb, plain(xb, training=True)))
        plain_opt.apply_gradients(zip(tape.gradient(loss, plain.trainable_variables), plain.trainable_variables))
        return loss

    methods["plain"] = lambda m: _loop_epoch(plain_step, x, y, rng, m)

    fit_model = build_model((side, side, 1), CLASSES)
    fit_model.compile(keras.optimizers.legacy.SGD(LR), "sparse_categorical_crossentropy")
    methods["plain_fit"] = lambda m: fit_model.fit(x[:m], y[:m], batch_size=BATCH, epochs=1, verbose=0)

    for name, jit in (("engine", False), ("engine_xla", True)):
        engine = DPSGDEngine(build_model((side, side, 1), CLASSES), l2_norm_clip=CLIP,
                             noise_multiplier=NOISE, learning_rate=LR, jit_compile=jit)
        methods[name] = (lambda e: lambda m: e.train(x, y, sampling_rate=BATCH / n, steps=m // BATCH))(engine)

    dp_keras_model, dp_vectorized, _ = tf_privacy()
    dpseq = dp_keras_model.DPSequential(l2_norm_clip=CLIP, noise_multiplier=NOISE,
                                        layers=build_model((side, side, 1), CLASSES).layers)
    dpseq.compile(keras.optimizers.legacy.SGD(LR), "sparse_categorical_crossentropy")
    methods["dpsequential"] = lambda m: dpseq.fit(x[:m], y[:m], batch_size=BATCH, epochs=1, verbose=0)

    vec = build_model((side, side, 1), CLASSES)
    vec.compile(dp_vectorized.VectorizedDPKerasSGDOptimizer(
        l2_norm_clip=CLIP, noise_multiplier=NOISE, learning_rate=LR),
        keras.losses.SparseCategoricalCrossentropy(reduction=keras.losses.Reduction.NONE))
    methods["vectorized"] = lambda m: vec.fit(x[:m], y[:m], batch_size=BATCH, epochs=1, verbose=0)
    return methods


def run(reps):
    """{side: row of median wall seconds (`*_s`), median process CPU seconds (`*_cpu_s`), ratios}."""
    results = {}
    for side, n in SIZES.items():
        x, y = _data(side, n)
        methods = make_methods(side, x, y)
        for fn in methods.values():  # warm-up: tracing and compilation, on 4 batches
            fn(4 * BATCH)
        wall = {name: [] for name in methods}
        cpu = {name: [] for name in methods}
        for _ in range(reps):
            for name, fn in methods.items():
                w, c = time.perf_counter(), time.process_time()
                fn(n)
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
        row = {"n": n}
        for name in methods:
            row[f"{name}_s"] = statistics.median(wall[name])
            row[f"{name}_cpu_s"] = statistics.median(cpu[name])
        # The stricter baseline: the faster of the two plain variants.
        plain = "plain" if row["plain_s"] <= row["plain_fit_s"] else "plain_fit"
        row["plain_loop_s"], row["plain_loop_cpu_s"] = row["plain_s"], row["plain_cpu_s"]
        row["plain_s"], row["plain_cpu_s"] = row[f"{plain}_s"], row[f"{plain}_cpu_s"]
        for name in ("engine", "engine_xla", "dpsequential", "vectorized"):
            row[f"{name}_ratio"] = row[f"{name}_s"] / row["plain_s"]
            row[f"{name}_cpu_ratio"] = row[f"{name}_cpu_s"] / row["plain_cpu_s"]
        results[str(side)] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by input size")
    parser.add_argument("--reps", type=int, default=3, help="timed epochs per method (median reported)")
    args = parser.parse_args()
    results = run(args.reps)
    if args.json:
        print(json.dumps(results))
        return
    print(f"one epoch, batch {BATCH}, median of {args.reps}; ratio = time / plain "
          f"(plain = faster of tf.function loop and fit); cpu = process CPU time, steadier "
          f"than wall time when other jobs share the machine")
    print(f"{'size':>5} {'n':>5} {'method':<14} {'wall s':>8} {'ratio':>7} {'cpu s':>8} {'ratio':>7}")
    for side, row in results.items():
        for name in ("plain_loop", "plain_fit", "engine", "engine_xla", "dpsequential", "vectorized"):
            wall, cpu = row[f"{name}_s"], row[f"{name}_cpu_s"]
            print(f"{side:>5} {row['n']:>5} {name:<14} {wall:8.3f} {wall / row['plain_s']:7.2f} "
                  f"{cpu:8.3f} {cpu / row['plain_cpu_s']:7.2f}")


if __name__ == "__main__":
    main()
