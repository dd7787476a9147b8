"""What a hospital does with one message's content: plain data in, plain data out.

Each function takes what the coordinator's message carries (its config record as a dict,
the weights as numpy arrays), the hospital's node config, the run config and the run id
of the coordinator, and returns plain dicts and arrays. No Flower Messages here:
client/client_app.py unpacks and packs them. The same functions run in the simulation's
workers (imported on the first message) and, in deployment, inside the hospital's own
long-lived process (client/hospital_process.py), so TensorFlow, the data and the compiled
DP-SGD step are loaded once per hospital rather than once per message.

Errors are raised, never returned: the caller replies with the error's category only.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from client.odometer import PrivacyOdometer
from client.task import (HospitalSite, SettingsError, TrainSettings, deployment_site, evaluate_round, plan_summary,
                         simulation_site, train_round)
from common.config import Config, from_run_config

log = logging.getLogger("hospital")

# Keep a deployed hospital's loaded site (data, split) between messages. Set by the hospital
# process, which lives across messages; elsewhere every message reads the data afresh.
KEEP_SITES = False
_SITES: dict[str, HospitalSite] = {}


def site(node_config: dict, run_config: dict) -> tuple[Config, HospitalSite]:
    """The run's config and the hospital: its own node config in deployment, a shard in simulation."""
    config = from_run_config(run_config, int(node_config.get("num-partitions", 0)))
    if "hospital-id" not in node_config:
        return config, simulation_site(config, int(node_config["partition-id"]))
    if not KEEP_SITES:
        return config, deployment_site(node_config, config)
    # What deployment_site reads from the run config: how images are prepared and the model builder.
    key = json.dumps([node_config, dataclasses.asdict(config.data), config.model.builder], sort_keys=True, default=str)
    kept = _SITES.get(key)
    if kept is None:
        if len(_SITES) >= 4:  # bounded: each entry holds a hospital's images
            _SITES.clear()
        kept = _SITES[key] = deployment_site(node_config, config)
    # The odometer is read afresh for every message (another run may have charged it meanwhile).
    old = kept.odometer
    odometer = PrivacyOdometer(old.path, old.hospital, old.max_epsilon, old.delta, data_fingerprint=old.data_fingerprint)
    return config, dataclasses.replace(kept, odometer=odometer)


def coordinator_run(round_config: dict, flower_run_id: int) -> int:
    """The run the charges belong to: the coordinator's run, which outlives a resume.

    A resumed run is a new Flower run; keyed by Flower's run id, a hospital would plan its
    noise afresh mid-run. Whatever number a coordinator sends, every charge is still checked
    against everything in the odometer.
    """
    value = round_config.get("coordinator-run", flower_run_id)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError("the coordinator's run id is not an integer")
    return value


def settings(round_config: dict) -> TrainSettings:
    missing = [name for name in TrainSettings.__dataclass_fields__ if name not in round_config]
    if missing:
        raise SettingsError(f"the coordinator's training settings lack {', '.join(missing)}")
    return TrainSettings(**{name: round_config[name] for name in TrainSettings.__dataclass_fields__})


def plan(node_config: dict, run_config: dict, round_config: dict, run_id: int) -> dict:
    """Before round 1: the hospital's privacy plan for this run (public numbers only)."""
    _, hospital = site(node_config, run_config)
    return {"hospital": hospital.name, **plan_summary(hospital, settings(round_config), run_id)}


def train(node_config: dict, run_config: dict, round_config: dict, weights: list[np.ndarray], run_id: int,
          velocity: list[np.ndarray] | None, declined_run: int | None, deadline: float | None = None) -> dict:
    """Train the received global model on this hospital's data with DP-SGD, within its budget.

    `velocity` is the hospital's momentum from its previous round of this run and
    `declined_run` the run it last declined in (both kept in the node's own Flower state,
    never sent); `deadline` the time the coordinator stops waiting for this reply (the
    message's creation time plus its time to live). Returns the reply's "arrays" (None when declined), "metrics" and "privacy",
    and the state to keep: "velocity" (None: unchanged) and "declined-run" (None: unchanged).
    """
    config, hospital = site(node_config, run_config)
    train_settings = settings(round_config)
    round_number = int(round_config["server-round"])
    # A hospital that declined once in a run declines for the rest of it, as its plan said:
    # re-planned for fewer rounds, crumbs of budget would buy a round of near-pure noise.
    outcome = train_round(hospital, config, train_settings, weights, run_id, round_number, velocity,
                          declined_before=declined_run == run_id, deadline=deadline)
    budget = hospital.odometer.max_epsilon
    # The hospital's own log only (its SuperNode's terminal and <odometer>.errors.log): never sent.
    spend = (f"hospital {hospital.name} round {round_number}: epsilon {outcome.epsilon:.3f} of {budget:.3f} spent, "
             f"{max(budget - outcome.epsilon, 0.0):.3f} left" + ("" if outcome.status == "trained" else " (declined)"))
    log.info("%s", spend.removeprefix("hospital "))
    from client.client_app import _error_log  # the same local file as the error details

    _error_log(node_config, spend)

    # Only the DP weights, the privacy record (public parameters) and the example count leave.
    metrics = {
        "num-examples": outcome.num_examples,
        "epsilon": outcome.epsilon,
        "delta": hospital.odometer.delta,
        "max-epsilon": budget,
        "noise-multiplier": outcome.event.noise_multiplier,
        "sampling-rate": outcome.event.sampling_rate,
        "steps": outcome.event.steps,
        "budget-exhausted": int(outcome.status == "budget_exhausted"),
        "can-train-again": int(outcome.can_train_again),
        "epsilon-needed": outcome.epsilon_needed,
    }
    privacy = {
        "hospital": hospital.name,
        "status": outcome.status,
        "sampling": outcome.event.sampling,
        "accountant": "pld",
        "unit": hospital.unit,  # what num-examples counts and each epsilon protects: "image" or "patient"
        "prior-events": json.dumps([event.to_dict() for event in outcome.prior_events]),
    }
    return {"arrays": outcome.weights, "metrics": metrics, "privacy": privacy, "velocity": outcome.velocity,
            "declined-run": run_id if outcome.status == "budget_exhausted" else None}


def evaluate(node_config: dict, run_config: dict, round_config: dict, weights: list[np.ndarray],
             run_id: int) -> tuple[dict, dict]:
    """Federated evaluation under DP on this hospital's held-out split (if the hospital allows it).

    `round_config` is the coordinator's whole config record, `run_id` the coordinator's run.
    Returns the reply's "metrics" and "privacy" records as dicts: noisy per-class counts
    charged to the hospital's evaluation budget, or "declined" / "off" with no counts
    (client/task.py evaluate_round, client/evaluation.py).
    """
    config, hospital = site(node_config, run_config)
    return evaluate_round(hospital, config, weights, round_config, run_id, node_config)


def handle(request: dict) -> dict:
    """One message's plain content -> its plain reply (what client/client_app.py packs).

    `request`: "kind" ("query" | "train" | "evaluate"), "node-config", "run-config",
    "config" (the coordinator's config record), "flower-run" (Flower's run id), and for
    train and evaluate "arrays"; for train also "velocity", "declined-run" and "deadline".
    """
    kind, node_config, run_config = request["kind"], request["node-config"], request["run-config"]
    round_config = request["config"]
    if kind == "query":
        return {"plan": plan(node_config, run_config, round_config, coordinator_run(round_config, request["flower-run"]))}
    if kind == "train":
        return train(node_config, run_config, round_config, request["arrays"],
                     coordinator_run(round_config, request["flower-run"]), request.get("velocity"),
                     request.get("declined-run"), request.get("deadline"))
    if kind == "evaluate":
        metrics, privacy = evaluate(node_config, run_config, round_config, request["arrays"],
                                    coordinator_run(round_config, request["flower-run"]))
        return {"metrics": metrics, "privacy": privacy}
    raise ValueError(f"unknown message kind {kind!r}")
