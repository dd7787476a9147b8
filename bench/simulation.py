"""Whole-simulation cost: wall time and peak memory of simulate.py for N hospitals.

    uv run python -m bench.simulation                    # N = 5, 10, 50 hospitals x 3 rounds, table
    uv run python -m bench.simulation --json             # one JSON object keyed by N
    uv run python -m bench.simulation --hospitals 5 10 --rounds 2

Every N runs the same settings on the same digits data (so more hospitals = smaller shards),
as a subprocess with a fresh odometer directory. Measured per run:
- wall: start of the subprocess to its exit (Python and TensorFlow imports, Ray start-up,
  every round, evaluation, accounting, saving);
- start-up: start of the subprocess to its first round line ("Round 1/N |"): everything a user
  waits through before the first result (Flower's SuperLink and simulation process, Ray,
  TensorFlow in every process, the first DP-SGD trace, round 1 itself);
- train: the sum of every hospital's own DP-SGD training seconds from its local train log;
- overhead = wall / train: what the federation costs on top of the training itself;
- peak memory: the largest sum of RSS over simulate.py and all its descendants (Ray's GCS,
  raylet, agents, workers), polled every POLL seconds. RSS counts shared pages (libraries,
  TensorFlow's code) once per process, so this overstates the physical memory used. The
  JSON also breaks the peak down by process (Ray workers, driver, Ray's helpers).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

# ---- settings ------------------------------------------------------------------------------
POLL = 0.5  # seconds between memory samples
# The same for every N. Batch 16 so that a 50-hospital shard (~26 training examples) still
# holds one expected batch; a budget nobody reaches so that every round trains; a smaller
# step than the default's 0.2, which diverges at batch 16 (noise per step grows as 1/batch);
# a fixed sigma: this measures cost, and planning noise for a budget of 1000 (sigma ~0.07)
# sent the PLD accountant into minutes and 13 GB. None of these changes how many steps run.
SETTINGS = ["train.batch_size=16", "train.learning_rate=0.05", "privacy.max_epsilon=1000",
            "dp.noise_multiplier=1.0"]


class TreeMemory:
    """Polls the summed RSS of a process and its descendants in a thread; keeps the maximum."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak_bytes = 0
        self.peak_processes = 0
        self.peak_breakdown: dict[str, int] = {}  # process label -> RSS bytes at the peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _label(proc: psutil.Process) -> str:
        """Ray names its workers (ray::...); Python helpers are told apart by their script."""
        name = proc.name()
        if name.startswith("python"):
            scripts = [arg for arg in proc.cmdline()[1:] if arg.endswith(".py")]
            return Path(scripts[0]).name if scripts else name
        return name

    def _sample(self) -> tuple[dict[str, int], int]:
        """(RSS bytes per process label, number of processes) over the tree now."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:  # the root has exited
            return {}, 0
        rss: dict[str, int] = {}
        for proc in procs:
            try:
                label = self._label(proc)
                rss[label] = rss.get(label, 0) + proc.memory_info().rss
            except psutil.Error:  # a worker exited between listing and reading
                pass
        return rss, len(procs)

    def _poll(self):
        while not self._stop.is_set():
            rss, count = self._sample()
            if sum(rss.values()) > self.peak_bytes:
                self.peak_bytes, self.peak_processes, self.peak_breakdown = sum(rss.values()), count, rss
            self._stop.wait(POLL)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(hospitals: int, rounds: int, workdir: Path) -> dict:
    """Run simulate.py once for `hospitals` x `rounds`; return its measurements."""
    out = workdir / f"run-{hospitals}"
    odometers = workdir / f"odometer-{hospitals}"  # fresh: odometers are never reset
    command = [sys.executable, str(ROOT / "simulate.py"), "--out", str(out),
               "--set", f"hospitals={hospitals}", "--set", f"rounds={rounds}",
               "--set", f"privacy.odometer_dir={odometers}"]
    for setting in SETTINGS:
        command += ["--set", setting]
    log_path = workdir / f"simulate-{hospitals}.log"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    first_round = None  # seconds from the command's start to its first round line
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with TreeMemory(proc.pid) as memory:
            for line in proc.stdout:
                log.write(line)
                if first_round is None and re.match(r"Round 1/\d+ \|", line):
                    first_round = time.perf_counter() - start
            returncode = proc.wait()
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    if returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"simulate.py with {hospitals} hospitals exited {returncode}; log {log_path}:\n{tail}")

    metrics = _jsonl(out / "metrics.jsonl")
    ledger = _jsonl(out / "privacy_ledger.jsonl")
    train_logs = [rec for path in sorted(odometers.glob("*.train-log.jsonl")) for rec in _jsonl(path)]
    train = sum(rec["seconds"] for rec in train_logs)
    round_seconds = [m.get("seconds", 0.0) for m in metrics]
    # Round 1 also pays for starting Ray's workers, importing TensorFlow in them and tracing
    # the DP-SGD step; later rounds show the steady cost.
    train_by_round = {}
    for rec in train_logs:
        train_by_round[rec["round"]] = train_by_round.get(rec["round"], 0.0) + rec["seconds"]
    later = [r for r in sorted(train_by_round) if r > 1]
    sizes = [rec["num_examples"] for rec in ledger if rec.get("round") == 1]
    return {
        "hospitals": hospitals,
        "rounds_done": len(metrics),
        "train_records": len(train_logs),  # hospitals x rounds when every round trained
        "examples_per_hospital": [min(sizes), max(sizes)] if sizes else None,
        "wall_s": round(wall, 2),
        "startup_s": round(first_round, 2) if first_round is not None else None,  # command start -> round 1 line
        "rounds_s": round(sum(round_seconds), 2),  # the rounds alone, as the coordinator timed them
        "train_s": round(train, 2),
        "round1_s": round(round_seconds[0], 2) if round_seconds else None,
        "round1_train_s": round(train_by_round.get(1, 0.0), 2),
        "later_round_s": round(sum(round_seconds[1:]) / len(round_seconds[1:]), 2) if len(round_seconds) > 1 else None,
        "later_round_train_s": round(sum(train_by_round[r] for r in later) / len(later), 2) if later else None,
        "overhead_ratio": round(wall / train, 2) if train else None,
        "peak_rss_mb": round(memory.peak_bytes / 2**20),
        "processes_at_peak": memory.peak_processes,
        "peak_breakdown_mb": {label: round(b / 2**20) for label, b in
                              sorted(memory.peak_breakdown.items(), key=lambda item: -item[1])},
        "final_accuracy": metrics[-1].get("accuracy") if metrics else None,
        "max_epsilon": max((rec["epsilon"] for rec in ledger), default=None),
        "load_1min": [round(load_before, 2), round(load_after, 2)],
    }


def print_table(results: dict, rounds: int) -> None:
    """The readable form of `results` (N -> run_one's measurements)."""
    print(f"digits, {rounds} rounds, {' '.join('--set ' + s for s in SETTINGS)}; "
          f"overhead = wall / sum of hospitals' training time; memory = peak summed RSS of the process tree")
    print("round 1 / later: coordinator's round seconds (hospitals' summed training seconds); later = mean of rounds 2+")
    print("start-up: seconds from the command's start to its first round line (Round 1/...)")
    print(f"{'N':>4} {'examples':>9} {'wall s':>8} {'start-up':>9} {'train s':>8} {'overhead':>9} {'round 1 s':>15} "
          f"{'later round s':>15} {'peak MB':>8} {'procs':>6} {'accuracy':>9} {'load':>11}")
    for row in results.values():
        sizes = row["examples_per_hospital"]
        first = f"{row['round1_s']:.1f} ({row['round1_train_s']:.1f})"
        later = f"{row['later_round_s']:.1f} ({row['later_round_train_s']:.1f})" if row["later_round_s"] is not None else "-"
        startup = f"{row['startup_s']:9.1f}" if row["startup_s"] is not None else f"{'-':>9}"
        print(f"{row['hospitals']:>4} {sizes[0]:>4}-{sizes[1]:<4} {row['wall_s']:8.1f} {startup} "
              f"{row['train_s']:8.1f} {row['overhead_ratio']:8.1f}x {first:>15} {later:>15} {row['peak_rss_mb']:8d} "
              f"{row['processes_at_peak']:6d} {row['final_accuracy']:9.3f} "
              f"{row['load_1min'][0]:5.1f}/{row['load_1min'][1]:<5.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by N")
    parser.add_argument("--hospitals", type=int, nargs="+", default=[5, 10, 50], help="values of N")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds per run")
    parser.add_argument("--keep", default=None, help="keep run directories and logs here (default: a temp dir)")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for n in args.hospitals:
            if not args.json:
                print(f"running {n} hospitals x {args.rounds} rounds ...", file=sys.stderr, flush=True)
            results[str(n)] = run_one(n, args.rounds, workdir)
        if args.keep:
            (workdir / "results.json").write_text(json.dumps(results, indent=1))

    if args.json:
        print(json.dumps(results))
        return
    print_table(results, args.rounds)

if __name__ == "__main__":
    main()
