"""What a hospital's reply must look like before anything on the coordinator changes.

Pure checks, no state: `read_privacy` turns a training reply's privacy record into a
`PrivacyReport` or raises `Rejected` naming the first problem; `read_weights` does the same
for the update; `update_bound` is the largest distance from the global model an honest
DP-SGD round can move the weights. The strategy (server/strategy.py) adds the checks that
need memory of earlier replies (identity, declared examples, noise, recomputed epsilon).
A reason is built only from field names and numbers, never from text the hospital sent.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from common.config import HOSPITAL_NAME
from common.privacy import SAMPLING, PrivacyEvent
from common.sampling import sampling_rate_for, steps_for

STATUSES = ("trained", "budget_exhausted")
UNITS = ("image", "patient")  # what num-examples counts and each epsilon protects
NAME = HOSPITAL_NAME
MAX_PRIOR_EVENTS_CHARS = 1_000_000  # a hospital's history is a few hundred bytes per run
MAX_PRIOR_EVENTS = 10_000
EVENT_KEYS = {"noise_multiplier", "sampling_rate", "steps", "sampling"}
NOISE_TAIL = 1e-12  # probability, per round, that an honest update exceeds `update_bound`


class Rejected(Exception):
    """A reply that cannot be used; the message names the field and the problem."""


@dataclass(frozen=True)
class RoundPlan:
    """The public training settings the coordinator sent for a round."""

    batch_size: int | str  # or "auto": each hospital picks it from its own n (common.sampling)
    local_epochs: float
    learning_rate: float
    momentum: float
    l2_norm_clip: float


@dataclass(frozen=True)
class PrivacyReport:
    """A training reply's privacy record, checked field by field."""

    hospital: str
    status: str
    num_examples: int
    epsilon: float
    delta: float
    max_epsilon: float
    event: PrivacyEvent  # steps == 0 when declined
    can_train_again: bool
    epsilon_needed: float
    prior_events: tuple[PrivacyEvent, ...]
    unit: str = "image"

    def ledger_record(self, server_round: int, status: str | None = None, epsilon: float | None = None,
                      event: PrivacyEvent | None = None) -> dict:
        event = event or self.event
        return {
            "round": server_round, "hospital": self.hospital, "status": status or self.status,
            "noise_multiplier": event.noise_multiplier, "sampling_rate": event.sampling_rate,
            "steps": event.steps, "sampling": event.sampling,
            "epsilon": self.epsilon if epsilon is None else epsilon, "delta": self.delta,
            "max_epsilon": self.max_epsilon, "accountant": "pld", "num_examples": self.num_examples,
            "unit": self.unit,
        }


def _record(content, key: str) -> dict:
    try:
        record = content[key]
    except (KeyError, TypeError):
        raise Rejected(f"reply lacks its '{key}' record") from None
    try:
        return dict(record)
    except (TypeError, ValueError):
        raise Rejected(f"reply's '{key}' is not a record") from None


def _number(values: dict, key: str, low: float | None = None, high: float | None = None,
            low_ok: bool = True, high_ok: bool = True, infinity_ok: bool = False) -> float:
    if key not in values:
        raise Rejected(f"reply lacks '{key}'")
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"'{key}' must be a number")
    value = float(value)
    if not math.isfinite(value) and not (infinity_ok and value == math.inf):
        raise Rejected(f"'{key}' is not finite")
    if low is not None and (value < low or (value == low and not low_ok)):
        raise Rejected(f"'{key}' = {value:.6g} is below its range ({'>=' if low_ok else '>'} {low:g})")
    if high is not None and (value > high or (value == high and not high_ok)):
        raise Rejected(f"'{key}' = {value:.6g} is above its range ({'<=' if high_ok else '<'} {high:g})")
    return value


def _integer(values: dict, key: str, low: int) -> int:
    if key not in values:
        raise Rejected(f"reply lacks '{key}'")
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise Rejected(f"'{key}' must be an integer")
    if value < low:
        raise Rejected(f"'{key}' = {value} must be >= {low}")
    return value


def _text(values: dict, key: str, allowed: tuple[str, ...] | None = None) -> str:
    if key not in values:
        raise Rejected(f"reply lacks '{key}'")
    value = values[key]
    if not isinstance(value, str):
        raise Rejected(f"'{key}' must be text")
    if allowed is not None and value not in allowed:
        raise Rejected(f"'{key}' must be one of {' | '.join(allowed)}")
    return value


def parse_prior_events(text) -> tuple[PrivacyEvent, ...]:
    """The reply's `prior-events`: a JSON list of {noise_multiplier, sampling_rate, steps, sampling}."""
    if not isinstance(text, str):
        raise Rejected("'prior-events' must be JSON text")
    if len(text) > MAX_PRIOR_EVENTS_CHARS:
        raise Rejected(f"'prior-events' is longer than {MAX_PRIOR_EVENTS_CHARS} characters")
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):
        raise Rejected("'prior-events' is not valid JSON") from None
    if not isinstance(values, list) or len(values) > MAX_PRIOR_EVENTS:
        raise Rejected(f"'prior-events' must be a JSON list of at most {MAX_PRIOR_EVENTS} events")
    events = []
    for index, value in enumerate(values):
        if not isinstance(value, dict) or set(value) != EVENT_KEYS:
            raise Rejected(f"prior event {index} must have exactly the keys {', '.join(sorted(EVENT_KEYS))}")
        sigma = _number(value, "noise_multiplier", 0, low_ok=False)
        q = _number(value, "sampling_rate", 0, 1, low_ok=False)
        steps = _integer(value, "steps", 0)
        if value["sampling"] != SAMPLING:
            raise Rejected(f"prior event {index}: sampling must be '{SAMPLING}'")
        events.append(PrivacyEvent(sigma, q, steps))
    return tuple(events)


def hospital_name(privacy: dict) -> str:
    """The reply's hospital name, refused unless it is a plain name (it is printed and ledgered)."""
    hospital = _text(privacy, "hospital")
    if not NAME.fullmatch(hospital):
        raise Rejected("'hospital' must be 1-64 letters, digits, '.', '_' or '-'")
    return hospital


def read_privacy(content, plan: RoundPlan) -> PrivacyReport:
    """Every field the ledger needs, typed, finite, in range and consistent with `plan`."""
    metrics, privacy = _record(content, "metrics"), _record(content, "privacy")
    hospital = hospital_name(privacy)
    status = _text(privacy, "status", STATUSES)
    _text(privacy, "sampling", (SAMPLING,))
    _text(privacy, "accountant", ("pld",))
    unit = _text(privacy, "unit", UNITS)
    prior = parse_prior_events(privacy.get("prior-events"))
    num_examples = _integer(metrics, "num-examples", 1)
    delta = _number(metrics, "delta", 0, 1, low_ok=False, high_ok=False)
    max_epsilon = _number(metrics, "max-epsilon", 0, low_ok=False)
    epsilon = _number(metrics, "epsilon", 0)
    sigma = _number(metrics, "noise-multiplier", 0, low_ok=False)
    q = _number(metrics, "sampling-rate", 0, 1, low_ok=False)
    steps = _integer(metrics, "steps", 0)
    can_train_again = _integer(metrics, "can-train-again", 0)
    if can_train_again > 1:
        raise Rejected("'can-train-again' must be 0 or 1")
    # What one more round would cost in total: +inf is an honest answer (at a tiny sigma the
    # accountant gives no finite epsilon at this delta), and the value is only ever shown.
    epsilon_needed = _number(metrics, "epsilon-needed", 0, infinity_ok=True)

    expected_q = sampling_rate_for(plan.batch_size, num_examples)
    if not math.isclose(q, expected_q, rel_tol=1e-9):
        raise Rejected(f"'sampling-rate' {q:.6g} is not batch_size/num-examples = {expected_q:.6g}")
    expected_steps = steps_for(plan.local_epochs, expected_q) if status == "trained" else 0
    if steps != expected_steps:
        raise Rejected(f"'steps' = {steps}, but the round's settings give {expected_steps} for status {status}")
    if status == "trained" and epsilon > max_epsilon:
        raise Rejected(f"'epsilon' {epsilon:.6g} is over the hospital's own budget {max_epsilon:g}")
    return PrivacyReport(hospital, status, num_examples, epsilon, delta, max_epsilon,
                         PrivacyEvent(sigma, q, steps), bool(can_train_again), epsilon_needed, prior, unit)


def read_weights(content, reference: list[np.ndarray]) -> list[np.ndarray]:
    """The update's tensors: as many as the global model's, same shapes and dtypes, all finite."""
    try:
        record = content["arrays"]
    except (KeyError, TypeError):
        raise Rejected("a trained reply lacks its weights") from None
    try:
        arrays = record.to_numpy_ndarrays()
    except Exception:  # noqa: BLE001 - whatever a malformed record raises, it is unusable
        raise Rejected("the weights cannot be read as arrays") from None
    if len(arrays) != len(reference):
        raise Rejected(f"{len(arrays)} weight tensors instead of {len(reference)}")
    for index, (got, want) in enumerate(zip(arrays, reference)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise Rejected(f"tensor {index} is {got.dtype}{got.shape}, expected {want.dtype}{want.shape}")
        if not np.all(np.isfinite(got)):
            raise Rejected(f"tensor {index} has non-finite values")
    return arrays


def update_bound(plan: RoundPlan, noise_multiplier: float, sampling_rate: float, num_examples: int,
                 steps: int, num_parameters: int) -> float:
    """The farthest (L2) an honest DP-SGD round can move the global weights, but for 1e-12.

    One step of common/dp_sgd.py: g = (sum of clipped per-example gradients + z * sigma * C)
    / (q n), with z ~ N(0, I_d). The sum has norm <= |batch| * C <= n * C, so the first term
    is at most C / q; for the noise, ||z|| <= sqrt(d) + sqrt(2 ln(T / p)) with probability
    >= 1 - p over all T steps (Gaussian concentration of the norm, a 1-Lipschitz function,
    plus a union bound). Heavy-ball momentum keeps v_t = m v_{t-1} - lr g_t, so ||v_t|| <=
    lr * max ||g|| / (1 - m) (by induction, also when v_0 is the velocity a hospital carries
    over from its previous round, which obeyed the same bound), and T steps move the weights
    by at most T times that. Every
    term comes from public settings and the hospital's own (public) privacy record; the
    bound is generous (it assumes the whole data set lands in every batch) but catches
    updates that no honest round could produce, such as weights of 1e30.
    """
    clip, q, n = plan.l2_norm_clip, sampling_rate, num_examples
    noise_norm = math.sqrt(num_parameters) + math.sqrt(2 * math.log(max(steps, 1) / NOISE_TAIL))
    per_step = clip / q + noise_multiplier * clip * noise_norm / (q * n)
    return steps * plan.learning_rate * per_step / (1 - plan.momentum)


def distance(weights: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """L2 distance between two weight lists, summed in float64."""
    return math.sqrt(sum(float(np.sum((w.astype(np.float64) - r.astype(np.float64)) ** 2))
                         for w, r in zip(weights, reference)))
