"""The configuration schema: every setting, its default, its unit and its allowed values.

YAML files in configs/ hold only overrides of these defaults; `--set key=value` overrides
those. Dotted keys (`dp.noise_multiplier`) are the only names a user learns: the Flower run
config carries the resolved config as one JSON string, mapped back here.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.cpus import usable_cpus
from common.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The smallest noise multiplier a run may use, fixed or planned. Below it a plan's epsilon runs
# into the hundreds (no budget a privacy officer signs), and the PLD accountant that decides a
# hospital's charge needs ever more time and memory: sigma 0.1 took 27 s and 3.5 GB for one
# 40-round plan, sigma 0.07 ~13 GB (BENCHMARKS.md section 6). A coordinator must not send that.
MIN_NOISE = 0.5
# The most passes over its data (rounds x local epochs) a hospital accounts for in one run.
# Runs here take 20-40; the bound keeps one accounting call within seconds and a few GB
# (10^4 steps at sigma 0.5 and q = 1: 11 s, 2.5 GB) whatever a coordinator plans.
MAX_PLANNED_EPOCHS = 10_000
# The most federated evaluations a hospital accounts for in one run (common/eval_privacy.py).
MAX_PLANNED_EVALUATIONS = 1000


def evaluation_rounds(first_round: int, last_round: int, every: int) -> list[int]:
    """The rounds from first_round to last_round with a federated evaluation: every `every`-th, and the last."""
    rounds = [r for r in range(first_round, last_round + 1) if every and r % every == 0]
    return rounds if last_round in rounds or last_round < first_round else rounds + [last_round]


# A hospital's name: in the ledger, on the coordinator's terminal (so no control characters),
# checked by the SuperNode's hospital before any charge and by the coordinator in every reply.
HOSPITAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class DataConfig:
    source: str = "digits"  # digits (scikit-learn's bundled 8x8 images) | npz (MedMNIST layout) | folder | table (labels.csv)
    path: str | list[str] = ""  # npz file, image folder or labels table; a list gives one path per hospital
    partition: str = "iid"  # iid | dirichlet (label skew) | quantity (size skew)
    alpha: float = 0.5  # Dirichlet concentration for dirichlet and quantity; smaller = more skewed
    image_size: int = 0  # side in pixels to resize to; 0 keeps the data's own size
    test_fraction: float = 0.2  # central held-out test split, when the source has none
    local_eval_fraction: float = 0.1  # each hospital's local held-out split for federated evaluation
    on_bad_image: str = "refuse"  # refuse | skip (and count) unreadable images
    color: str = "gray"  # folders: gray (one channel) | rgb (keeps colour: stains, fundus, skin)
    # Exact duplicate images (common/duplicates.py): group keeps each set of identical images in one
    # hospital and on one side of every split; drop keeps only its first image.
    duplicates: str = "group"


@dataclass
class ModelConfig:
    filters: list[int] = field(default_factory=lambda: [16, 32, 32])  # Conv2D widths, one conv+pool block each
    dense_units: int = 64  # width of the Dense layer before the output
    activation: str = "tanh"  # tanh | relu | elu | sigmoid (bounded ones train better under DP)
    normalization: str = "group"  # group (GroupNorm without affine weights) | none; never batch norm
    head: str = "flatten"  # flatten (the reference network) | avgpool (global average: far fewer weights)
    builder: str = ""  # package.module:function(input_shape, num_classes) -> tf-keras model; "" = the CNN above


@dataclass
class TrainConfig:
    # Expected Poisson batch size (sampling rate q = batch_size / examples), or "auto": each
    # hospital takes the largest power of two up to its examples / 4, within 16..128.
    batch_size: int | str = "auto"
    local_epochs: float = 1.0  # DP-SGD steps per round = ceil(local_epochs / q)
    learning_rate: float = 0.2  # SGD step size on the mean clipped gradient (0.5 and up diverged under DP)
    momentum: float = 0.9  # SGD momentum in [0, 1): post-processing of noisy gradients, no privacy cost
    # cosine: round r of R trains at learning_rate * (1 + cos(pi (r-1) / R)) / 2; constant: always learning_rate
    lr_schedule: str = "cosine"
    fraction_train: float = 1.0  # share of hospitals asked to train each round, in (0, 1]
    fraction_evaluate: float = 1.0  # share asked for federated evaluation each round, in [0, 1]
    aggregator: str = "fedavg"  # fedavg (weighted by examples) | median | trimmed_mean (coordinate-wise, robust)
    min_hospitals: int = 1  # fewer successful updates in a round leave the global model as it was
    round_timeout: float = 600.0  # seconds to wait for replies in a round (and for hospitals before round 1)
    # Federated evaluation (each one costs the hospitals evaluation budget) every this many rounds,
    # and always after the last round; 0: after the last round only. Rounds without it still score
    # the global model on the coordinator's central test set.
    evaluate_every: int = 10


@dataclass
class DPConfig:
    l2_norm_clip: float = 1.0  # C: every example's gradient is clipped to this L2 norm
    # sigma (Gaussian noise std is sigma * C on the gradient sum), or "auto": each hospital
    # plans the smallest sigma with which every planned round fits its own budget.
    noise_multiplier: float | str = "auto"


@dataclass
class PrivacyConfig:
    max_epsilon: float = 3.0  # each hospital's own budget; a round that would pass it is declined
    delta: float = 1e-5  # target delta of the (epsilon, delta) guarantee
    # Each simulated hospital's evaluation budget (noisy counts on its held-out split, accounted
    # apart from training: common/eval_privacy.py), or auto: equal to max_epsilon, so that no
    # patient's epsilon (the larger of the two, the splits being disjoint) exceeds max_epsilon.
    eval_max_epsilon: float | str = "auto"
    # Where simulated hospitals keep their privacy record: "" = the per-user data directory
    # (default_odometer_dir(), never inside the installation); a relative path is taken from the
    # directory the run starts in.
    odometer_dir: str = ""


@dataclass
class SimulationConfig:
    cpus_per_client: float = 1.0  # Ray CPUs reserved per simulated hospital (sets parallelism)


@dataclass
class Config:
    rounds: int = 20  # federated rounds; planned noise spends the budget over all of them
    hospitals: int = 5  # simulated hospitals
    seed: int = 0  # partitioning, model initialisation and the test split (not DP noise)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


CHOICES = {
    "data.source": ("digits", "npz", "folder", "table"),
    "data.partition": ("iid", "dirichlet", "quantity"),
    "data.on_bad_image": ("refuse", "skip"),
    "data.duplicates": ("group", "drop"),
    "data.color": ("gray", "rgb"),
    "model.activation": ("tanh", "relu", "elu", "sigmoid"),
    "model.normalization": ("none", "group"),
    "model.head": ("flatten", "avgpool"),
    "train.aggregator": ("fedavg", "median", "trimmed_mean"),
    "train.lr_schedule": ("cosine", "constant"),
}
# (lowest, highest, lowest allowed itself?, highest allowed itself?)
RANGES = {
    "rounds": (1, None, True, None),
    "hospitals": (1, None, True, None),
    "data.alpha": (0, None, False, None),
    "data.image_size": (0, 4096, True, True),
    "data.test_fraction": (0, 1, False, False),
    "data.local_eval_fraction": (0, 1, True, False),
    "model.dense_units": (1, None, True, None),
    "train.local_epochs": (0, None, False, None),
    "train.learning_rate": (0, None, False, None),
    "train.momentum": (0, 1, True, False),
    "train.fraction_train": (0, 1, False, True),
    "train.fraction_evaluate": (0, 1, True, True),
    "train.min_hospitals": (1, None, True, None),
    "train.round_timeout": (0, None, False, None),
    "train.evaluate_every": (0, None, True, None),
    "seed": (0, 2**32, True, False),  # NumPy and TensorFlow seeds are 32-bit
    # Bounded both ways: below 1e-4 the noise sigma*C of a float32 step nears the smallest normal
    # float (CPUs flush smaller values to zero, which would drop the noise and keep the gradient);
    # above 1e4 sums of clipped gradients can overflow. DP-SGD clip norms sit in 0.1-10.
    "dp.l2_norm_clip": (1e-4, 1e4, True, True),
    "privacy.max_epsilon": (0, None, False, None),
    "privacy.delta": (0, 1, False, False),
    "simulation.cpus_per_client": (0, None, False, None),
}


def _convert(key: str, value, kind):
    """Coerce one value to the field's type, or raise UserError naming the key."""
    origin = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_kind,) = typing.get_args(kind)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
        if isinstance(value, list):
            return [_convert(key, item, item_kind) for item in value]
    elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if isinstance(value, str) and value.strip().startswith("["):  # --set data.path=[a, b]
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UserError(f"config key '{key}': cannot read the list {value!r}") from None
        for option in typing.get_args(kind):  # str | list[str]: a path or a list of paths
            try:
                return _convert(key, value, option)
            except UserError:
                continue
    name = getattr(kind, "__name__", str(kind))
    raise UserError(f"config key '{key}': expected {name}, got {value!r}")


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _apply(target, values: dict, prefix: str = "") -> None:
    """Set the fields of a dataclass instance from a nested dict, refusing unknown keys."""
    if not isinstance(values, dict):
        raise UserError(f"config key '{prefix.rstrip('.') or '(top level)'}' must be a mapping, got {values!r}")
    kinds = _fields(type(target))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in kinds:
            raise UserError(f"unknown config key '{key}'; known keys: {', '.join(prefix + k for k in kinds)}")
        kind = kinds[name]
        if dataclasses.is_dataclass(kind):
            _apply(getattr(target, name), value, key + ".")
        else:
            setattr(target, name, _convert(key, value, kind))


def validate(config: Config) -> Config:
    """Check every value against CHOICES and RANGES and the cross-field rules."""
    flat = flatten(config)
    for key, value in flat.items():  # NaN passes every comparison below (nan < 0 is False)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UserError(f"config key '{key}' must be a finite number, got {value}")
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise UserError(f"config key '{key}' must be one of {' | '.join(allowed)}, got {flat[key]!r}")
    for key, (low, high, low_ok, high_ok) in RANGES.items():
        value = flat[key]
        if low is not None and (value < low or (value == low and not low_ok)):
            raise UserError(f"config key '{key}' must be {'>=' if low_ok else '>'} {low}, got {value}")
        if high is not None and (value > high or (value == high and not high_ok)):
            raise UserError(f"config key '{key}' must be {'<=' if high_ok else '<'} {high}, got {value}")
    sigma = config.dp.noise_multiplier
    if isinstance(sigma, str) and sigma != "auto":
        raise UserError(f"config key 'dp.noise_multiplier' must be a positive number or auto, got {sigma!r}")
    if not isinstance(sigma, str) and not (math.isfinite(sigma) and sigma >= MIN_NOISE):
        raise UserError(f"config key 'dp.noise_multiplier' must be >= {MIN_NOISE} (below it epsilon runs into the "
                        f"hundreds; or use auto), got {sigma}")
    if config.rounds * config.train.local_epochs > MAX_PLANNED_EPOCHS:
        raise UserError(f"rounds x train.local_epochs is {config.rounds * config.train.local_epochs:g}, more passes over "
                        f"each hospital's data than a run accounts for (at most {MAX_PLANNED_EPOCHS}): lower either")
    eval_budget = config.privacy.eval_max_epsilon
    if isinstance(eval_budget, str) and eval_budget != "auto":
        raise UserError(f"config key 'privacy.eval_max_epsilon' must be a positive number or auto, got {eval_budget!r}")
    if not isinstance(eval_budget, str) and not (math.isfinite(eval_budget) and eval_budget > 0):
        raise UserError(f"config key 'privacy.eval_max_epsilon' must be > 0 (or auto), got {eval_budget}")
    if len(evaluation_rounds(1, config.rounds, config.train.evaluate_every)) > MAX_PLANNED_EVALUATIONS:
        raise UserError(f"rounds={config.rounds} with train.evaluate_every={config.train.evaluate_every} plans more "
                        f"than the {MAX_PLANNED_EVALUATIONS} federated evaluations a run accounts for: raise "
                        "train.evaluate_every")
    batch = config.train.batch_size
    if isinstance(batch, str) and batch != "auto":
        raise UserError(f"config key 'train.batch_size' must be a positive integer or auto, got {batch!r}")
    if not isinstance(batch, str) and batch < 1:
        raise UserError(f"config key 'train.batch_size' must be >= 1 (or auto), got {batch}")
    if not config.model.filters or any(width < 1 for width in config.model.filters):
        raise UserError(f"config key 'model.filters' must be a non-empty list of positive ints, got {config.model.filters}")
    if config.model.builder and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", config.model.builder):
        raise UserError(f"config key 'model.builder' must look like package.module:function, got {config.model.builder!r}")
    if config.data.source == "digits" and config.data.path:  # else a run "on" that path would train on digits
        raise UserError(f"config key 'data.path' is set ({config.data.path}) but data.source is digits, which reads no "
                        "file: add data.source=folder (a folder of images) or data.source=npz, or drop data.path")
    if config.data.source != "digits" and not config.data.path:
        raise UserError(f"config key 'data.path' is required for data.source={config.data.source}: set it to the file or folder")
    if Path(config.privacy.odometer_dir).exists() and not Path(config.privacy.odometer_dir).is_dir():
        raise UserError(f"config key 'privacy.odometer_dir' names a file ({config.privacy.odometer_dir}): give a directory")
    if config.simulation.cpus_per_client > usable_cpus():
        raise UserError(f"config key 'simulation.cpus_per_client' is {config.simulation.cpus_per_client:g} but this "
                        f"process may use {usable_cpus()} CPU cores: lower it")
    if isinstance(config.data.path, list) and len(config.data.path) != config.hospitals:
        raise UserError(
            f"config key 'data.path' lists {len(config.data.path)} paths but hospitals={config.hospitals}: give one path per hospital"
        )
    # The default odometer must survive a rebuilt environment or a reinstall: it lives in the
    # user's data directory, not beside the code. The resolved (absolute) path is what config.yaml shows.
    odometer_dir = Path(config.privacy.odometer_dir).expanduser() if config.privacy.odometer_dir else default_odometer_dir()
    config.privacy.odometer_dir = str(odometer_dir.absolute())
    return config


def default_odometer_dir() -> Path:
    """The simulations' default odometer: `<user data dir>/hospital-fl/odometer` (on Linux
    ~/.local/share/hospital-fl/odometer, or under $XDG_DATA_HOME), whatever the installation."""
    import platformdirs

    return Path(platformdirs.user_data_dir("hospital-fl", appauthor=False)) / "odometer"


def flatten(config: Config) -> dict:
    """The resolved config as {dotted key: value}."""
    out = {}

    def walk(node, prefix):
        for name in _fields(type(node)):
            value = getattr(node, name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = value

    walk(config, "")
    return out


def to_dict(config: Config) -> dict:
    """The resolved config as a nested dict (for config.yaml and the Flower run config)."""
    return dataclasses.asdict(config)


def parse_override(text: str) -> dict:
    """Turn 'dp.noise_multiplier=1.2' into the nested dict {'dp': {'noise_multiplier': '1.2'}}."""
    if "=" not in text:
        raise UserError(f"--set expects key=value (for example dp.noise_multiplier=1.2), got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set expects key=value, got {text!r}")
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value.strip()
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"config key '{key}' appears twice (line {key_node.start_mark.line + 1}): keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file's values, then each `key=value` override; validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path} (pass an existing YAML file with --config)")
        try:
            values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read config file {path}: {error}") from None
        if values is not None:
            _apply(config, values)
    for text in overrides:
        _apply(config, parse_override(text))
    return validate(config)


def from_dict(values: dict) -> Config:
    """Rebuild a validated Config from `to_dict` output (e.g. the Flower run config)."""
    config = Config()
    _apply(config, values)
    return validate(config)


# Run-config keys that are not settings; every other key is a flat schema key (`rounds`,
# `privacy.max_epsilon`...) declared in pyproject's [tool.flwr.app.config] with "" for "not set".
RUN_CONFIG_OWN_KEYS = ("config-path", "config-json", "run-dir", "resume-dir")


@functools.cache
def _flat_defaults() -> dict:
    """The embedded default config as flat dotted keys (the names of [tool.flwr.app.config])."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
        return out
    return flat(to_dict(Config()))


def _same(default, value) -> bool:
    """Equal in value and kind (Flower may hand 20 as 20.0; True is not 1)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return default is value
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return float(default) == float(value)
    return default is not None and type(default) is type(value) and default == value


def from_run_config(run_config: dict, simulated_hospitals: int = 0) -> Config:
    """The one mapping from Flower's run config onto the schema.

    `config-json` (the whole resolved config) if set, else the YAML at `config-path`; then each
    flat key that is set (`flwr run . --run-config "rounds=3 privacy.max_epsilon=4"`). In a Flower
    simulation the number of simulated SuperNodes is the number of hospitals (`simulated_hospitals`).
    """
    text = str(run_config.get("config-json", "") or "")
    if text:
        config = from_dict(json.loads(text))
    else:
        path = Path(str(run_config.get("config-path", "") or "configs/default.yaml"))
        path = path if path.is_absolute() else PROJECT_ROOT / path
        if not path.is_file():
            raise UserError(f"config file not found: {path} (set the run-config key config-path to an existing "
                            "YAML file of the app)")
        config = load_config(path)
    defaults = _flat_defaults()
    for key, value in run_config.items():
        # pyproject declares each flat key at its embedded default (typed, as Flower's templates
        # do): a key at that value is "not set", so config-json and config-path keep theirs.
        if key in RUN_CONFIG_OWN_KEYS or value == "" or _same(defaults.get(key), value):
            continue
        nested: dict = {}
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        _apply(config, nested)
    if simulated_hospitals:
        config.hospitals = simulated_hospitals
    return validate(config)
