"""Running the tests in parallel: `uv run pytest -n N --dist loadgroup` (pytest-xdist).

CI runs them one at a time: on 2 cores, 4 workers took longer than the serial suite (3711 s
against 3466 s) and their simulations hit their timeouts, because each test's real runs
already keep both cores busy. On a machine with more cores, parallel runs pay. A
module-scoped fixture (one real run that several tests read) must be built once, not once
per worker: every test that uses one is put in its module's group, and `--dist loadgroup`
sends a group to a single worker.
"""
import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        shared = [defs[-1] for defs in item._fixtureinfo.name2fixturedefs.values()  # ours, not pytest's own
                  if defs and defs[-1].scope != "function" and defs[-1].baseid]
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def pytest_configure(config):
    """Under xdist, pin each worker to one core (round robin): the runs a test starts inherit it,
    so a simulation sizes its Ray workers to one core (common/cpus.py) instead of every worker
    starting one Ray worker per core of the machine (each importing TensorFlow) at once."""
    import os

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
