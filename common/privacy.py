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

import functools
import logging
import math
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

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


def sampling_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson rate q giving an expected batch of `batch_size` out of `num_examples`."""
    return min(1.0, batch_size / num_examples)


def steps_for(local_epochs: float, sampling_rate: float) -> int:
    """DP-SGD steps for `local_epochs` expected passes over the data."""
    return max(1, math.ceil(local_epochs / sampling_rate))


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
    tracker = PLDAccountant() if accountant == "pld" else RdpAccountant()
    return float(tracker.compose(_dp_event(groups)).get_epsilon(delta))


def epsilon(events: list[PrivacyEvent], delta: float, accountant: str = "pld") -> float:
    """Epsilon at `delta` of all `events` composed; 0 for no steps, inf for zero noise."""
    return _epsilon(_groups(events), float(delta), accountant)
