"""What one PLD accounting call costs (time and peak memory), at the settings a run allows and past them.

    uv run python -m bench.accounting --json

A hospital computes its charge with the ledger's PLD accountant before every round, and the
cost of that call grows with the epsilon it finds (the privacy-loss distribution widens).
The config and the hospital refuse a fixed noise multiplier below common.config.MIN_NOISE
and plans of more than MAX_PLANNED_EPOCHS passes, so that a coordinator cannot make that one
call exhaust the node; these rows are where those bounds come from. Each case runs in a fresh
process, so its peak resident memory is its own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = [  # (sigma, q, steps, what it is)
    (3.383, 0.13, 320, "a typical plan: a blood-cell hospital at epsilon 3, 40 rounds of 8 steps"),
    (0.5, 0.13, 320, "the smallest sigma allowed, same plan"),
    (0.5, 0.13, 8000, "the smallest sigma, 1,000 rounds"),
    (0.5, 1.0, 10_000, "the smallest sigma, q = 1, the most passes allowed"),
    (0.1, 0.13, 320, "below the floor: refused"),
    (0.5, 0.5, 100_000, "past the passes allowed: refused"),
]

_ONE = """
import json, resource, sys, time
from common.privacy import PrivacyEvent, epsilon
sigma, q, steps = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
started = time.perf_counter()
value = epsilon([PrivacyEvent(sigma, q, steps)], 1e-5)
print(json.dumps({"epsilon": value, "seconds": time.perf_counter() - started,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def measure(sigma: float, q: float, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _ONE, str(sigma), str(q), str(steps)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = []
    for sigma, q, steps, what in CASES:
        rows.append({"sigma": sigma, "q": q, "steps": steps, "case": what, **measure(sigma, q, steps)})
        if not args.json:
            row = rows[-1]
            print(f"sigma {sigma:<4} q {q:<5} steps {steps:>7}: epsilon {row['epsilon']:>10.1f} "
                  f"in {row['seconds']:6.1f} s, peak {row['peak_mb']:>6} MB  ({what})", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
