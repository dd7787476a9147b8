"""Test accuracy against epsilon for the embedded default (configs/default.yaml).

    uv run python -m bench.accuracy                      # targets 1 2 4 8 plus the default, table + plot
    uv run python -m bench.accuracy --json --targets 2 8 --plot /tmp/acc.png

For each epsilon target, bisection finds the noise multiplier sigma at which the default
run's final epsilon (rounds x steps_for(local_epochs, q) Poisson-sampled Gaussian steps,
q = sampling_rate_for(batch_size, n), PLD at the configured delta) lands at the target for
the hospital that spends the most. Everything else stays as in the default. Then the
simulation runs with that sigma, a budget a little above the target (so the budget never
stops a round) and a fresh odometer directory, and the final central test accuracy and the
largest epsilon in the run's ledger are recorded. The default itself (sigma 2.0) is one
more point. DP noise is drawn from OS entropy, so accuracy varies from run to run:
`--repeats` runs each point several times (mean, min and max reported).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"

# ---- settings ------------------------------------------------------------------------------
SIGMA_RANGE = (0.3, 200.0)  # bisection bracket for the noise multiplier
SIGMA_DECIMALS = 4  # sigma is passed on the command line rounded *up* to this many decimals
BUDGET_MARGIN = 1.25  # privacy.max_epsilon = target x this: above the target, never reached


def _final_epsilon(config, sizes: list[int], sigma: float) -> float:
    """The largest final epsilon over hospitals of `sizes` examples for a run at `sigma`."""
    from common.privacy import PrivacyEvent, epsilon, sampling_rate_for, steps_for

    worst = 0.0
    for n in sorted(set(sizes)):
        q = sampling_rate_for(config.train.batch_size, n)
        steps = config.rounds * steps_for(config.train.local_epochs, q)
        worst = max(worst, epsilon([PrivacyEvent(sigma, q, steps)], config.privacy.delta))
    return worst


def sigma_for(config, sizes: list[int], target: float, tolerance: float = 1e-3) -> float:
    """Smallest sigma (to SIGMA_DECIMALS, rounded up) whose final epsilon is at most `target`.

    Epsilon falls as sigma grows, so bisect in log sigma until the bracket is `tolerance`
    relative wide; the upper end keeps epsilon <= target.
    """
    lo, hi = SIGMA_RANGE
    if _final_epsilon(config, sizes, hi) > target:
        raise ValueError(f"epsilon target {target} needs sigma > {hi}")
    if _final_epsilon(config, sizes, lo) <= target:
        return lo
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        if _final_epsilon(config, sizes, mid) > target:
            lo = mid
        else:
            hi = mid
    scale = 10 ** SIGMA_DECIMALS
    return math.ceil(hi * scale) / scale


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def simulate(overrides: list[str], out: Path, log_path: Path) -> dict:
    """Run simulate.py on the default config with `overrides`; final accuracy and epsilon."""
    command = [sys.executable, str(ROOT / "simulate.py"), "--config", str(DEFAULT_CONFIG), "--out", str(out)]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        returncode = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"simulate.py {' '.join(overrides)} exited {returncode}; log {log_path}:\n{tail}")
    metrics = _jsonl(out / "metrics.jsonl")
    ledger = _jsonl(out / "privacy_ledger.jsonl")
    return {
        "rounds_done": len(metrics),
        "accuracy": metrics[-1]["accuracy"],
        "loss": metrics[-1]["loss"],
        "max_epsilon_reached": max(rec["epsilon"] for rec in ledger),
        "declined": sum(rec["status"] != "trained" for rec in ledger),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    def spread(ps):  # min..max over repeated runs, as error bars around the mean
        return [[p["accuracy"] - p["accuracy_min"] for p in ps], [p["accuracy_max"] - p["accuracy"] for p in ps]]

    targets = [p for p in points if p["target"] is not None]
    ax.errorbar([p["max_epsilon_reached"] for p in targets], [p["accuracy"] for p in targets],
                yerr=spread(targets), fmt="o-", capsize=3, label="sigma chosen for the target")
    for p in points:
        ax.annotate(f"σ={p['noise_multiplier']:g}", (p["max_epsilon_reached"], p["accuracy"]),
                    textcoords="offset points", xytext=(-12, 7) if p["target"] is None else (4, -12), fontsize=8)
    default = [p for p in points if p["target"] is None]
    ax.errorbar([p["max_epsilon_reached"] for p in default], [p["accuracy"] for p in default],
                yerr=spread(default), fmt="s", capsize=3, color="tab:red", label="embedded default")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon reached (delta 1e-5, max over hospitals)")
    ax.set_ylabel("final central test accuracy (mean, min-max)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--targets", type=float, nargs="+", default=[1, 2, 4, 8], help="epsilon targets")
    parser.add_argument("--plot", default=str(ROOT / "bench" / "results" / "accuracy_vs_epsilon.png"),
                        help="PNG to write (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per point (DP noise differs per run)")
    parser.add_argument("--keep", default=None, help="keep run directories and logs here (default: a temp dir)")
    args = parser.parse_args()

    from common.config import load_config
    from common.federation import build_federation

    config = load_config(DEFAULT_CONFIG)
    # The per-hospital training sizes, split exactly as the simulation splits them.
    sizes = [len(shard.train_y) for shard in build_federation(config).shards]
    plan = [(None, config.dp.noise_multiplier, [])]  # the embedded default, unchanged
    for target in args.targets:
        sigma = sigma_for(config, sizes, target)
        plan.append((target, sigma, [f"dp.noise_multiplier={sigma}",
                                     f"privacy.max_epsilon={target * BUDGET_MARGIN:g}"]))

    points = []
    with tempfile.TemporaryDirectory(prefix="bench-acc-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        total = len(plan) * args.repeats
        for index, (target, sigma, overrides) in enumerate(plan):
            runs = []
            for repeat in range(args.repeats):
                # A fresh odometer per run: a reused one would start from the last run's spend.
                name = ("default" if target is None else f"eps{target:g}") + f"-{repeat}"
                run_overrides = overrides + [f"privacy.odometer_dir={workdir / ('odometer-' + name)}"]
                if not args.json:
                    print(f"[{index * args.repeats + repeat + 1}/{total}] {name}: sigma {sigma} ...",
                          file=sys.stderr, flush=True)
                load = os.getloadavg()[0]
                result = simulate(run_overrides, workdir / f"run-{name}", workdir / f"simulate-{name}.log")
                runs.append(result | {"load_1min": round(load, 2)})
            accuracies = [r["accuracy"] for r in runs]
            points.append({"target": target, "noise_multiplier": sigma,
                           "predicted_epsilon": round(_final_epsilon(config, sizes, sigma), 4),
                           "max_epsilon_reached": max(r["max_epsilon_reached"] for r in runs),
                           "accuracy": sum(accuracies) / len(accuracies),
                           "accuracy_min": min(accuracies), "accuracy_max": max(accuracies),
                           "runs": runs})
            if args.keep:
                (workdir / "results.json").write_text(json.dumps(points, indent=1))
    plot(points, Path(args.plot), f"embedded default ({config.hospitals} hospitals, {config.data.source}, "
                                  f"{config.rounds} rounds): accuracy vs epsilon")

    summary = {"config": str(DEFAULT_CONFIG.relative_to(ROOT)), "delta": config.privacy.delta,
               "rounds": config.rounds, "hospitals": config.hospitals, "train_examples": sizes,
               "plot": args.plot, "points": points}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{config.hospitals} hospitals ({min(sizes)}-{max(sizes)} training examples each), {config.rounds} rounds, "
          f"batch {config.train.batch_size}, delta {config.privacy.delta:g}; {args.repeats} run(s) per point")
    print(f"{'target':>7} {'sigma':>8} {'eps pred':>9} {'eps ledger':>11} {'accuracy':>9}  {'each run':<24}")
    for p in points:
        target = "default" if p["target"] is None else f"{p['target']:g}"
        each = " ".join(f"{r['accuracy']:.3f}" for r in p["runs"])
        print(f"{target:>7} {p['noise_multiplier']:8.4f} {p['predicted_epsilon']:9.3f} "
              f"{p['max_epsilon_reached']:11.3f} {p['accuracy']:9.3f}  {each:<24}")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
