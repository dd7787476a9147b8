"""Tests run in parallel (pytest-xdist, `--dist loadgroup`, see pyproject's addopts).

Most of the suite's time is real simulations and deployments that wait on Flower, Ray and
process start-ups, so several run at once on 2 cores. A module-scoped fixture (one real
run that several tests read) must be built once, not once per worker: every test that uses
one is put in its module's group, and xdist sends a group to a single worker. `-n 0` runs
everything in this one process, unpinned.
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
