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

PARALLEL_MIN_HISTORIES = 200  # below this, starting processes (~3 s each) costs more than it saves
TAIL_MASS_TRUNCATION = 1e-15  # what each incremental composition may move to infinity (self_compose's default)

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


def _extends(previous: History | None, history: History) -> dict | None:
    """{group: added steps} when `history` is `previous` plus more steps or groups, else None.

    Histories keep their groups in order of first appearance, so a hospital's next record
    extends its last one: the same groups, each with at least as many steps, and maybe new ones."""
    if previous is None or len(history) < len(previous):
        return None
    added = {}
    for (key, steps), (old_key, old_steps) in zip(history, previous):
        if key != old_key or steps < old_steps:
            return None
        if steps > old_steps:
            added[key] = steps - old_steps
    added.update({key: steps for key, steps in history[len(previous):]})
    return added


@functools.lru_cache(maxsize=64)
def _group_pld(sigma: float, q: float, steps: int):
    """`steps` self-compositions of one subsampled-Gaussian step: a hospital's round, reused every round."""
    return _subsampled_gaussian_pld(sigma, q).self_compose(steps)


def _chain_epsilons(chain: list[tuple[History, float]], want_rdp: bool) -> list[tuple[float, float | None]]:
    """(PLD, RDP) for one hospital's histories in ledger order, composing each onto the one before.

    PLDAccountant self-composes every group from scratch (about 0.5 s a record on a long run);
    adding only the new round's steps to the PLD already composed costs one convolution. The
    figures differ from PLDAccountant's in the tenth digit (rounding and the 1e-15 tail
    truncation that each composition moves to infinity, on the pessimistic side); every audit
    checks its most complex history against PLDAccountant itself (`SELF_CHECK_REL_TOL`)."""
    results, composed, previous = [], None, None
    for history, delta in chain:
        if not history or any(sigma == 0 for (sigma, _, _), _ in history):
            pld = None  # 0 or inf: _pld_epsilon knows both without composing
        else:
            added = _extends(previous, history) if composed is not None else None
            pieces = added.items() if added is not None else history
            pld = composed if added is not None else None
            for (sigma, q, _), steps in pieces:
                piece = _group_pld(float(sigma), float(q), int(steps))
                pld = piece if pld is None else pld.compose(piece, tail_mass_truncation=TAIL_MASS_TRUNCATION)
            composed, previous = pld, history
        epsilon = _pld_epsilon(history, delta) if pld is None else float(pld.get_epsilon_for_delta(delta))
        results.append((epsilon, _rdp_epsilon(history, delta) if want_rdp else None))
    return results


def _compute_chunk(chains: list[list[tuple[History, float]]], want_rdp: bool) -> list[list[tuple[float, float | None]]]:
    """Epsilons for a list of chains; runs in a worker process for large ledgers."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    return [_chain_epsilons(chain, want_rdp) for chain in chains]


def compute_chains(chains: list[list[tuple[History, float]]], want_rdp: bool, workers: int) -> list[list]:
    """(PLD, RDP) for every (history, delta) of every chain (one chain per hospital, in ledger order)."""
    if workers <= 1 or sum(map(len, chains)) < PARALLEL_MIN_HISTORIES or len(chains) < 2:
        return _compute_chunk(chains, want_rdp)
    # Longest chains first, each to the least loaded worker: a chain cannot be split.
    order = sorted(range(len(chains)), key=lambda i: -sum(steps for h, _ in chains[i][-1:] for _, steps in h))
    parts: list[list[int]] = [[] for _ in range(min(workers, len(chains)))]
    loads = [0] * len(parts)
    for index in order:
        lightest = loads.index(min(loads))
        parts[lightest].append(index)
        loads[lightest] += len(chains[index])
    # Spawned, not forked: a process that has started TensorFlow's or Ray's threads (a test
    # run, a notebook) can deadlock a forked child on a lock some thread held at the fork.
    with ProcessPoolExecutor(max_workers=len(parts), mp_context=multiprocessing.get_context("spawn")) as pool:
        done = pool.map(_compute_chunk, [[chains[i] for i in part] for part in parts], [want_rdp] * len(parts))
        results: list = [None] * len(chains)
        for part, figures in zip(parts, done):
            for index, chain_figures in zip(part, figures):
                results[index] = chain_figures
    return results


def _dp_accounting_version() -> str:
    try:
        return metadata.version("dp-accounting")
    except metadata.PackageNotFoundError:
        return "unknown version"
