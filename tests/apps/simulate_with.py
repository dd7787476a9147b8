"""Test-only: `python -m tests.apps.simulate_with MODULE:ATTR [simulate.py arguments]`.

Runs simulate.py unchanged, except that the simulated hospitals load the ClientApp
MODULE:ATTR (a test-only app under tests/apps) instead of client.client_app:app.
"""
import importlib
import sys

import simulate

# The package re-exports a function of the same name, so fetch the module itself.
flower_simulation = importlib.import_module("flwr.simulation.run_simulation")

_real = flower_simulation._run_simulation


def _with_client_app(**kwargs):
    kwargs["client_app_attr"] = CLIENT_APP
    return _real(**kwargs)


if __name__ == "__main__":
    CLIENT_APP = sys.argv[1]
    flower_simulation._run_simulation = _with_client_app
    sys.exit(simulate.main(sys.argv[2:]))
