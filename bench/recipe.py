"""Recipe experiments: the same DP-SGD engine, partition and noise planning as a run, in one process.

    uv run python -m bench.recipe --data blood --size 32 --eps 3 --mode fed --lr 0.1 --momentum 0.9

No Flower and no Ray: the hospitals train one after another and their weights are averaged
(FedAvg weighted by examples), which is what the ServerApp does, so many recipe variants can
be compared in the time of a few simulations. Each hospital's noise comes from
common.privacy.plan_noise exactly as with `dp.noise_multiplier: auto`. `--mode central`
pools every hospital's training examples into one DP-SGD run at the same epsilon and the
same number of epochs; `--mode nonprivate` is FedAvg with neither clipping nor noise.
Prints one JSON object per run.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SOURCES = {
    "blood": ("folder", str(DATA / "blood_cells")),
    "breast": ("npz", str(DATA / "breastmnist.npz")),
    "retina": ("npz", str(DATA / "retinamnist.npz")),
    "digits": ("digits", ""),
}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(SOURCES), default="blood")
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--color", choices=("gray", "rgb"), default="gray")
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--mode", choices=("fed", "central", "nonprivate"), default="fed")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=1.0, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--filters", default="16,32,64")
    parser.add_argument("--dense", type=int, default=64)
    parser.add_argument("--act", default="tanh")
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.0)
    parser.add_argument("--ema", type=float, default=0.0, help="average of global models across rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--extra", default="", help="model options as JSON (recipe ingredients)")
    parser.add_argument("--grid", default="", help="JSON list of {option: value} variants, run in turn")
    return parser.parse_args(argv)


def run(args) -> dict:
    from common.config import load_config
    from common.dp_sgd import DPSGDEngine
    from common.federation import build_federation
    from common.metrics import evaluate_model
    from common.model import build_model
    from common.privacy import plan_noise, sampling_rate_for, steps_for
    from common.tf_setup import keras

    source, path = SOURCES[args.data]
    config = load_config(None, [f"data.source={source}", f"data.path={path}", f"hospitals={args.hospitals}",
                                "data.partition=dirichlet", f"data.alpha={args.alpha}", f"seed={args.seed}",
                                f"data.image_size={args.size}", f"train.batch_size={min(args.batch, 16)}",
                                f"data.color={args.color}"])
    federation = build_federation(config)
    shards = [(s.train_x, s.train_y) for s in federation.shards]
    if args.mode == "central":
        shards = [(np.concatenate([x for x, _ in shards]), np.concatenate([y for _, y in shards]))]
    keras.utils.set_random_seed(args.seed)
    extra = json.loads(args.extra) if args.extra else {}
    model = build_model(federation.dataset.input_shape, federation.dataset.num_classes,
                        [int(f) for f in args.filters.split(",")], args.dense, args.act, **extra)
    private = args.mode != "nonprivate"
    engine = DPSGDEngine(model, l2_norm_clip=args.clip if private else 1e9, noise_multiplier=0.0,
                         learning_rate=args.lr, momentum=args.momentum)
    plans = []
    for x, y in shards:
        q = sampling_rate_for(args.batch, len(y))
        steps = steps_for(args.epochs, q)
        plan = plan_noise([], q, steps, args.rounds, args.eps, args.delta) if private else None
        plans.append((q, steps, plan.noise_multiplier if plan else 0.0))
    weights = model.get_weights()
    velocity = [np.zeros_like(w) for w in weights]
    average = None
    sizes = np.array([len(y) for _, y in shards], dtype=np.float64)
    started = time.time()
    curve = []
    for round_number in range(1, args.rounds + 1):
        updates = []
        for (x, y), (q, steps, sigma) in zip(shards, plans):
            model.set_weights(weights)
            engine.reset_optimizer()
            engine.noise_multiplier = sigma
            engine.train(x, y, sampling_rate=q, steps=steps)
            updates.append(model.get_weights())
        mean = [sum(w * (n / sizes.sum()) for w, n in zip(ws, sizes)) for ws in zip(*updates)]
        # Server optimizer on the averaged update (post-processing: free).
        velocity = [args.server_momentum * v + (m - w) for v, m, w in zip(velocity, mean, weights)]
        weights = [w + args.server_lr * v for w, v in zip(weights, velocity)]
        if args.ema:
            average = weights if average is None else [args.ema * a + (1 - args.ema) * w for a, w in zip(average, weights)]
        if round_number % 5 == 0 or round_number == args.rounds:
            model.set_weights(average if args.ema else weights)
            scores = evaluate_model(model, federation.test_x, federation.test_y)
            curve.append(round(scores["accuracy"], 4))
    scores = evaluate_model(model, federation.test_x, federation.test_y)
    return {"args": {k: v for k, v in vars(args).items() if k != "repeats"}, "sizes": sizes.astype(int).tolist(),
            "sigmas": [round(p[2], 3) for p in plans], "steps_per_round": [p[1] for p in plans],
            "curve": curve, **{k: round(v, 4) for k, v in scores.items()}, "seconds": round(time.time() - started, 1)}


def main(argv=None):
    args = parse(argv)
    variants = json.loads(args.grid) if args.grid else [{}]
    for variant in variants:
        for repeat in range(args.repeats):
            one = argparse.Namespace(**(vars(args) | variant))
            one.seed = args.seed + repeat
            print(json.dumps(run(one)), flush=True)


if __name__ == "__main__":
    main()
