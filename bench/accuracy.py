"""Test accuracy against epsilon on real medical images: federated, centralized DP-SGD, non-private.

    uv run python -m bench.accuracy                          # blood, breast, retina at epsilon 1 2 3 8
    uv run python -m bench.accuracy --data breast --eps 3 --repeats 3 --json
    uv run python -m bench.accuracy --data blood --set rounds=40      # the README's blood-cell command

For each data set in ../shared/data (read its README; a missing folder is skipped with a
reason) and each epsilon:
- federated: 5 hospitals, `data.partition=dirichlet data.alpha=0.5`, `privacy.max_epsilon`,
  every other setting the default recipe, noise planned by each hospital
  (`dp.noise_multiplier: auto`). By default in one process (bench.recipe: the run's own
  engine, planner and example-weighted FedAvg); `--real` runs the real simulation
  (simulate.py through Flower, a fresh odometer per run, its ledger audited) instead, which
  adds Flower's start-up to every point.
- centralized: the same examples pooled into one DP-SGD run at the same epsilon, batch,
  epochs and rounds (bench.recipe, the run's own engine and planner);
- non-private: FedAvg on the same split without noise (clipped as the recipe clips; once per data set).
Scores are on the data set's central test split: accuracy, balanced accuracy, and AUC for a
binary task. DP noise comes from OS entropy, so `--repeats` runs each point several times
on the same split (seed 0: the split and the initial model are fixed, the DP noise is fresh every
run) and reports mean, min and max. Writes a PNG per data set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.recipe import DATA, FEDERATION, SOURCES, config_for, run

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REAL_SETS = ("blood", "breast", "retina")
SCORES = ("accuracy", "balanced_accuracy", "auc")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def federated(data: str, eps: float, repeat: int, workdir: Path, overrides: list[str]) -> dict:
    """One real simulation; its final central scores, the epsilons its ledger reached, the audit's verdict."""
    name = f"{data}-eps{eps:g}-run{repeat}"
    out, odometer = workdir / f"run-{name}", workdir / f"odometer-{name}"
    command = [sys.executable, str(ROOT / "simulate.py"), "--out", str(out)]
    for setting in SOURCES[data] + FEDERATION + overrides + [f"privacy.max_epsilon={eps}",
                                                             f"privacy.odometer_dir={odometer}"]:
        command += ["--set", setting]
    started = time.perf_counter()
    log = workdir / f"{name}.log"
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
    metrics, ledger = _jsonl(out / "metrics.jsonl"), _jsonl(out / "privacy_ledger.jsonl")
    if code not in (0, 1) or not metrics:
        raise RuntimeError(f"simulate.py for {name} exited {code}; see {log}")
    audit = subprocess.run([sys.executable, "-m", "server.audit", str(out)], cwd=ROOT, capture_output=True, text=True)
    final_eps = {}
    for record in ledger:
        final_eps[record["hospital"]] = record["epsilon"]
    return {"mode": "fed", **{k: metrics[-1][k] for k in SCORES if k in metrics[-1]},
            "rounds_done": len(metrics), "epsilon_min": min(final_eps.values()), "epsilon_max": max(final_eps.values()),
            "exit_code": code, "audit_exit_code": audit.returncode, "seconds": round(time.perf_counter() - started, 1)}


def point(results: list[dict]) -> dict:
    """Mean, min and max of each score over repeats."""
    out = {"runs": results}
    for key in SCORES + ("epsilon_min", "epsilon_max"):
        values = [r[key] for r in results if key in r]
        if values:
            out[key] = round(statistics.mean(values), 4)
            out[key + "_range"] = [round(min(values), 4), round(max(values), 4)]
    return out


def plot(data: str, table: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "balanced_accuracy"
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("fed", "o-"), ("central", "s--")):
        points = sorted((float(eps), p) for eps, p in table[mode].items())
        ax.errorbar([e for e, _ in points], [p[key] for _, p in points],
                    yerr=[[p[key] - p[key + "_range"][0] for _, p in points],
                          [p[key + "_range"][1] - p[key] for _, p in points]],
                    fmt=style, capsize=3, label={"fed": "federated, 5 hospitals (Dirichlet 0.5)",
                                                 "central": "centralized DP-SGD, same images"}[mode])
    ax.axhline(table["nonprivate"][key], color="grey", linestyle=":", label="non-private FedAvg")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 3, 8], ["1", "2", "3", "8"])
    ax.set_xlabel("epsilon (each hospital's budget, delta 1e-5)")
    ax.set_ylabel("balanced accuracy on the test split")
    ax.set_title(f"{data}: balanced accuracy against epsilon", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(SOURCES), action="append", help="default: the real sets")
    parser.add_argument("--eps", type=float, nargs="+", default=[1, 2, 3, 8])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the table as one JSON object")
    parser.add_argument("--real", action="store_true", help="federated points through simulate.py (Flower)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for every point, e.g. --set rounds=40 (repeatable)")
    parser.add_argument("--keep", default=None, help="keep run directories and logs here")
    parser.add_argument("--plot-dir", default=str(RESULTS), help="where the PNGs go (default: %(default)s)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (the shared real medical images)", file=sys.stderr)
        return
    summary = {"hospitals": 5, "partition": "dirichlet 0.5", "delta": 1e-5, "data": {}}
    with tempfile.TemporaryDirectory(prefix="bench-acc-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for data in args.data or REAL_SETS:
            table = {"fed": {}, "central": {}}
            for eps in args.eps:
                for mode in ("fed", "central"):
                    runs = []
                    for repeat in range(args.repeats):
                        if not args.json:
                            print(f"{data} epsilon {eps:g} {mode} run {repeat} ...", file=sys.stderr, flush=True)
                        if mode == "fed" and args.real:
                            runs.append(federated(data, eps, repeat, workdir, args.overrides))
                        else:
                            config = config_for(data, args.overrides + [f"privacy.max_epsilon={eps}"])
                            runs.append(run(config, mode))
                    table[mode][f"{eps:g}"] = point(runs)
            table["nonprivate"] = point([run(config_for(data, args.overrides), "nonprivate") for _ in range(args.repeats)])
            png = Path(args.plot_dir) / f"accuracy_{data}.png"
            plot(data, table, png)
            config = config_for(data, args.overrides)
            table["recipe"] = {"rounds": config.rounds, "batch_size": config.train.batch_size,
                               "local_epochs": config.train.local_epochs, "learning_rate": config.train.learning_rate,
                               "momentum": config.train.momentum, "model": vars(config.model),
                               "image_size": config.data.image_size, "color": config.data.color, "plot": str(png)}
            summary["data"][data] = table
            (workdir / "results.json").write_text(json.dumps(summary, indent=1))
            if not args.json:
                print_table(data, table)
    if args.json:
        print(json.dumps(summary))


def print_table(data: str, table: dict) -> None:
    def cell(p):
        text = f"{p['accuracy']:.3f} / {p['balanced_accuracy']:.3f}"
        return text + (f" / {p['auc']:.3f}" if "auc" in p else "")

    print(f"\n{data}: accuracy / balanced accuracy{' / AUC' if 'auc' in table['nonprivate'] else ''} "
          f"(non-private FedAvg: {cell(table['nonprivate'])})")
    print(f"{'epsilon':>7}  {'federated':<28} {'eps reached':<14} {'centralized DP-SGD':<28}")
    for eps, fed in table["fed"].items():
        reached = f"{fed['epsilon_min']:.2f}-{fed['epsilon_max']:.2f}" if "epsilon_min" in fed else "planned"
        print(f"{eps:>7}  {cell(fed):<28} {reached:<14} {cell(table['central'][eps]):<28}")


if __name__ == "__main__":
    main()
