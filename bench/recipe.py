"""DP-SGD recipes in one process: the run's own engine, partition and noise planning, no Flower.

    uv run python -m bench.recipe --data blood --mode fed --eps 3 --set train.learning_rate=0.1
    uv run python -m bench.recipe --data breast --grid '[["model.head=flatten"], ["model.head=avgpool"]]'

The hospitals train one after another and their weights are averaged (FedAvg weighted by
examples), which is what the ServerApp does, so recipe variants can be compared in the time
of a few simulations. Settings come from the same config schema as a run (the defaults of
common/config.py plus `--set` overrides). Each hospital's noise comes from
common.privacy.plan_noise, as with `dp.noise_multiplier: auto`. Modes:
- fed: 5 hospitals (data.partition dirichlet 0.5 unless overridden), each with its own plan;
- central: every hospital's training examples pooled into one DP-SGD run at the same
  epsilon, batch, epochs per round and rounds (so the same number of passes over the data);
- nonprivate: FedAvg without noise on the same split (gradients still clipped to C: without
  clipping the default step diverges, and clipping alone discloses nothing).
Prints one JSON object per run. bench.accuracy uses it for every column (its `--real` runs
the federated points through simulate.py instead).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SOURCES = {  # name -> the settings that select the data set (everything else is the default recipe)
    "blood": ["data.source=folder", f"data.path={DATA / 'blood_cells'}"],
    "breast": ["data.source=npz", f"data.path={DATA / 'breastmnist.npz'}"],
    "retina": ["data.source=npz", f"data.path={DATA / 'retinamnist.npz'}"],
    "digits": ["data.source=digits"],
}
FEDERATION = ["hospitals=5", "data.partition=dirichlet", "data.alpha=0.5"]


def run(config, mode: str, keep: list | None = None) -> dict:
    """Train `config`'s recipe in `mode` (fed | central | nonprivate); final central test scores.

    `keep`: a list the final model is appended to (bench/eval_privacy.py scores it on each
    hospital's held-out split)."""
    from common.dp_sgd import DPSGDEngine, scheduled_learning_rate
    from common.federation import build_federation
    from common.metrics import evaluate_model
    from common.model import make_model
    from common.privacy import plan_noise, useful_noise_limit
    from common.sampling import expected_batch_size, sampling_rate_for, steps_for
    from common.tf_setup import keras

    federation = build_federation(config)
    shards = [(s.train_x, s.train_y) for s in federation.shards]
    if mode == "central":
        shards = [(np.concatenate([x for x, _ in shards]), np.concatenate([y for _, y in shards]))]
    keras.utils.set_random_seed(config.seed)
    model = make_model(config.model, federation.dataset.input_shape, federation.dataset.num_classes)
    private = mode != "nonprivate"
    train = config.train
    engine = DPSGDEngine(model, l2_norm_clip=config.dp.l2_norm_clip, noise_multiplier=0.0,
                         learning_rate=train.learning_rate, momentum=train.momentum)
    plans, reached = [], []
    for _, y in shards:
        q = sampling_rate_for(train.batch_size, len(y))
        steps = steps_for(train.local_epochs, q)
        sigma = 0.0
        if private and config.dp.noise_multiplier == "auto":
            plan = plan_noise([], q, steps, config.rounds, config.privacy.max_epsilon, config.privacy.delta,
                              max_noise=useful_noise_limit(expected_batch_size(train.batch_size, len(y))))
            if plan is None:  # as in a run: this hospital declines every round
                plans.append((q, steps, None))
                continue
            sigma = plan.noise_multiplier
            reached.append(plan.epsilon_after)
        elif private:
            sigma = float(config.dp.noise_multiplier)
        plans.append((q, steps, sigma))
    weights = model.get_weights()
    sizes = np.array([len(y) for _, y in shards], dtype=np.float64)
    started = time.time()
    curve = []
    velocities = [None] * len(shards)  # each hospital's momentum carries over to its next round, as in a run
    for round_number in range(1, config.rounds + 1):
        updates = []
        for i, ((x, y), (q, steps, sigma)) in enumerate(zip(shards, plans)):
            if sigma is None:
                continue
            model.set_weights(weights)
            engine.set_velocity(velocities[i])
            engine.learning_rate = scheduled_learning_rate(train.learning_rate, train.lr_schedule, round_number,
                                                           config.rounds)
            engine.noise_multiplier = sigma
            engine.train(x, y, sampling_rate=q, steps=steps)
            velocities[i] = engine.velocity()
            updates.append(model.get_weights())
        trained = sizes[[p[2] is not None for p in plans]]
        weights = [sum(w * (n / trained.sum()) for w, n in zip(ws, trained)) for ws in zip(*updates)]
        if round_number % 5 == 0 or round_number == config.rounds:
            model.set_weights(weights)
            curve.append(round(evaluate_model(model, federation.test_x, federation.test_y)["accuracy"], 4))
    model.set_weights(weights)
    if keep is not None:
        keep.append(model)
    scores = evaluate_model(model, federation.test_x, federation.test_y)
    return {"mode": mode, "examples": sizes.astype(int).tolist(), "noise_multipliers": [None if p[2] is None else round(p[2], 4) for p in plans],
            "steps_per_round": [p[1] for p in plans], "accuracy_every_5_rounds": curve,
            **({"epsilon_min": min(reached), "epsilon_max": max(reached)} if reached else {}),
            **{k: round(v, 4) for k, v in scores.items()}, "seconds": round(time.time() - started, 1)}


def config_for(data: str, overrides: list[str], mode: str = "fed"):
    """The resolved config of a data set with the default recipe and `overrides` (as a run sees it)."""
    from common.config import load_config

    # The per-hospital batch check of the partition does not apply to a pooled run.
    return load_config(None, SOURCES[data] + FEDERATION + list(overrides))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(SOURCES), default="blood")
    parser.add_argument("--mode", choices=("fed", "central", "nonprivate"), default="fed")
    parser.add_argument("--eps", type=float, default=3.0, help="privacy.max_epsilon of every hospital")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--grid", default="", help='JSON list of lists of KEY=VALUE (with "mode=..." allowed)')
    parser.add_argument("--repeats", type=int, default=1, help="seeds 0..N-1 (the split and the initial model)")
    args = parser.parse_args(argv)
    variants = json.loads(args.grid) if args.grid else [[]]
    for variant in variants:
        mode = next((v.split("=", 1)[1] for v in variant if v.startswith("mode=")), args.mode)
        settings = [v for v in variant if not v.startswith("mode=")]
        for seed in range(args.repeats):
            overrides = [f"privacy.max_epsilon={args.eps}"] + args.overrides + settings + [f"seed={seed}"]
            result = run(config_for(args.data, overrides, mode), mode)
            print(json.dumps({"data": args.data, "settings": overrides} | result), flush=True)


if __name__ == "__main__":
    main()
