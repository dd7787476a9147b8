"""What a hospital's evaluation reply must look like before the coordinator uses or ledgers it.

Pure checks, in the style of server/replies.py: `read_evaluation` turns an evaluation reply
into an `EvaluationReport` or raises `Rejected` naming the first problem. The strategy adds
what needs memory (the node's bound name, the run's noise and size, the epsilon recomputed
from the evaluation ledger). Reasons are built from field names and numbers only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from common.eval_privacy import MECHANISM, SENSITIVITY, query_event
from common.privacy import PrivacyEvent
from server.replies import (UNITS, Rejected, _integer, _number, _record, _text, hospital_name, parse_prior_events)

EVAL_STATUSES = ("evaluated", "declined")
MAX_CLASSES = 10_000


@dataclass(frozen=True)
class EvaluationReport:
    """One evaluation reply, checked field by field ("off": the hospital does not evaluate)."""

    hospital: str
    status: str  # evaluated | declined | off
    num_examples: int = 0  # held-out units: images, or patients
    unit: str = "image"
    epsilon: float = 0.0  # cumulative evaluation epsilon after this reply
    delta: float = 0.0
    max_epsilon: float = 0.0  # the hospital's own evaluation budget
    noise_multiplier: float = 0.0
    queries: int = 0  # 1 when evaluated, 0 when declined
    prior_events: tuple[PrivacyEvent, ...] = ()
    correct: tuple[float, ...] = ()  # noisy, per true class
    missed: tuple[float, ...] = ()

    @property
    def event(self) -> PrivacyEvent:
        return query_event(self.noise_multiplier, self.queries)

    def ledger_record(self, server_round: int) -> dict:
        return {"round": server_round, "hospital": self.hospital, "status": self.status, "mechanism": MECHANISM,
                "noise_multiplier": self.noise_multiplier, "queries": self.queries, "sensitivity": SENSITIVITY,
                "epsilon": self.epsilon, "delta": self.delta, "max_epsilon": self.max_epsilon, "accountant": "pld",
                "num_examples": self.num_examples, "unit": self.unit}


def _counts(metrics: dict, key: str, classes: int) -> tuple[float, ...]:
    values = metrics.get(key)
    if not isinstance(values, list) or len(values) != classes:
        raise Rejected(f"'{key}' must be a list of {classes} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise Rejected(f"'{key}' must hold finite numbers")
    return tuple(float(v) for v in values)


def read_evaluation(content, classes: int) -> EvaluationReport:
    """Every field the evaluation ledger and the scores need, typed, finite and in range.

    `classes`: the global model's number of classes (2 for a single sigmoid output)."""
    metrics, privacy = _record(content, "metrics"), _record(content, "privacy")
    hospital = hospital_name(privacy)
    status = _text(privacy, "status", EVAL_STATUSES + ("off",))
    if status == "off":
        return EvaluationReport(hospital, "off")
    _text(privacy, "mechanism", (MECHANISM,))
    _text(privacy, "accountant", ("pld",))
    unit = _text(privacy, "unit", UNITS)
    prior = parse_prior_events(privacy.get("prior-events"))
    num_examples = _integer(metrics, "num-examples", 1)
    delta = _number(metrics, "delta", 0, 1, low_ok=False, high_ok=False)
    max_epsilon = _number(metrics, "eval-max-epsilon", 0, low_ok=False)
    epsilon = _number(metrics, "evaluation-epsilon", 0)
    sigma = _number(metrics, "noise-multiplier", 0, low_ok=False)
    sensitivity = _number(metrics, "sensitivity", 0, low_ok=False)
    if sensitivity != SENSITIVITY:
        raise Rejected(f"'sensitivity' must be {SENSITIVITY:g}: the counts' noise is calibrated to it")
    queries = _integer(metrics, "queries", 0)
    if queries != (1 if status == "evaluated" else 0):
        raise Rejected(f"'queries' = {queries} for status {status}")
    reported_classes = _integer(metrics, "classes", 2)
    if reported_classes != classes or classes > MAX_CLASSES:
        raise Rejected(f"'classes' = {reported_classes}, but the model has {classes}")
    correct = missed = ()
    if status == "evaluated":
        correct, missed = _counts(metrics, "correct", classes), _counts(metrics, "missed", classes)
        if epsilon > max_epsilon:
            raise Rejected(f"'evaluation-epsilon' {epsilon:.6g} is over the hospital's own evaluation budget "
                           f"{max_epsilon:g}")
    elif "correct" in metrics or "missed" in metrics:
        raise Rejected("a declined evaluation carries counts")
    return EvaluationReport(hospital, status, num_examples, unit, epsilon, delta, max_epsilon, sigma, queries,
                            prior, correct, missed)
