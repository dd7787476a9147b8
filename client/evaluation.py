"""A hospital's federated evaluation under DP: its evaluation budget, plan, charge and release.

common/eval_privacy.py states the mechanism (noisy per-class correct and missed counts,
sensitivity 1 per image or per patient) and its accounting. This module is the hospital's
side of it, in the order it happens:
1. the evaluation budget is the hospital's own: in deployment its node config's
   `eval-max-epsilon` (default: its `max-epsilon`, so no patient's epsilon exceeds the
   training budget), in simulation `privacy.eval_max_epsilon` (default `auto`: the same);
   no coordinator setting can raise it;
2. the evaluation odometer is a second PrivacyOdometer beside the training one
   (`<odometer>.eval.jsonl`, same lock, hash chain and head file), with that budget and the
   hospital's delta; every charge names the held-out split's fingerprint;
3. the noise is planned once per run, at the first evaluation the hospital answers: the
   smallest sigma with which every remaining planned evaluation (the coordinator sends how
   many) keeps the evaluation epsilon, earlier runs included, within the evaluation budget
   (common.privacy.plan_noise with q = 1 and one "step" per evaluation; rounded up and
   accepted by the ledger's PLD accountant); later evaluations of the run reuse that sigma;
4. each evaluation is charged (read, check, write and fsync under the lock) before the noisy
   counts exist; one that would pass the budget is declined: nothing is released, the
   reply says "declined" and the hospital's log says why in one line.
Nothing here imports Flower.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.odometer import BudgetError, PrivacyOdometer, example_hashes, fingerprint
from common.eval_privacy import (MAX_PLANNED_EVALUATIONS, MECHANISM, SENSITIVITY, add_noise, exact_counts,
                                 query_event, useful_eval_noise)
from common.errors import UserError
from common.privacy import delta_refusal, plan_noise

log = logging.getLogger("hospital")
EVAL_ODOMETER_SUFFIX = ".eval.jsonl"
NODE_KEY = "eval-max-epsilon"


class EvaluationSettingsError(UserError):
    """The coordinator's evaluation request is unusable: refused before any charge."""

    category = "settings"


def evaluation_odometer_path(training_odometer: str | Path) -> Path:
    """`<odometer>.eval.jsonl` beside the training odometer (`simulation.jsonl` -> `simulation.eval.jsonl`)."""
    return Path(training_odometer).absolute().with_suffix(EVAL_ODOMETER_SUFFIX)


def node_eval_budget(node_config: dict, max_epsilon: float) -> float:
    """The node config's `eval-max-epsilon` (a finite number > 0), or its training `max-epsilon` when absent."""
    if NODE_KEY not in node_config:
        return float(max_epsilon)
    try:
        value = float(node_config[NODE_KEY])
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise BudgetError(f"node config {NODE_KEY}={str(node_config[NODE_KEY])[:40]!r} must be a finite number > 0")
    return value


def config_eval_budget(value: float | str, max_epsilon: float) -> float:
    """A simulation's `privacy.eval_max_epsilon`: a number, or "auto" for `privacy.max_epsilon`."""
    return float(max_epsilon) if value == "auto" else float(value)


@dataclass(frozen=True)
class EvaluationRequest:
    """What the coordinator asks with an evaluation (public)."""

    server_round: int
    planned_evaluations: int  # evaluations the coordinator still plans this run, this one included

    @classmethod
    def from_config(cls, round_config: dict) -> "EvaluationRequest":
        values = {}
        for key in ("server-round", "planned-evaluations"):
            value = round_config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvaluationSettingsError(f"evaluation setting {key}={value!r} is missing or not an integer >= 1")
            values[key] = value
        if values["planned-evaluations"] > MAX_PLANNED_EVALUATIONS:
            raise EvaluationSettingsError(f"the coordinator plans {values['planned-evaluations']} evaluations, more "
                                          f"than the {MAX_PLANNED_EVALUATIONS} a run may account for")
        return cls(values["server-round"], values["planned-evaluations"])


def evaluation_odometer(site, budget: float, simulation_source: tuple[str, str] | None = None) -> PrivacyOdometer:
    """The hospital's evaluation odometer, read afresh (another process may have charged it since).

    In simulation (`simulation_source`: client.shards.source_identity of the data) every simulated hospital shares one file, as for
    training, and each counts every charge on a held-out split that shared an image with its
    own (client/shards.py, in `<odometer_dir>/evaluation/shards/`)."""
    path = evaluation_odometer_path(site.odometer.path)
    hashes = example_hashes(site.eval_x, site.eval_y)
    shard_filter, extra = None, {}
    if simulation_source is not None:
        from client.shards import ShardRegistry  # simulation only

        registry = ShardRegistry(path.parent / "evaluation")
        shard = registry.register(hashes, source=simulation_source,
                                  form=f"{site.eval_x.dtype.str}{tuple(site.eval_x.shape[1:])}")
        shard_filter, extra = registry.overlap_filter(shard), {"shard": shard}
    return PrivacyOdometer(path, site.name, budget, site.odometer.delta, data_fingerprint=fingerprint(hashes),
                           shard_filter=shard_filter, extra=extra | {"kind": "evaluation"})


def eval_num_units(site) -> int:
    """n of the evaluation: held-out patients when the data names them, else images."""
    return len(site.eval_y) if site.eval_units is None else len(np.unique(site.eval_units))


def planned_sigma(odometer: PrivacyOdometer, run_id: int, planned: int, num_units: int) -> float | None:
    """This run's evaluation noise: the one already charged this run, or a new plan; None when unaffordable."""
    this_run = [r for r in odometer.own_records(run_id) if int(r.get("steps", 0)) > 0]
    if this_run:
        return float(this_run[0]["noise_multiplier"])
    plan = plan_noise(odometer.prior_events(run_id), 1.0, 1, planned, odometer.max_epsilon, odometer.delta,
                      max_noise=useful_eval_noise(num_units))
    return None if plan is None else plan.noise_multiplier


def release(site, predictions: np.ndarray, run_id: int, request: EvaluationRequest, budget: float,
            simulation_source: tuple[str, str] | None = None) -> tuple[dict, dict]:
    """Charge one evaluation and return (metrics, privacy): the noisy counts, or a declined reply.

    `predictions` are the model's class predictions on `site.eval_x`; they stay here."""
    num_units = eval_num_units(site)
    refusal = delta_refusal(f"{site.name} (evaluation)", site.odometer.delta, num_units)
    if refusal:
        raise BudgetError(refusal)
    odometer = evaluation_odometer(site, budget, simulation_source)
    classes = max(2, int(site.num_classes))
    correct, missed = exact_counts(site.eval_y, predictions, classes, site.eval_units)
    sigma = planned_sigma(odometer, run_id, request.planned_evaluations, num_units)
    metrics = {"num-examples": num_units, "delta": odometer.delta, "eval-max-epsilon": odometer.max_epsilon,
               "classes": classes, "sensitivity": SENSITIVITY}
    privacy = {"hospital": site.name, "mechanism": MECHANISM, "accountant": "pld", "unit": site.eval_unit}
    if sigma is None:
        spent = odometer.spent()
        log.info("%s declines evaluation in round %d: its evaluation budget left (epsilon %.3f spent of %.3f) cannot "
                 "fund %d more evaluation(s) at a useful noise (sigma <= %g)", site.name, request.server_round, spent,
                 odometer.max_epsilon, request.planned_evaluations, useful_eval_noise(num_units))
        return _declined(metrics, privacy, odometer, run_id, useful_eval_noise(num_units), spent)
    reservation = odometer.reserve(query_event(sigma), run_id, request.server_round)  # on disk before any release
    if not reservation.charged:
        log.info("%s declines evaluation in round %d: its evaluation epsilon would reach %.3f > evaluation budget "
                 "%.3f", site.name, request.server_round, reservation.epsilon_after, odometer.max_epsilon)
        return _declined(metrics, privacy, odometer, run_id, sigma, reservation.spent)
    noisy_correct, noisy_missed = add_noise(correct, sigma), add_noise(missed, sigma)
    metrics |= {"evaluation-epsilon": reservation.epsilon_after, "noise-multiplier": sigma, "queries": 1,
                "correct": [float(v) for v in noisy_correct], "missed": [float(v) for v in noisy_missed]}
    privacy |= {"status": "evaluated", "prior-events": json.dumps([e.to_dict() for e in reservation.prior])}
    return metrics, privacy


def _declined(metrics: dict, privacy: dict, odometer: PrivacyOdometer, run_id: int, sigma: float,
              spent: float) -> tuple[dict, dict]:
    metrics |= {"evaluation-epsilon": spent, "noise-multiplier": float(sigma), "queries": 0}
    privacy |= {"status": "declined",
                "prior-events": json.dumps([e.to_dict() for e in odometer.prior_events(run_id)])}
    return metrics, privacy
