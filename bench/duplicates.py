"""The README's blood-cell command on the folder as published and with exact duplicates injected.

The shared blood-cell folder had its exact duplicates removed when it was prepared; published
sets have a handful (issue 23: 26 duplicated files among 6,782 chest X-rays). This builds a
mirror of the folder (symlinks, nothing copied but the duplicates), adds `--copies` exact
byte-for-byte copies of random images under new names in their own class folder, and runs the
README's command (5 hospitals, Dirichlet 0.5, epsilon 3, 40 rounds, a fresh odometer) on both.
Printed per run: accuracy, balanced accuracy, duplicate sets found (from run.log), rejected
replies, and whether the audit passes with the odometer.

    uv run python -m bench.duplicates --copies 26 --work /tmp/hfl-dups
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOOD_CELLS = ROOT.parent / "shared" / "data" / "blood_cells"
README_COMMAND = ["--set", "data.source=folder", "--set", "hospitals=5", "--set", "data.partition=dirichlet",
                  "--set", "data.alpha=0.5", "--set", "privacy.max_epsilon=3", "--set", "rounds=40"]


def mirror_with_copies(out: Path, copies: int, seed: int) -> list[str]:
    """`out` as the blood-cell folder (symlinked) plus `copies` exact duplicates; their names."""
    files = sorted(BLOOD_CELLS.glob("*/*.jpg"))
    for file in files:
        link = out / file.parent.name / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(file)
    made = []
    for file in random.Random(seed).sample(files, copies):
        copy = out / file.parent.name / f"copy-of-{file.name}"
        shutil.copyfile(file, copy)
        made.append(str(copy.relative_to(out)))
    return made


def run(data: Path, work: Path, name: str) -> dict:
    run_dir, odometer = work / f"run-{name}", work / f"odometer-{name}"
    command = [sys.executable, "simulate.py", "--set", f"data.path={data}", *README_COMMAND,
               "--set", f"privacy.odometer_dir={odometer}", "--out", str(run_dir)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    log = (run_dir / "run.log").read_text() if (run_dir / "run.log").exists() else ""
    rejected = (run_dir / "rejected.jsonl").read_text().count("\n") if (run_dir / "rejected.jsonl").exists() else 0
    audit = subprocess.run([sys.executable, "-m", "server.audit", str(run_dir), "--odometer",
                            str(odometer / "simulation.jsonl")], cwd=ROOT, capture_output=True, text=True)
    notes = [line.strip() for line in (done.stdout + log).splitlines() if "identical" in line or "duplicate" in line]
    return {"run": name, "exit": done.returncode, "rounds": len(metrics), "accuracy": metrics[-1].get("accuracy"),
            "balanced_accuracy": metrics[-1].get("balanced_accuracy"), "rejected_replies": rejected,
            "audit_exit": audit.returncode, "duplicate_notes": sorted(set(notes))[:4]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.duplicates", description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=26, help="exact duplicates to inject (default 26)")
    parser.add_argument("--seed", type=int, default=0, help="which images are copied")
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for the data mirror and the runs")
    args = parser.parse_args()
    if not BLOOD_CELLS.is_dir():
        raise SystemExit(f"error: {BLOOD_CELLS} is absent; this benchmark needs ../shared/data/blood_cells")
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"error: {args.work} is not empty; give a new folder")
    mirror = args.work / "blood_cells_with_copies"
    copied = mirror_with_copies(mirror, args.copies, args.seed)
    print(f"injected {len(copied)} exact duplicates, e.g. {copied[:2]}", flush=True)
    for name, data in (("published", BLOOD_CELLS), ("with-duplicates", mirror)):
        print(json.dumps(run(data, args.work, name)), flush=True)


if __name__ == "__main__":
    main()
