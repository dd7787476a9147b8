"""Tests run in parallel (pytest-xdist, `--dist loadgroup`, see pyproject's addopts).

Most of the suite's time is real simulations and deployments that wait on Flower, Ray and
process start-ups, so several run at once on 2 cores. A module-scoped fixture (one real
run that several tests read) must be built once, not once per worker: every test that uses
one is put in its module's group, and xdist sends a group to a single worker.
"""
import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        shared = [defs[-1] for defs in item._fixtureinfo.name2fixturedefs.values()  # ours, not pytest's own
                  if defs and defs[-1].scope != "function" and defs[-1].baseid]
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
