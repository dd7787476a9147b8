"""What a hospital does in a round: check its budget, charge it, train with DP-SGD, evaluate.

No Flower here: client/client_app.py unpacks messages and calls these functions.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.odometer import PrivacyOdometer
from common.config import Config, ModelConfig
from common.data import load_dataset
from common.dp_sgd import DPSGDEngine
from common.errors import UserError
from common.federation import load_federation
from common.metrics import evaluate_model
from common.model import make_model
from common.partition import holdout_split
from common.privacy import PrivacyEvent, sampling_rate_for, steps_for

log = logging.getLogger("hospital")


@dataclass
class HospitalSite:
    """Everything the hospital owns: its data, its budget, its odometer, its settings."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    num_classes: int
    odometer: PrivacyOdometer
    evaluate: bool = True  # the hospital's switch for federated evaluation on its held-out split


@dataclass(frozen=True)
class TrainSettings:
    """The round's training settings, chosen by the coordinator (public)."""

    batch_size: int
    local_epochs: float
    learning_rate: float
    momentum: float
    l2_norm_clip: float
    noise_multiplier: float

    @classmethod
    def from_config(cls, config: Config) -> "TrainSettings":
        return cls(config.train.batch_size, config.train.local_epochs, config.train.learning_rate,
                   config.train.momentum, config.dp.l2_norm_clip, config.dp.noise_multiplier)


@dataclass
class TrainOutcome:
    status: str  # "trained" | "budget_exhausted"
    event: PrivacyEvent  # steps == 0 when declined
    epsilon: float  # cumulative, after this round
    prior_events: list[PrivacyEvent]  # spend on this data before this run
    num_examples: int
    can_train_again: bool  # would one more identical round still fit the budget?
    epsilon_needed: float = 0.0  # what the round would have cost in total (public: from public parameters)
    weights: list[np.ndarray] | None = None
    train_loss: float = field(default=float("nan"))  # stays local: not differentially private


def simulation_site(config: Config, partition_id: int) -> HospitalSite:
    """A simulated hospital: its shard of the configured data, budget from config.privacy."""
    federation = load_federation(config)
    shard = federation.shards[partition_id]
    odometer = PrivacyOdometer(
        Path(config.privacy.odometer_dir) / f"{shard.name}.jsonl",
        shard.name, config.privacy.max_epsilon, config.privacy.delta,
    )
    return HospitalSite(shard.name, shard.train_x, shard.train_y, shard.eval_x, shard.eval_y,
                        federation.dataset.num_classes, odometer)


def deployment_site(node_config: dict, config: Config) -> HospitalSite:
    """A real hospital: data, budget and odometer from its own node config, never the server's."""
    required = ("hospital-id", "data-path", "max-epsilon", "delta", "odometer-path")
    missing = [key for key in required if key not in node_config]
    if missing:
        raise UserError(f"node config is missing {', '.join(missing)}: pass them with flower-supernode --node-config")
    name = str(node_config["hospital-id"])
    source = str(node_config.get("data-source", "npz"))
    dataset = load_dataset(source, str(node_config["data-path"]), image_size=config.data.image_size,
                           on_bad_image=config.data.on_bad_image)
    train_x, train_y = dataset.train_x, dataset.train_y
    if dataset.test_x is not None and len(dataset.test_x):
        eval_x, eval_y = dataset.test_x, dataset.test_y
    else:
        train_idx, eval_idx = holdout_split(np.arange(len(train_y)), config.data.local_eval_fraction, seed=config.seed)
        train_x, train_y, eval_x, eval_y = train_x[train_idx], train_y[train_idx], train_x[eval_idx], train_y[eval_idx]
    odometer = PrivacyOdometer(str(node_config["odometer-path"]), name,
                               float(node_config["max-epsilon"]), float(node_config["delta"]))
    evaluate = str(node_config.get("evaluate", True)).lower() not in ("false", "0", "no")
    return HospitalSite(name, train_x, train_y, eval_x, eval_y, dataset.num_classes, odometer, evaluate)


@functools.lru_cache(maxsize=4)
def _trainer(input_shape, num_classes, model_json: str, settings: "TrainSettings"):
    """(model, engine) built once per worker process and reused every round.

    Rebuilding them each round would retrace the engine's compiled step every time, which
    costs more than a small hospital's whole round. `model_json` is the config's `model`
    section as JSON (hashable, for the cache).
    """
    model = make_model(ModelConfig(**json.loads(model_json)), input_shape, num_classes)
    engine = DPSGDEngine(model, l2_norm_clip=settings.l2_norm_clip, noise_multiplier=settings.noise_multiplier,
                         learning_rate=settings.learning_rate, momentum=settings.momentum)
    return model, engine


def _prepared(config: Config, input_shape, num_classes, weights, settings):
    model, engine = _trainer(tuple(input_shape), num_classes, json.dumps(dataclasses.asdict(config.model), sort_keys=True),
                             settings)
    model.set_weights(weights)
    engine.reset_optimizer()  # momentum must not carry over from another round or hospital
    return model, engine


def _local_log(site: HospitalSite, record: dict) -> None:
    """Append to the hospital's own training log, beside its odometer; it never leaves the node."""
    path = site.odometer.path.with_suffix(".train-log.jsonl")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def train_round(site: HospitalSite, config: Config, settings: TrainSettings, weights: list[np.ndarray],
                run_id: int, round_number: int) -> TrainOutcome:
    """Check the budget, charge the odometer durably, then train with DP-SGD."""
    num_examples = len(site.train_y)
    if num_examples < settings.batch_size:
        raise UserError(f"{site.name} holds {num_examples} training examples, fewer than one batch "
                        f"({settings.batch_size}): lower train.batch_size or add data")
    sampling_rate = sampling_rate_for(settings.batch_size, num_examples)
    event = PrivacyEvent(settings.noise_multiplier, sampling_rate, steps_for(settings.local_epochs, sampling_rate))
    prior = site.odometer.events(exclude_run=run_id)
    epsilon_after = site.odometer.epsilon_after(event)
    if epsilon_after > site.odometer.max_epsilon:
        log.info("%s declines round %d: epsilon would reach %.3f > budget %.3f",
                 site.name, round_number, epsilon_after, site.odometer.max_epsilon)
        declined = PrivacyEvent(settings.noise_multiplier, sampling_rate, 0)
        return TrainOutcome("budget_exhausted", declined, site.odometer.spent(), prior, num_examples, False,
                            epsilon_needed=epsilon_after)

    # The charge is on disk before training starts, so no update can leave uncounted.
    site.odometer.charge(event, run_id, round_number, epsilon_after)
    model, engine = _prepared(config, site.train_x.shape[1:], site.num_classes, weights, settings)
    stats = engine.train(site.train_x, site.train_y, sampling_rate=sampling_rate, steps=event.steps)
    log.info("%s round %d: %d DP-SGD steps in %.2f s, local train loss %.4f (not released)",
             site.name, round_number, stats.steps, stats.seconds, stats.mean_loss)
    _local_log(site, {"run": run_id, "round": round_number, "steps": stats.steps,
                      "seconds": round(stats.seconds, 4), "train_loss": stats.mean_loss})
    can_train_again = site.odometer.epsilon_after(event) <= site.odometer.max_epsilon
    return TrainOutcome("trained", event, epsilon_after, prior, num_examples, can_train_again,
                        epsilon_after, model.get_weights(), stats.mean_loss)


def evaluate_round(site: HospitalSite, config: Config, weights: list[np.ndarray]) -> dict | None:
    """Score the global model on the hospital's local held-out split (None when switched off or empty)."""
    if not site.evaluate or len(site.eval_y) == 0:
        return None
    model, _ = _prepared(config, site.eval_x.shape[1:], site.num_classes, weights, TrainSettings.from_config(config))
    return evaluate_model(model, site.eval_x, site.eval_y)
