"""Patient-level vs per-image DP-SGD step time on the same images (issue 24 item 3).

    uv run python -m bench.patient_dp             # readable table
    uv run python -m bench.patient_dp --json      # one JSON object
    uv run python -m bench.patient_dp --xla       # also both under XLA (fixed padded sizes)

The default config's network (common/config.py ModelConfig: GroupNorm, tanh, flatten) on
synthetic 32x32 grayscale images, n images held by patients of 2 to 4 images each. Both
engines draw 64 images per step in expectation: per-image q = 64/n; patient-level q =
(64 / mean images per patient) / P, so an epoch is n/64 steps either way. Warm-up first
(tracing is not timed); repetitions interleaved; medians of wall and process CPU seconds.
"""
import argparse
import json
import statistics
import time

import numpy as np

from common.config import ModelConfig
from common.dp_sgd import DPSGDEngine
from common.model import make_model

SIDE, N, BATCH, CLASSES = 32, 1536, 64, 2
CLIP, NOISE, LR = 1.0, 1.0, 0.05


def _data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(N, SIDE, SIDE, 1), dtype=np.uint8)
    y = rng.integers(0, CLASSES, N).astype(np.int32)
    sizes = []
    while sum(sizes) < N:  # patients of 2-4 images, the last one cut to fit
        sizes.append(int(rng.integers(2, 5)))
    sizes[-1] -= sum(sizes) - N
    units = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))  # a patient's images are not adjacent
    return x, y, units


def make_methods(x, y, units, xla):
    """name -> (function(steps) running that many steps, steps per epoch)."""
    patients = int(units.max()) + 1
    q_image = BATCH / N
    q_patient = (BATCH / (N / patients)) / patients  # the same expected images per step
    steps = N // BATCH
    methods = {}
    for jit in (False, True) if xla else (False,):
        suffix = "_xla" if jit else ""
        for name, q, u in (("per_image", q_image, None), ("patient", q_patient, units)):
            engine = DPSGDEngine(make_model(ModelConfig(), (SIDE, SIDE, 1), CLASSES), l2_norm_clip=CLIP,
                                 noise_multiplier=NOISE, learning_rate=LR, seed=0, jit_compile=jit)
            methods[name + suffix] = ((lambda e, q, u: lambda k: e.train(x, y, sampling_rate=q, steps=k, units=u))(
                engine, q, u), steps)
    return methods, patients, q_image, q_patient


def run(reps, xla):
    x, y, units = _data()
    methods, patients, q_image, q_patient = make_methods(x, y, units, xla)
    for fn, _ in methods.values():
        fn(4)  # warm-up: tracing (and XLA compilation)
    wall = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    for _ in range(reps):
        for name, (fn, steps) in methods.items():
            w, c = time.perf_counter(), time.process_time()
            fn(steps)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    out = {"images": N, "patients": patients, "side": SIDE, "expected_images_per_step": BATCH,
           "q_per_image": round(q_image, 5), "q_patient": round(q_patient, 5), "steps_per_epoch": N // BATCH}
    for name, (_, steps) in methods.items():
        epoch, epoch_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        out[name] = {"epoch_s": round(epoch, 3), "step_s": round(epoch / steps, 4),
                     "epoch_cpu_s": round(epoch_cpu, 3), "step_cpu_s": round(epoch_cpu / steps, 4)}
    for suffix in ("", "_xla") if xla else ("",):
        out["patient_over_per_image" + suffix] = round(out["patient" + suffix]["epoch_s"]
                                                       / out["per_image" + suffix]["epoch_s"], 3)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--reps", type=int, default=3, help="timed epochs per method (median reported)")
    parser.add_argument("--xla", action="store_true", help="also time both engines under XLA")
    args = parser.parse_args()
    result = run(args.reps, args.xla)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['images']} images {SIDE}x{SIDE} gray, {result['patients']} patients of 2-4 images, default "
          f"model config; {BATCH} expected images per step, {result['steps_per_epoch']} steps per epoch; "
          f"median of {args.reps}")
    print(f"{'method':<14} {'s/step':>8} {'s/epoch':>8} {'cpu s/step':>11} {'cpu s/epoch':>12}")
    for name in (k for k in result if isinstance(result[k], dict)):
        row = result[name]
        print(f"{name:<14} {row['step_s']:8.4f} {row['epoch_s']:8.3f} {row['step_cpu_s']:11.4f} {row['epoch_cpu_s']:12.3f}")
    for key in (k for k in result if k.startswith("patient_over")):
        print(f"{key}: {result[key]}")


if __name__ == "__main__":
    main()
