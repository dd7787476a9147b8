"""DP-SGD accounting: the mechanism parameters of a run as plain data, and their epsilon.

A `PrivacyEvent` holds what accounting needs and nothing else: noise multiplier, Poisson
sampling rate per step, number of steps. A hospital's epsilon composes every event it has
ever run on its data set. The canonical composition (also documented for the ledger):
events with equal (noise_multiplier, sampling_rate, sampling) are merged by summing their
steps, and each group becomes SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps),
composed in order of first appearance. Composition is commutative, so merging changes
nothing mathematically and lets the PLD accountant self-compose by FFT in one go.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import threading
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from common.config import MIN_NOISE

# RDP's fractional orders near 1 often fail to converge for large q; dp-accounting then drops
# those orders and logs a warning per order. The remaining orders still give a valid bound.
logging.getLogger("absl").setLevel(logging.ERROR)

SAMPLING = "poisson"  # the only sampling the DP-SGD engine performs


@dataclass(frozen=True)
class PrivacyEvent:
    """`steps` DP-SGD steps with Poisson rate `sampling_rate` and Gaussian noise `noise_multiplier`."""

    noise_multiplier: float
    sampling_rate: float
    steps: int
    sampling: str = SAMPLING

    def __post_init__(self):
        if self.sampling != SAMPLING:
            raise ValueError(f"unsupported sampling {self.sampling!r}: only 'poisson' is accounted")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.noise_multiplier < 0 or self.steps < 0:
            raise ValueError(f"noise_multiplier and steps must be >= 0, got {self.noise_multiplier}, {self.steps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PrivacyEvent":
        return cls(
            noise_multiplier=float(values["noise_multiplier"]),
            sampling_rate=float(values["sampling_rate"]),
            steps=int(values["steps"]),
            sampling=str(values.get("sampling", SAMPLING)),
        )


def _groups(events: list[PrivacyEvent]) -> tuple[tuple[float, float, int], ...]:
    """((sigma, q, steps), ...): equal mechanisms merged, in order of first appearance."""
    groups: dict[tuple, int] = {}
    for event in events:
        if event.steps > 0:
            key = (event.noise_multiplier, event.sampling_rate)
            groups[key] = groups.get(key, 0) + event.steps
    return tuple((sigma, q, steps) for (sigma, q), steps in groups.items())


def _dp_event(groups) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for sigma, q, steps in groups
    ])


def dp_event(events: list[PrivacyEvent]) -> dp_accounting.DpEvent:
    """The canonical dp-accounting event for a list of DP-SGD runs (see the module docstring)."""
    return _dp_event(_groups(events))


@functools.lru_cache(maxsize=1024)
def _epsilon(groups, delta: float, accountant: str) -> float:
    # A hospital asks for the same history twice (its "one more round?" check is the next
    # round's charge), and hospitals of equal size share histories: building the PLD takes
    # ~0.5 s, so remember the answers.
    if not groups:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in groups):
        return math.inf
    return float(_ACCOUNTANTS[accountant]().compose(_dp_event(groups)).get_epsilon(delta))


def delta_refusal(name: str, delta: float, n: int) -> str | None:
    """Why `delta` cannot protect a hospital of `n` training examples, or None when it can.

    A delta of 1/n or more allows a mechanism that publishes one random example outright."""
    if delta >= 1.0 / n:
        return (f"{name}: delta {delta:g} is not below 1/n = {1.0 / n:.3g} for its {n} training examples "
                "(that would allow releasing one example outright): lower delta")
    return None


def epsilon(events: list[PrivacyEvent], delta: float, accountant: str = "pld") -> float:
    """Epsilon at `delta` of all `events` composed; 0 for no steps, inf for zero noise."""
    key = (_groups(events), float(delta), accountant)
    ahead = _ahead.pop(key, None)
    if ahead is not None:  # being computed by compute_ahead: the same figure, wait for it
        return ahead.result()
    return _epsilon(*key)


# Figures asked for ahead of time, computed one at a time by daemon threads (a process that
# ends never waits for a figure nobody asked for); epsilon() returns them (the same call,
# cached by _epsilon).
_ahead: dict[tuple, concurrent.futures.Future] = {}
_one_at_a_time = threading.Lock()


def compute_ahead(events: list[PrivacyEvent], delta: float, accountant: str = "pld") -> None:
    """Start computing `epsilon(events, delta)` in the background, for a figure needed soon.

    A hospital's reply waits for its "one more round?" check, and the coordinator for its
    check of each reply (a fresh PLD each, ~0.5 s); the next round's figures are known as
    soon as this round's are, so they are computed while both sides wait for each other."""
    key = (_groups(events), float(delta), accountant)
    if key in _ahead:
        return
    if len(_ahead) > 64:  # figures never asked for (a run that ended early): forget the finished ones
        for stale in [k for k, future in _ahead.items() if future.done()]:
            _ahead.pop(stale, None)
    future: concurrent.futures.Future = concurrent.futures.Future()

    def compute() -> None:
        with _one_at_a_time:
            try:
                future.set_result(_epsilon(*key))
            except BaseException as error:  # noqa: BLE001 - handed to whoever asks for the figure
                future.set_exception(error)

    _ahead[key] = future
    threading.Thread(target=compute, name="epsilon-ahead", daemon=True).start()


# ---------------------------------------------------------------------- planning the noise

MAX_NOISE = 50.0  # the bisection's upper end
# The lower end is common.config.MIN_NOISE, the smallest sigma any run may use: a plan never
# goes lower, so a huge budget is then underspent, which is the safe side.
# The search's upper end comes from RDP at integer orders only: a valid bound (any set of
# orders is), as tight as the default orders where plans land, and ~10x faster than the
# default's fractional orders at large q.
INTEGER_RDP_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 512, 1024)
# The plan's search runs on a PLD grid 10x coarser than the ledger's (1e-4): about 8x faster
# (0.03 s a call instead of 0.2-0.3 s), and within 1e-4 of the fine figure at the budgets
# we plan for. It only steers the search; the plan's sigma is accepted by the ledger's own
# accountant alone.
COARSE_PLD_INTERVAL = 1e-3
_ACCOUNTANTS = {  # "pld" is the ledger's; the others only steer plan_noise's search
    "pld": PLDAccountant,
    "rdp": RdpAccountant,
    "pld-coarse": lambda: PLDAccountant(value_discretization_interval=COARSE_PLD_INTERVAL),
    "rdp-integer": lambda: RdpAccountant(orders=INTEGER_RDP_ORDERS),
}


def useful_noise_limit(batch_size: int) -> float:
    """The largest sigma worth training with at an expected batch of `batch_size`.

    The noise on the averaged gradient has standard deviation sigma * C / batch per
    coordinate. Past half of C (sigma > batch / 2) a round moves the model by noise alone
    (the embedded default at epsilon 1 needs about batch / 6 and still learns a little), so a
    hospital whose budget left would need more declines instead of spending it for nothing,
    typically the crumbs of an earlier run. A heuristic, not a privacy figure: it only ever
    stops training.
    """
    return max(2.0, batch_size / 2)

_PLAN_TOLERANCE = 1e-3  # relative width at which the bisection on sigma stops


@dataclass(frozen=True)
class NoisePlan:
    """A hospital's noise multiplier for the rest of a run, chosen from its own facts."""

    noise_multiplier: float  # sigma, rounded up: with it the whole plan stays within the budget
    sampling_rate: float  # q = batch / n
    steps_per_round: int
    rounds: int  # rounds the plan pays for (the remaining planned rounds of the run)
    epsilon_before: float  # spend on this data before the plan (odometer)
    epsilon_after: float  # cumulative epsilon after taking part in every planned round (PLD)


def _plan_epsilon(prior, sigma, q, steps, delta, accountant="pld") -> float:
    return epsilon(list(prior) + [PrivacyEvent(sigma, q, steps)], delta, accountant)


def _calibrated(prior, q, steps, max_epsilon, delta, accountant, lo, hi) -> float:
    """The smallest sigma in [lo, hi] that keeps epsilon within budget, to `_PLAN_TOLERANCE`
    (dp_accounting.mechanism_calibration: Brent's method, then a check that the answer fits)."""
    return float(mechanism_calibration.calibrate_dp_mechanism(
        _ACCOUNTANTS[accountant], lambda sigma: dp_event(list(prior) + [PrivacyEvent(sigma, q, steps)]),
        max_epsilon, delta, mechanism_calibration.ExplicitBracketInterval(lo, hi), tol=lo * _PLAN_TOLERANCE))


def plan_noise(prior: list[PrivacyEvent], sampling_rate: float, steps_per_round: int, rounds: int,
               max_epsilon: float, delta: float, max_noise: float = MAX_NOISE) -> NoisePlan | None:
    """See `_plan_noise`; remembered, because the plan shown before round 1 is round 1's plan."""
    return _plan_noise(tuple(prior), float(sampling_rate), int(steps_per_round), int(rounds),
                       float(max_epsilon), float(delta), float(max_noise))


@functools.lru_cache(maxsize=256)
def _plan_noise(prior: tuple[PrivacyEvent, ...], sampling_rate: float, steps_per_round: int, rounds: int,
                max_epsilon: float, delta: float, max_noise: float) -> NoisePlan | None:
    """Smallest sigma with which `rounds` more rounds keep the cumulative epsilon within budget.

    The hospital assumes it takes part in every one of the `rounds` (the worst case when the
    coordinator samples hospitals), composes that with its earlier spend `prior`, and asks
    the same PLD accountant as the ledger. Epsilon falls as sigma grows, so dp-accounting's
    calibration finds it. RDP is always at least the PLD figure, so the sigma that RDP needs is
    a valid upper end and a cheap first guess; PLD on a coarse grid then narrows it down. The result
    is rounded up to 4 significant digits and must pass the ledger's own PLD accountant (it is
    raised until it does), so the plan never rests on the coarse grid or on a rounding in the
    hospital's disfavour. Never below MIN_NOISE. None when no sigma up to `max_noise`
    fits: the budget left cannot fund a useful round.
    """
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"plan_noise: rounds and steps must be >= 1, got {rounds}, {steps_per_round}")
    steps = rounds * steps_per_round
    spent = epsilon(prior, delta)

    def fits(sigma, accountant="pld"):
        return _plan_epsilon(prior, sigma, sampling_rate, steps, delta, accountant) <= max_epsilon

    def _plan(sigma):
        return NoisePlan(sigma, sampling_rate, steps_per_round, rounds, spent,
                         _plan_epsilon(prior, sigma, sampling_rate, steps, delta))

    if spent >= max_epsilon or not fits(max_noise):
        return None
    if fits(MIN_NOISE, "rdp-integer"):  # RDP never under-states: then PLD fits too
        return _plan(MIN_NOISE)
    # dp-accounting's calibration, twice: RDP (cheap, never under-states) gives a sigma that
    # surely fits; PLD on the coarse grid then narrows it down from there.
    hi = max_noise
    if fits(max_noise, "rdp-integer"):
        hi = _calibrated(prior, sampling_rate, steps, max_epsilon, delta, "rdp-integer", MIN_NOISE, max_noise)
    lo = max(MIN_NOISE, hi / 1.5)
    if fits(lo, "pld-coarse"):
        lo = MIN_NOISE
    if fits(lo, "pld-coarse"):
        hi = lo
    elif fits(hi, "pld-coarse"):
        hi = _calibrated(prior, sampling_rate, steps, max_epsilon, delta, "pld-coarse", lo, hi)
    sigma = _round_up(hi)
    while not fits(sigma):  # the ledger's accountant decides; the coarse grid only searched
        sigma = _round_up(sigma * (1 + _PLAN_TOLERANCE))
    return _plan(sigma)


def _round_up(value: float, digits: int = 4) -> float:
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale
