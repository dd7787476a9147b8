"""Peak memory of a whole simulation at native X-ray-like sizes (224 and 256 px).

    uv run python -m bench.memory --json          # both cases; --case blood224 or ref256 for one

Two runs of simulate.py on the real blood-cell folder in ../shared/data (skipped with a reason
where it is absent), with the simulation's default workers (one Ray worker per core):
- blood224: 5 hospitals, Dirichlet 0.5, data.image_size=224, the default network and recipe.
- ref256: the brief's reference network (Conv2D 32/64/128 with max-pooling, Dense 64, one
  sigmoid output) on 256x256 grayscale images of a two-class task: two of the blood-cell
  classes (neutrophil, lymphocyte), linked into a temporary folder (nothing is copied).
Peak memory is the largest sum of RSS over simulate.py and every descendant, polled every
0.5 s (bench.simulation.TreeMemory). Each run is one full round (every hospital trains one local epoch).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.simulation import TreeMemory

ROOT = Path(__file__).resolve().parent.parent
BLOOD = ROOT.parent / "shared" / "data" / "blood_cells"
COMMON = ["hospitals=5", "data.partition=dirichlet", "data.alpha=0.5", "privacy.max_epsilon=3", "rounds=1"]
CASES = {
    "blood224": ["data.source=folder", "data.image_size=224", "data.color=rgb"],
    "ref256": ["data.source=folder", "data.image_size=256", "data.color=gray", "model.filters=[32,64,128]",
               "model.dense_units=64", "model.activation=relu", "model.normalization=none",
               # 1,200 images of two classes over 5 skewed hospitals: the smallest holds ~90
               "train.batch_size=64"],
}


def _binary_folder(workdir: Path) -> Path:
    root = workdir / "two-classes"
    for name in ("neutrophil", "lymphocyte"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(BLOOD / name, target_is_directory=True)
    return root


def run_case(name: str, workdir: Path) -> dict:
    path = BLOOD if name == "blood224" else _binary_folder(workdir)
    out = workdir / f"run-{name}"
    command = [sys.executable, str(ROOT / "simulate.py"), "--out", str(out)]
    for setting in COMMON + CASES[name] + [f"data.path={path}", f"privacy.odometer_dir={workdir / ('odo-' + name)}"]:
        command += ["--set", setting]
    log_path = workdir / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        with TreeMemory(proc.pid) as memory:
            returncode = proc.wait()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    audit = subprocess.run([sys.executable, "-m", "server.audit", str(out)], cwd=ROOT, capture_output=True, text=True)
    return {"case": name, "settings": COMMON + CASES[name], "exit_code": returncode,
            "rounds_done": len(metrics), "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(memory.peak_bytes / 2**20), "processes_at_peak": memory.peak_processes,
            "peak_breakdown_mb": {k: round(v / 2**20) for k, v in sorted(memory.peak_breakdown.items(), key=lambda i: -i[1])},
            "final": metrics[-1] if metrics else None, "audit_exit_code": audit.returncode,
            "log_tail": log_path.read_text().splitlines()[-6:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", default=None, help="keep run directories here")
    args = parser.parse_args()
    if not BLOOD.is_dir():
        print(f"skipped: {BLOOD} is absent (the shared real-image folder)", file=sys.stderr)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.case or list(CASES):
            results.append(run_case(name, workdir))
            if not args.json:
                r = results[-1]
                print(f"{name}: exit {r['exit_code']}, {r['rounds_done']} rounds, peak {r['peak_rss_mb']} MB "
                      f"over {r['processes_at_peak']} processes, {r['wall_s']} s, audit exit {r['audit_exit_code']}",
                      flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
