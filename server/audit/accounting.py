"""Recomputing epsilon: dp_accounting's PLD and RDP accountants, with a cached fast path.

See the package docstring ("Speed") for why the fast path exists and how it is checked.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

PARALLEL_MIN_HISTORIES = 16   # below this, starting processes costs more than it saves

# Read the accountant's own defaults so "PLDAccountant() with default arguments" stays true.
_PLD_DEFAULTS = inspect.signature(PLDAccountant.__init__).parameters
PLD_DISCRETIZATION = _PLD_DEFAULTS["value_discretization_interval"].default
PLD_RELATION = _PLD_DEFAULTS["neighboring_relation"].default

# A group: ((noise_multiplier, sampling_rate, sampling), steps). A history: the tuple of a
# hospital's groups in order of first appearance; with delta it fully determines epsilon.
History = tuple

# --------------------------------------------------------------------------- accounting

@functools.lru_cache(maxsize=8)
def _subsampled_gaussian_pld(sigma: float, q: float):
    """The PLD PLDAccountant builds for PoissonSampled(q, Gaussian(sigma)): same call, same arguments."""
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=PLD_DISCRETIZATION,
        sampling_prob=q,
        neighboring_relation=PLD_RELATION,
    )


@functools.lru_cache(maxsize=256)
def _subsampled_gaussian_rdp(sigma: float, q: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at RdpAccountant's default orders."""
    return rdp_lib._compute_rdp_poisson_subsampled_gaussian(
        q=q, noise_multiplier=sigma, orders=np.array(rdp_lib.DEFAULT_RDP_ORDERS))


@functools.lru_cache(maxsize=4096)  # pure; repeated audits in one process reuse figures
def _pld_epsilon(history: History, delta: float) -> float:
    """PLDAccountant's figure for `history`, repeating its steps with the cached base PLD."""
    if not history:
        return 0.0
    if any(sigma == 0 for (sigma, _, _), _ in history):
        return math.inf  # PLDAccountant: a non-DP event makes epsilon infinite
    composed = pld_lib.identity(value_discretization_interval=PLD_DISCRETIZATION)
    for (sigma, q, _), steps in history:
        composed = composed.compose(_subsampled_gaussian_pld(float(sigma), float(q)).self_compose(steps))
    return float(composed.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(history: History, delta: float) -> float:
    """RdpAccountant's figure for `history`: the same sum of count * RDP, then compute_epsilon."""
    if not history:
        return 0.0
    if any(sigma == 0 for (sigma, _, _), _ in history):
        return math.inf
    rdp = np.zeros(len(rdp_lib.DEFAULT_RDP_ORDERS), dtype=np.float64)
    for (sigma, q, _), steps in history:
        rdp += steps * _subsampled_gaussian_rdp(float(sigma), float(q))
    return float(rdp_lib.compute_epsilon(np.array(rdp_lib.DEFAULT_RDP_ORDERS), rdp, delta)[0])


def _dp_event(history: History) -> dp_accounting.DpEvent:
    """The canonical dp_accounting event for a history."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(sigma))), steps)
        for (sigma, q, _), steps in history
    ])


@functools.lru_cache(maxsize=32)
def reference_epsilons(history: History, delta: float) -> tuple[float, float]:
    """(PLD, RDP) straight from PLDAccountant() and RdpAccountant(): the slow, plain definition."""
    if not history:
        return 0.0, 0.0
    event = _dp_event(history)
    return (float(PLDAccountant().compose(event).get_epsilon(delta)),
            float(RdpAccountant().compose(event).get_epsilon(delta)))


def _compute_chunk(jobs: list[tuple[History, float]], want_rdp: bool) -> list[tuple[float, float | None]]:
    """Epsilons for a list of (history, delta); runs in a worker process for large ledgers."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    return [(_pld_epsilon(h, d), _rdp_epsilon(h, d) if want_rdp else None) for h, d in jobs]


def _compute_all(jobs: list[tuple[History, float]], want_rdp: bool, workers: int) -> list:
    # Histories with the same settings next to each other: the base PLD cache holds a few
    # (sigma, q) only, and a ledger written round by round interleaves hospitals.
    order = sorted(range(len(jobs)), key=lambda i: (repr([key for key, _ in jobs[i][0]]), jobs[i][1],
                                                    [steps for _, steps in jobs[i][0]]))
    ordered = [jobs[i] for i in order]
    if workers <= 1 or len(jobs) < PARALLEL_MIN_HISTORIES:
        results = _compute_chunk(ordered, want_rdp)
    else:
        size = math.ceil(len(ordered) / workers)  # contiguous chunks: each base is built once
        chunks = [ordered[i:i + size] for i in range(0, len(ordered), size)]
        # Spawned, not forked: a process that has started TensorFlow's or Ray's threads (a test
        # run, a notebook) can deadlock a forked child on a lock some thread held at the fork.
        with ProcessPoolExecutor(max_workers=len(chunks), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = [r for part in pool.map(_compute_chunk, chunks, [want_rdp] * len(chunks)) for r in part]
    unsorted = [None] * len(jobs)
    for position, result in zip(order, results):
        unsorted[position] = result
    return unsorted


def _dp_accounting_version() -> str:
    try:
        return metadata.version("dp-accounting")
    except metadata.PackageNotFoundError:
        return "unknown version"
