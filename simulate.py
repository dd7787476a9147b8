"""Simulate N hospitals on one machine: the same ServerApp and ClientApp as a deployment.

    python simulate.py                                   # the embedded default (configs/default.yaml)
    python simulate.py --set dp.noise_multiplier=1.5 --set rounds=10 --out runs/sigma15
    python simulate.py --config configs/my.yaml
    python simulate.py --resume runs/run-20261124-101500

Runs Flower's public `flwr run` on a private local simulation SuperLink (server/simulation.py),
prints one line per round (accuracy, loss, each hospital's epsilon, the maximum, delta) and
writes a run directory; see README.md. `hospital-fl simulate` is the same command.
"""
import sys

from server.simulation import main

if __name__ == "__main__":
    sys.exit(main())
