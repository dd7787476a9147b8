"""How noisy are the hospitals' scores under DP evaluation? Noisy against exact, per hospital.

    uv run python -m bench.eval_privacy --data breast retina blood --seeds 0 1 2

For each data set and seed: the default recipe trains a federated DP-SGD model (bench.recipe's
`fed` mode: 5 hospitals, Dirichlet 0.5 label skew, epsilon 3, 20 rounds: what a default run
trains), then every hospital's held-out split is scored exactly and, `--draws` times, through
the release a hospital makes (common/eval_privacy.py: per-class correct and missed counts with
Gaussian noise sigma, the scores computed from them) with sigma planned as a hospital plans it
for each cadence: its evaluation budget (default 3, delta 1e-5) over the evaluations of a
20-round run (final only: 1; every 10 rounds, the default: 2; every 5: 4; every round: 20).
The noise does not depend on the model's weights, only on the split's size, the class count
and sigma (and, for balanced accuracy, the class sizes); the model sets the exact scores.
Prints one JSON object per (data, seed, cadence) and a summary table: the root mean square
error of the released per-hospital accuracy and balanced accuracy against the exact ones, and
of the federated accuracy (all hospitals' counts summed); beside them, the binomial standard
error sqrt(a (1 - a) / n) that the held-out split's size alone gives the exact accuracy a.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np

CADENCES = {"final only": 0, "every 10 (default)": 10, "every 5": 5, "every round": 1}
ROUNDS = 20


def _sigma(evaluations: int, budget: float, delta: float, units: int) -> float | None:
    from common.eval_privacy import useful_eval_noise
    from common.privacy import plan_noise

    plan = plan_noise([], 1.0, 1, evaluations, budget, delta, max_noise=useful_eval_noise(units))
    return None if plan is None else plan.noise_multiplier


def measure(data: str, seed: int, draws: int, budget: float) -> list[dict]:
    from bench.recipe import config_for, run
    from common.config import evaluation_rounds
    from common.eval_privacy import add_noise, exact_counts, federated_scores, scores
    from common.federation import build_federation
    from common.metrics import predict

    config = config_for(data, [f"seed={seed}", "privacy.max_epsilon=3"])
    kept: list = []
    trained = run(config, "fed", keep=kept)
    model = kept[0]
    federation = build_federation(config)
    classes = max(2, federation.dataset.num_classes)
    hospitals = []
    for shard in federation.shards:
        if len(shard.eval_y) == 0:
            continue
        probabilities = predict(model, shard.eval_x)
        predicted = ((probabilities[:, 0] >= 0.5).astype(np.int64) if probabilities.shape[-1] == 1
                     else probabilities.argmax(axis=-1))
        correct, missed = exact_counts(shard.eval_y, predicted, classes)
        hospitals.append((shard.name, correct, missed, len(shard.eval_y), scores(correct, missed, len(shard.eval_y))))
    exact_federated = federated_scores([(c, m, n) for _, c, m, n, _ in hospitals])
    rng = np.random.default_rng()  # OS entropy, as a hospital's noise
    results = []
    for cadence, every in CADENCES.items():
        evaluations = len(evaluation_rounds(1, ROUNDS, every))
        per_hospital, federated_errors = [], []
        sigmas = {name: _sigma(evaluations, budget, config.privacy.delta, n) for name, _, _, n, _ in hospitals}
        noisy_all = {name: [] for name, *_ in hospitals}
        for _ in range(draws):
            released = []
            for name, correct, missed, n, exact in hospitals:
                if sigmas[name] is None:
                    continue
                c, m = add_noise(correct, sigmas[name], rng), add_noise(missed, sigmas[name], rng)
                noisy_all[name].append(scores(c, m, n))
                released.append((c, m, n))
            if released:
                federated_errors.append(federated_scores(released)["accuracy"] - exact_federated["accuracy"])
        for name, correct, missed, n, exact in hospitals:
            noisy = noisy_all[name]
            if not noisy:
                per_hospital.append({"hospital": name, "n": n, "declines": True})
                continue
            acc = np.array([s["accuracy"] for s in noisy]) - exact["accuracy"]
            bal = np.array([s.get("balanced_accuracy", math.nan) for s in noisy]) - exact["balanced_accuracy"]
            per_hospital.append({"hospital": name, "n": n, "sigma": sigmas[name],
                                 "exact_accuracy": round(exact["accuracy"], 4),
                                 "exact_balanced_accuracy": round(exact["balanced_accuracy"], 4),
                                 "accuracy_rmse": round(float(np.sqrt(np.mean(acc ** 2))), 4),
                                 "balanced_accuracy_rmse": round(float(np.sqrt(np.nanmean(bal ** 2))), 4),
                                 "accuracy_mean_error": round(float(acc.mean()), 4),
                                 # what the split's own size already costs: the binomial standard error
                                 "sampling_se": round(math.sqrt(exact["accuracy"] * (1 - exact["accuracy"]) / n), 4)})
        results.append({"data": data, "seed": seed, "cadence": cadence, "evaluations": evaluations,
                        "eval_budget": budget, "classes": classes, "central_test_accuracy": trained["accuracy"],
                        "exact_federated_accuracy": round(exact_federated["accuracy"], 4),
                        "federated_accuracy_rmse": round(float(np.sqrt(np.mean(np.square(federated_errors)))), 4),
                        "hospitals": per_hospital})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["breast", "retina", "blood"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=2000, help="noise draws per hospital and cadence")
    parser.add_argument("--eval-budget", type=float, default=3.0, help="each hospital's evaluation epsilon budget")
    args = parser.parse_args(argv)
    rows = []
    for data in args.data:
        for seed in args.seeds:
            for result in measure(data, seed, args.draws, args.eval_budget):
                print(json.dumps(result), flush=True)
                rows.append(result)
    print("\ndata    cadence              evals  sigma (range)  held-out n (range)  per-hospital accuracy RMSE "
          "(median, max)  balanced RMSE (median, max)  federated accuracy RMSE (mean)  split's own SE (median)")
    for data in args.data:
        for cadence in CADENCES:
            chosen = [r for r in rows if r["data"] == data and r["cadence"] == cadence]
            hs = [h for r in chosen for h in r["hospitals"] if not h.get("declines")]
            if not hs:
                continue
            acc = [h["accuracy_rmse"] for h in hs]
            bal = [h["balanced_accuracy_rmse"] for h in hs]
            print(f"{data:7} {cadence:20} {chosen[0]['evaluations']:5}  "
                  f"{min(h['sigma'] for h in hs):.3g}-{max(h['sigma'] for h in hs):.3g}  "
                  f"{min(h['n'] for h in hs)}-{max(h['n'] for h in hs):<14}  "
                  f"{np.median(acc):.3f}, {max(acc):.3f}{'':22}{np.median(bal):.3f}, {max(bal):.3f}{'':17}"
                  f"{np.mean([r['federated_accuracy_rmse'] for r in chosen]):.3f}{'':30}"
                  f"{np.median([h['sampling_se'] for h in hs]):.3f}")


if __name__ == "__main__":
    main()
