"""What a hospital does in a round: check its budget, charge it, train with DP-SGD, evaluate.

No Flower here: client/client_app.py unpacks messages and calls these functions.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.odometer import (SIMULATION_ODOMETER, BudgetError, OdometerError, PrivacyOdometer, example_hashes,
                             fingerprint)
from client.split import hospital_split
from common.config import HOSPITAL_NAME, MAX_PLANNED_EPOCHS, MIN_NOISE, RANGES, Config, ModelConfig
from common.data import BAD_IMAGE_POLICIES, load_dataset
from common.dp_sgd import DPSGDEngine, scheduled_learning_rate
from common.duplicates import privacy_units
from common.errors import UserError
from common.federation import load_federation
from common.metrics import predict
from common.model import make_model
from common.privacy import (NoisePlan, PrivacyEvent, compute_ahead, delta_refusal, epsilon, plan_noise,
                            useful_noise_limit)
from common.sampling import expected_batch_size, sampling_rate_for, steps_for

log = logging.getLogger("hospital")
CLIP_RANGE = RANGES["dp.l2_norm_clip"][:2]  # what the config accepts is what a hospital accepts


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
    # Each training image's unit of privacy 0..P-1 when the data names patients (a patient, or
    # patients merged by an identical image: common/duplicates.py); None: the unit is the image.
    train_units: np.ndarray | None = None
    # The same for the held-out images (client/evaluation.py weighs a patient's k images 1/k each);
    # None: the image is the unit, which a site whose data names patients must not leave unset.
    eval_units: np.ndarray | None = None

    @property
    def unit(self) -> str:
        return "image" if self.train_units is None else "patient"

    @property
    def eval_unit(self) -> str:
        """What an evaluation's counts weigh and its epsilon protects: "image" or "patient"."""
        return "image" if self.eval_units is None else "patient"

    @property
    def num_units(self) -> int:
        """n of the accounting: patients when known, else images."""
        return len(self.train_y) if self.train_units is None else int(self.train_units.max()) + 1


class SettingsError(UserError):
    """The coordinator's training settings are unusable: refused before any charge."""

    category = "settings"


@dataclass(frozen=True)
class TrainSettings:
    """The round's training settings, chosen by the coordinator (public)."""

    batch_size: int | str  # expected batch, or "auto": the hospital picks it from its own n
    local_epochs: float
    learning_rate: float
    momentum: float
    lr_schedule: str  # "cosine" | "constant": the step size of each round (common.dp_sgd.scheduled_learning_rate)
    l2_norm_clip: float
    noise_multiplier: float | str  # a number, or "auto": the hospital plans its own (client-side)
    planned_rounds: int  # rounds the coordinator plans for this run; "auto" pays for all of them

    def __post_init__(self):
        # The coordinator sends these: refuse what the engine would refuse before anything is charged.
        if self.lr_schedule not in ("cosine", "constant"):
            raise SettingsError(f"training setting lr_schedule={self.lr_schedule!r} is not cosine or constant")
        for name, ok in (("batch_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                         ("local_epochs", lambda v: v > 0), ("learning_rate", lambda v: v > 0),
                         ("momentum", lambda v: 0 <= v < 1),
                         ("l2_norm_clip", lambda v: CLIP_RANGE[0] <= v <= CLIP_RANGE[1]),
                         ("noise_multiplier", lambda v: v >= MIN_NOISE),
                         ("planned_rounds", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)):
            value = getattr(self, name)
            if name in ("noise_multiplier", "batch_size") and value == "auto":
                continue
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value)):
                raise SettingsError(f"training setting {name}={value!r} is out of range or not a finite number")
        # Accounting a plan costs time and memory that grow with its steps: bound the work a
        # coordinator can ask for before the hospital computes anything (common/config.py).
        if self.planned_rounds * self.local_epochs > MAX_PLANNED_EPOCHS:
            raise SettingsError(f"training settings plan {self.planned_rounds} rounds of {self.local_epochs:g} epochs, "
                                f"more than the {MAX_PLANNED_EPOCHS} passes over the data a run may account for")

    @classmethod
    def from_config(cls, config: Config) -> "TrainSettings":
        return cls(config.train.batch_size, config.train.local_epochs, config.train.learning_rate,
                   config.train.momentum, config.train.lr_schedule, config.dp.l2_norm_clip,
                   config.dp.noise_multiplier, config.rounds)


@dataclass
class TrainOutcome:
    status: str  # "trained" | "budget_exhausted"
    event: PrivacyEvent  # steps == 0 when declined
    epsilon: float  # cumulative, after this round
    prior_events: list[PrivacyEvent]  # counted spend that is not this hospital's own in this run
    num_examples: int  # units of privacy (patients when known, else images)
    can_train_again: bool  # would one more identical round still fit the budget?
    epsilon_needed: float = 0.0  # what the round would have cost in total (public: from public parameters)
    weights: list[np.ndarray] | None = None
    train_loss: float = field(default=float("nan"))  # stays local: not differentially private
    velocity: list[np.ndarray] | None = None  # momentum left for the next round: stays local


_HASHES: dict[int, tuple[np.ndarray, list[str]]] = {}  # id(array) -> (array, example hashes), per process
_ANNOUNCED: set[str] = set()


def _hashes(x: np.ndarray, y: np.ndarray) -> list[str]:
    """example_hashes, computed once per process for the same (cached) training array."""
    cached = _HASHES.get(id(x))
    if cached is None or cached[0] is not x:
        if len(_HASHES) >= 64:  # bounded: the entries keep their arrays alive
            _HASHES.clear()
        cached = _HASHES[id(x)] = (x, example_hashes(x, y))
    return cached[1]


def _check_delta(name: str, delta: float, n: int) -> None:
    """delta >= 1/n allows publishing a random example outright: refused. Above 1/(10 n): warned."""
    refusal = delta_refusal(name, delta, n)
    if refusal:
        raise BudgetError(refusal)
    if delta > 0.1 / n and f"delta|{name}" not in _ANNOUNCED:
        _ANNOUNCED.add(f"delta|{name}")
        log.warning("%s: delta %g is above 1/(10 n) = %.3g; a delta well below 1/n is the usual advice",
                    name, delta, 0.1 / n)


def _announce(site: "HospitalSite", where: str) -> None:
    """Say once per process where a hospital's odometer is: a wrong path would start it at zero."""
    key = f"{site.name}|{site.odometer.path}"
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        log.info("%s: privacy odometer %s (%s)", site.name, site.odometer.path, where)


def simulation_site(config: Config, partition_id: int) -> HospitalSite:
    """A simulated hospital: its shard of the configured data, budget from config.privacy.

    Accounting follows the images: every simulated hospital charges one shared odometer,
    each charge tagged with its shard, and a shard counts every earlier charge on a shard
    that shared at least one image with it (see client/shards.py)."""
    from client.shards import ShardRegistry, source_identity  # simulation only

    federation = load_federation(config)
    shard = federation.shards[partition_id]
    units = shard.train_units
    _check_delta(shard.name, config.privacy.delta, len(shard.train_y) if units is None else int(units.max()) + 1)
    legacy = sorted(Path(config.privacy.odometer_dir).glob("hospital-*.jsonl"))
    if legacy:  # per-name odometers of an earlier version cannot be matched to images: never ignore them
        raise OdometerError(f"{legacy[0].parent} holds per-hospital odometers of an earlier version "
                            f"({legacy[0].name}, ...) that cannot be matched to images: move them out of "
                            "privacy.odometer_dir (or choose another directory) to start image-based accounting")
    hashes = _hashes(shard.train_x, shard.train_y)
    registry = ShardRegistry(Path(config.privacy.odometer_dir))
    source = config.data.path[partition_id] if isinstance(config.data.path, list) else config.data.path
    shard_id = registry.register(hashes, source=source_identity(config.data.source, source), form=_form(shard.train_x))
    odometer = PrivacyOdometer(
        Path(config.privacy.odometer_dir) / SIMULATION_ODOMETER, shard.name,
        config.privacy.max_epsilon, config.privacy.delta, data_fingerprint=fingerprint(hashes),
        shard_filter=registry.overlap_filter(shard_id), extra={"shard": shard_id},
    )
    site = HospitalSite(shard.name, shard.train_x, shard.train_y, shard.eval_x, shard.eval_y,
                        federation.dataset.num_classes, odometer, train_units=units, eval_units=shard.eval_units)
    _announce(site, "shared by the simulated hospitals; each counts every charge on data overlapping its shard")
    return site


def _form(x: np.ndarray) -> str:
    """How examples are stored (dtype, shape): hashes compare only between equal forms."""
    return f"{x.dtype.str}{tuple(x.shape[1:])}"


def _finite_number(node_config: dict, key: str) -> float:
    try:
        value = float(node_config[key])
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise BudgetError(f"node config {key}={node_config[key]!r} must be a finite number")
    return value


def _switch(node_config: dict, key: str, *, default: bool) -> bool:
    """A yes/no node setting; anything else is refused rather than read as the default."""
    value = str(node_config.get(key, default)).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise UserError(f"node config {key}={node_config[key]!r} is not true or false")


NODE_CONFIG_REQUIRED = ("hospital-id", "data-path", "max-epsilon", "delta", "odometer-path")
NODE_CONFIG_OPTIONAL = ("data-source", "eval-fraction", "evaluate", "on-bad-image", "split-seed", "model-builders",
                        "num-classes", "split-image-size", "eval-max-epsilon")
# The images a hospital's split is decided on, when neither its node config nor an existing split
# file says: small (cheap to decode twice), grey, and fixed, so no run config can choose it.
SPLIT_PREPARATION = {"image_size": 32, "color": "gray"}


def _check_node_keys(node_config: dict) -> None:
    """Refuse a missing or unknown key: a misspelt `evaluate=false` must not quietly mean true."""
    missing = [key for key in NODE_CONFIG_REQUIRED if key not in node_config]
    if missing:
        raise UserError(f"node config is missing {', '.join(missing)}: pass them with flower-supernode --node-config")
    known = NODE_CONFIG_REQUIRED + NODE_CONFIG_OPTIONAL
    for key in node_config:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"node config has an unknown key {str(key)[:40]!r}: {hint}"
                            f"the keys are {', '.join(known)}")


def deployment_site(node_config: dict, config: Config) -> HospitalSite:
    """A real hospital: data, budget, odometer and split from its own node config, never the server's."""
    _check_node_keys(node_config)
    name = str(node_config["hospital-id"])
    if not HOSPITAL_NAME.fullmatch(name):
        # The coordinator refuses such a name in every reply, after the charge: refuse it first.
        raise UserError(f"node config hospital-id={name[:70]!r} is not a usable name: give 1-64 letters, digits, "
                        "'.', '_' or '-', starting with a letter or digit (e.g. hospital-id=\"st-marys\")")
    max_epsilon, delta = _finite_number(node_config, "max-epsilon"), _finite_number(node_config, "delta")
    if max_epsilon <= 0 or not 0 < delta < 1:
        raise BudgetError(f"node config needs max-epsilon > 0 and 0 < delta < 1, got {max_epsilon:g} and {delta:g}")
    eval_fraction = _finite_number(node_config, "eval-fraction") if "eval-fraction" in node_config else 0.1
    if not 0 <= eval_fraction < 1:
        raise UserError(f"node config eval-fraction must be in [0, 1), got {eval_fraction:g}")
    allowed_builders = [b.strip() for b in str(node_config.get("model-builders", "")).split(",")]
    if config.model.builder and config.model.builder not in allowed_builders:
        # The builder is code that runs here and decides what a step clips: the hospital's choice.
        raise SettingsError(f"the coordinator asks for model builder {config.model.builder!r}, which this "
                            "hospital's node config does not allow (model-builders=\"package.module:function\")")
    odometer_path = Path(str(node_config["odometer-path"])).absolute()
    try:  # the split and the odometer live there: an unusable folder is the odometer's failure
        odometer_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OdometerError(f"node config odometer-path {odometer_path}: its folder cannot be created "
                            f"({error.strerror or error}); point odometer-path at a writable folder") from None
    source = str(node_config.get("data-source", "npz"))
    # The hospital's choice, not the run config's: a coordinator that could switch it would learn,
    # from which setting fails, whether the hospital holds unreadable files.
    on_bad_image = str(node_config.get("on-bad-image", "refuse"))
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise UserError(f"node config on-bad-image must be \"refuse\" or \"skip\", got {on_bad_image[:20]!r}")
    load = functools.partial(_load_node_data, source, str(node_config["data-path"]), on_bad_image,
                             config.data.duplicates)
    dataset = load(config.data.image_size, config.data.color)
    num_classes = _num_classes(node_config, dataset)
    train_x, train_y = dataset.train_x, dataset.train_y
    units = privacy_units(dataset.train_patients, dataset.train_groups)
    hashes = _hashes(train_x, train_y)
    if dataset.test_x is not None and len(dataset.test_x):
        eval_x, eval_y = dataset.test_x, dataset.test_y
        # Held-out patients (client/evaluation.py weighs each patient's images 1/k): by patient id.
        eval_units = None if dataset.test_patients is None else np.unique(dataset.test_patients.astype(str),
                                                                         return_inverse=True)[1]
    else:
        # The hospital's split: its own fraction and seed, stored beside the odometer the first
        # time and reused; nothing in the run config can move an example. It is decided on the
        # images prepared the hospital's way (_split_preparation), not the run's: a coordinator's
        # first query must not pin how every later run prepares them.
        split_file = odometer_path.with_name(odometer_path.name + ".split.json")
        ran = {"image_size": config.data.image_size, "color": config.data.color}
        prepared = _split_preparation(node_config, split_file, source, ran)
        placed = dataset if all(ran[k] == v for k, v in prepared.items()) else load(prepared["image_size"],
                                                                                       prepared.get("color", "gray"))
        if len(placed.train_y) != len(train_y) or not np.array_equal(placed.train_y, train_y):
            raise UserError(f"{name}'s data loads as other examples at this run's data.image_size/data.color than "
                            f"at its split's ({prepared}): with data.duplicates=drop, images identical at one size "
                            "are not at another; use data.duplicates=group")
        placed_hashes = hashes if placed is dataset else example_hashes(placed.train_x, placed.train_y)
        seed = str(node_config.get("split-seed", fingerprint(placed_hashes)))
        train_idx, eval_idx = hospital_split(placed_hashes, split_file, eval_fraction, seed, prepared,
                                             groups=placed.train_groups)
        del placed
        train_x, train_y, eval_x, eval_y = train_x[train_idx], train_y[train_idx], train_x[eval_idx], train_y[eval_idx]
        hashes = [hashes[i] for i in train_idx]
        eval_units = None if units is None else units[eval_idx]  # whole patients: the split keeps groups whole
        units = None if units is None else np.unique(units[train_idx], return_inverse=True)[1]
    if len(train_y) == 0:
        raise UserError(f"{name} has no training examples in {node_config['data-path']}")
    _check_delta(name, delta, len(train_y) if units is None else int(units.max()) + 1)
    odometer = PrivacyOdometer(odometer_path, name, max_epsilon, delta,
                               data_fingerprint=fingerprint(hashes))
    evaluate = _switch(node_config, "evaluate", default=True)
    site = HospitalSite(name, train_x, train_y, eval_x, eval_y, num_classes, odometer, evaluate, units, eval_units)
    _announce(site, "this hospital's own")
    return site


def _load_node_data(source: str, path: str, on_bad_image: str, duplicates: str, image_size: int, color: str):
    try:
        return load_dataset(source, path, image_size=image_size, color=color, on_bad_image=on_bad_image,
                            duplicates=duplicates)
    except UserError as error:  # the data's own messages name the run config's keys; here they are the node's
        text = str(error)
        for run_key, node_key in (("data.path", "data-path"), ("data.source", "data-source")):
            text = text.replace(run_key, f"the node config's {node_key}")
        raise UserError(text) from None


def _num_classes(node_config: dict, dataset) -> int:
    """The class count of the study, from the node config when it says (an `.npz` hospital should).

    Read from the labels alone, the count is the largest label + 1: a coordinator whose model fits
    one count and not another would learn whether the one patient of the top class is present."""
    if "num-classes" not in node_config:
        return dataset.num_classes
    try:
        count = int(str(node_config["num-classes"]))
    except ValueError:
        count = 0
    if count < 2:
        raise UserError(f"node config num-classes={str(node_config['num-classes'])[:20]!r} must be a whole number >= 2")
    if dataset.num_classes > count:
        raise UserError(f"node config num-classes={count}, but the data holds label {dataset.num_classes - 1}: "
                        f"labels must be 0..{count - 1}")
    return count


def _split_preparation(node_config: dict, split_file: Path, source: str, ran: dict) -> dict:
    """How the images the split is decided on are prepared: node config, else the split file's, else fixed.

    A split file of a version that did not record it was decided on the run's images (`ran`):
    client/split.py adopts that only if the examples are the known ones."""
    color = {"color": "gray"} if source in ("folder", "table") else {}
    if "split-image-size" in node_config:
        try:
            size = int(str(node_config["split-image-size"]))
        except ValueError:
            size = -1
        if size < 0:
            raise UserError(f"node config split-image-size={str(node_config['split-image-size'])[:20]!r} must be 0 "
                            "(the data's own size) or a side length in pixels")
        return {"image_size": size} | color
    try:
        stored = json.loads(split_file.read_text(encoding="utf-8")).get("prepared")
    except (OSError, ValueError, AttributeError):
        stored = None  # no file yet (or an unreadable one, which hospital_split refuses)
    if isinstance(stored, dict) and isinstance(stored.get("image_size"), int):
        return {"image_size": stored["image_size"]} | ({"color": str(stored.get("color", "gray"))} if color else {})
    if split_file.exists():
        return {"image_size": ran["image_size"]} | ({"color": ran["color"]} if color else {})
    return {"image_size": SPLIT_PREPARATION["image_size"]} | color


@functools.lru_cache(maxsize=4)
def _trainer(input_shape, num_classes, model_json, l2_norm_clip, learning_rate, momentum):
    """(model, engine) built once per worker process and reused every round.

    Rebuilding them each round would retrace the engine's compiled step every time, which
    costs more than a small hospital's whole round. The noise multiplier is not part of the
    key: it is set per hospital and round (planned noise differs between hospitals).
    """
    model = make_model(ModelConfig(**json.loads(model_json)), input_shape, num_classes)
    engine = DPSGDEngine(model, l2_norm_clip=l2_norm_clip, noise_multiplier=0.0,
                         learning_rate=learning_rate, momentum=momentum)
    return model, engine


def _prepared(config: Config, input_shape, num_classes, weights, settings):
    model_json = json.dumps(dataclasses.asdict(config.model), sort_keys=True)  # hashable: the cache's key
    model, engine = _trainer(tuple(input_shape), num_classes, model_json,
                             settings.l2_norm_clip, settings.learning_rate, settings.momentum)
    try:
        model.set_weights(weights)
    except ValueError:
        # Stays in the hospital's log (only the category leaves): say which shapes, and what sets them.
        own = [tuple(w.shape) for w in model.get_weights()]
        sent = [tuple(np.shape(w)) for w in weights]
        differ = next(((a, b) for a, b in zip(own, sent) if a != b), None)
        what = (f"{len(sent)} weight arrays for a model of {len(own)}" if differ is None
                else f"an array of shape {differ[1]} where this model has {differ[0]}")
        raise SettingsError(f"the coordinator's weights do not fit this hospital's model: it sent {what}. This "
                            f"hospital's images are {'x'.join(map(str, input_shape))} in {num_classes} classes; the "
                            "run's data.image_size, data.color and model settings, and its class count, must match "
                            "them") from None
    return model, engine


def _local_log(site: HospitalSite, record: dict) -> None:
    """Append to the hospital's own training log, beside its odometer; it never leaves the node."""
    path = site.odometer.path.with_suffix(".train-log.jsonl")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _batch(site: HospitalSite, settings: TrainSettings) -> int:
    """The hospital's expected batch; refused when it holds fewer examples than one batch."""
    batch = expected_batch_size(settings.batch_size, site.num_units)
    if site.num_units < batch:
        raise UserError(f"{site.name} holds {site.num_units} training {site.unit}s, fewer than one batch "
                        f"({batch}): lower train.batch_size or add data")
    return batch


def noise_plan(site: HospitalSite, settings: TrainSettings, run_id: int, round_number: int) -> NoisePlan | None:
    """The hospital's noise multiplier for this run: fixed by the config, or planned from its own facts.

    With "auto" the hospital plans once per run, at the first round it is asked to train:
    the smallest sigma with which every remaining planned round, at its own q and steps,
    keeps its cumulative epsilon (earlier runs on this data included) within its own budget.
    Later rounds of the run reuse the sigma its odometer recorded, so a hospital's sigma is
    constant within a run. None when the budget left cannot fund a useful round.
    """
    odometer = site.odometer
    q = sampling_rate_for(settings.batch_size, site.num_units)
    steps = steps_for(settings.local_epochs, q)
    prior = odometer.prior_events(run_id)
    rounds_left = max(1, int(settings.planned_rounds) - round_number + 1)
    if settings.noise_multiplier != "auto":
        sigma = float(settings.noise_multiplier)
        return NoisePlan(sigma, q, steps, rounds_left, epsilon(prior, odometer.delta),
                         epsilon(prior + [PrivacyEvent(sigma, q, steps * rounds_left)], odometer.delta))
    this_run = [r for r in odometer.own_records(run_id) if int(r.get("steps", 0)) > 0]
    if this_run:
        sigma = float(this_run[0]["noise_multiplier"])
        return NoisePlan(sigma, q, steps, rounds_left, epsilon(prior, odometer.delta),
                         epsilon(odometer.events() + [PrivacyEvent(sigma, q, steps * rounds_left)], odometer.delta))
    return plan_noise(prior, q, steps, rounds_left, odometer.max_epsilon, odometer.delta,
                      max_noise=useful_noise_limit(_batch(site, settings)))


def plan_summary(site: HospitalSite, settings: TrainSettings, run_id: int) -> dict:
    """What the hospital will do this run (public: computed from public parameters and n)."""
    _batch(site, settings)
    plan = noise_plan(site, settings, run_id, 1)
    q = sampling_rate_for(settings.batch_size, site.num_units)
    summary = {"num-examples": site.num_units, "unit": site.unit, "sampling-rate": q,
               "steps-per-round": steps_for(settings.local_epochs, q),
               "epsilon-before": site.odometer.spent(), "max-epsilon": site.odometer.max_epsilon,
               "delta": site.odometer.delta}
    if plan is not None:
        summary |= {"noise-multiplier": plan.noise_multiplier, "epsilon-planned": plan.epsilon_after,
                    "rounds-planned": plan.rounds}
    return summary


def _refuse_past(deadline: float | None, round_number: int) -> None:
    """Refuse, before any charge, a round whose reply would arrive after the coordinator stopped waiting.

    The deadline is on the coordinator's clock: a hospital whose clock runs ahead by more than
    the round timeout refuses every round, and this line says so; it never spends more."""
    if deadline is None:
        return
    late = time.time() - deadline
    if late > 0:
        raise SettingsError(f"round {round_number} reached this hospital {late:.0f} s after the coordinator's deadline "
                            "for it (train.round_timeout): nothing charged; if that keeps happening, check that this "
                            "machine's clock agrees with the coordinator's (NTP)")


def train_round(site: HospitalSite, config: Config, settings: TrainSettings, weights: list[np.ndarray],
                run_id: int, round_number: int, velocity: list[np.ndarray] | None = None,
                declined_before: bool = False, deadline: float | None = None) -> TrainOutcome:
    """Plan or take the noise, check the budget, charge the odometer durably, then train with DP-SGD.

    `velocity` is the momentum this hospital's previous round of the run left: a round has
    only about n / batch steps, too few for heavy-ball momentum to build up from zero, so
    the hospital's optimizer carries on where it stopped, as one centralized run would
    (BENCHMARKS.md section 3). It is post-processing of the hospital's own noisy gradients.
    `declined_before`: the hospital declined an earlier round of this run, so it declines again.
    `deadline` (Unix time, the coordinator's clock): past it the coordinator no longer counts
    this round's reply, so the hospital refuses before charging (a SuperNode frozen with the
    message in hand, then resumed, would otherwise spend budget on a reply nobody ledgers).
    """
    batch = _batch(site, settings)
    num_examples = site.num_units  # what q and the accountant count: patients when known
    plan = None if declined_before else noise_plan(site, settings, run_id, round_number)
    if plan is None:
        q = sampling_rate_for(settings.batch_size, num_examples)
        limit = useful_noise_limit(batch)
        if declined_before:
            log.info("%s declines round %d: it declined an earlier round of this run", site.name, round_number)
        else:
            log.info("%s declines round %d: the budget left (epsilon %.3f spent of %.3f) cannot fund a useful "
                     "round (it would need a noise multiplier above %g at batch %d)", site.name, round_number,
                     site.odometer.spent(), site.odometer.max_epsilon, limit, batch)
        declined = PrivacyEvent(limit, q, 0)
        needed = site.odometer.epsilon_after(PrivacyEvent(limit, q, steps_for(settings.local_epochs, q)))
        return TrainOutcome("budget_exhausted", declined, site.odometer.spent(),
                            site.odometer.prior_events(run_id), num_examples, False, epsilon_needed=needed)
    event = PrivacyEvent(plan.noise_multiplier, plan.sampling_rate, plan.steps_per_round)
    # What the coordinator's settings or weights could make fail, fails before the charge.
    learning_rate = scheduled_learning_rate(settings.learning_rate, settings.lr_schedule, round_number,
                                            settings.planned_rounds)
    if not learning_rate > 0:
        raise SettingsError(f"round {round_number} is past the {settings.planned_rounds} rounds planned: "
                            "its learning rate would be 0")
    model, engine = _prepared(config, site.train_x.shape[1:], site.num_classes, weights, settings)
    _refuse_past(deadline, round_number)
    # Read, budget check and charge under one exclusive lock; the charge is on disk before
    # training starts, so no update can leave uncounted.
    reservation = site.odometer.reserve(event, run_id, round_number)
    prior, epsilon_after = reservation.prior, reservation.epsilon_after
    if not reservation.charged:
        log.info("%s declines round %d: epsilon would reach %.3f > budget %.3f",
                 site.name, round_number, epsilon_after, site.odometer.max_epsilon)
        declined = PrivacyEvent(plan.noise_multiplier, plan.sampling_rate, 0)
        return TrainOutcome("budget_exhausted", declined, reservation.spent, prior, num_examples, False,
                            epsilon_needed=epsilon_after)

    carried = engine.set_velocity(velocity)  # zeros first: never another hospital's momentum
    engine.learning_rate = learning_rate
    engine.noise_multiplier = event.noise_multiplier
    stats = engine.train(site.train_x, site.train_y, sampling_rate=event.sampling_rate, steps=event.steps,
                         units=site.train_units)
    log.info("%s round %d: %d DP-SGD steps in %.2f s, local train loss %.4f (not released)",
             site.name, round_number, stats.steps, stats.seconds, stats.mean_loss)
    _local_log(site, {"run": run_id, "round": round_number, "steps": stats.steps,
                      "seconds": round(stats.seconds, 4), "train_loss": stats.mean_loss, "momentum_carried": carried})
    can_train_again = site.odometer.epsilon_after(event) <= site.odometer.max_epsilon
    if can_train_again and round_number < settings.planned_rounds:
        # The next round's own "one more round?" check, computed while the coordinator aggregates.
        compute_ahead(site.odometer.events() + [event, event], site.odometer.delta)
    return TrainOutcome("trained", event, epsilon_after, prior, num_examples, can_train_again,
                        epsilon_after, model.get_weights(), stats.mean_loss, engine.velocity())


def evaluate_round(site: HospitalSite, config: Config, weights: list[np.ndarray], round_config: dict,
                   run_id: int, node_config: dict) -> tuple[dict, dict]:
    """Federated evaluation under DP on the hospital's held-out split: (metrics, privacy) of the reply.

    Switched off by the hospital (node config `evaluate=false`) or with no held-out example:
    status "off", nothing released. Otherwise client/evaluation.py plans, charges and releases
    noisy per-class counts against the hospital's own evaluation budget (node config
    `eval-max-epsilon`, default its `max-epsilon`; in simulation `privacy.eval_max_epsilon`),
    or declines once that budget is spent. The coordinator's request (`round_config`) only
    says which round this is and how many evaluations it still plans.
    """
    from client import evaluation  # noqa: PLC0415 - keeps task.py's import graph as it was

    if not site.evaluate or len(site.eval_y) == 0:
        return {"num-examples": 0}, {"hospital": site.name, "status": "off"}
    if site.train_units is not None and site.eval_units is None:
        # Weighing a patient's images as separate units would multiply the sensitivity: never.
        raise UserError(f"{site.name}'s data names patients but its held-out split's patients are not known: "
                        "evaluation is refused")
    request = evaluation.EvaluationRequest.from_config(round_config)
    simulated = "hospital-id" not in node_config
    budget = (evaluation.config_eval_budget(config.privacy.eval_max_epsilon, config.privacy.max_epsilon) if simulated
              else evaluation.node_eval_budget(node_config, site.odometer.max_epsilon))
    # Weights that do not fit the model fail here, before any charge.
    model, _ = _prepared(config, site.eval_x.shape[1:], site.num_classes, weights, TrainSettings.from_config(config))
    probabilities = predict(model, site.eval_x)
    predictions = ((probabilities[:, 0] >= 0.5).astype(np.int64) if probabilities.shape[-1] == 1
                   else probabilities.argmax(axis=-1))
    source = None
    if simulated:  # the held-out split's source, as simulation_site names the training shard's
        from client.shards import source_identity  # noqa: PLC0415 - simulation only

        path = config.data.path
        source = source_identity(config.data.source,
                                 path[int(node_config["partition-id"])] if isinstance(path, list) else path)
    return evaluation.release(site, predictions, run_id, request, budget, simulation_source=source)
