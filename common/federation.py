"""Who holds what in a simulation: the central test split and each hospital's shard.

Server and clients call `load_federation` with the same config and get the same split (fixed
seed), so no index list has to travel. Deployment does not use this: there each hospital
loads its own files (client/task.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import numpy as np

from common.config import Config, from_dict, to_dict
from common.data import Dataset, load_dataset, load_hospital_paths
from common.duplicates import across_hospitals, privacy_units, sets_within, subset
from common.partition import check_shards, holdout_split, partition, split_test


@dataclass
class Shard:
    """One hospital's data: training examples and its local held-out split."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    identical_sets: int = 0  # sets of identical images it holds (each set whole, common/duplicates.py)
    train_units: np.ndarray | None = None  # each training image's patient unit 0..P-1; None: the image is the unit
    eval_units: np.ndarray | None = None  # the same for the held-out images (evaluation weighs a patient's k images 1/k)


@dataclass
class Federation:
    dataset: Dataset  # shapes, classes, labels and loader notes; its training images are in the shards
    test_x: np.ndarray  # central held-out test set (evaluated by the coordinator)
    test_y: np.ndarray
    shards: list[Shard]


def _without_training_images(dataset: Dataset) -> Dataset:
    """`dataset` with its labels, test split and description but not its training images.

    Once the shards hold their own copies, nobody trains on the source's array: at 224 px
    RGB the blood-cell folder's training images are 0.7 GB that each process would hold twice.
    """
    return dataclasses.replace(dataset, train_x=np.empty((0, *dataset.train_x.shape[1:]), dataset.train_x.dtype))


def hospital_name(index: int) -> str:
    return f"hospital-{index}"


def _central_split(dataset: Dataset, config: Config, seed: int):
    """(the training part as a Dataset, test_x, test_y): the source's own test split, or a held-out fraction."""
    if dataset.test_x is not None and len(dataset.test_x):
        return dataset, dataset.test_x, dataset.test_y
    train_idx, test_idx = split_test(len(dataset.train_y), config.data.test_fraction, seed=seed,
                                     groups=dataset.train_groups)
    return subset(dataset, train_idx), dataset.train_x[test_idx], dataset.train_y[test_idx]


def _shard(name, own: Dataset, fraction, seed) -> Shard:
    train_idx, eval_idx = holdout_split(np.arange(len(own.train_y)), fraction, seed=seed, groups=own.train_groups)
    x, y = own.train_x, own.train_y
    return Shard(name, x[train_idx], y[train_idx], x[eval_idx], y[eval_idx],
                 sets_within(own.identical_sets, np.arange(len(y))), _units(own, train_idx), _units(own, eval_idx))


def _units(dataset: Dataset, train: np.ndarray) -> np.ndarray | None:
    """The privacy units of the training images at `train`: patients (whole, as every split keeps them)."""
    if dataset.train_patients is None:
        return None
    return privacy_units(dataset.train_patients[train], dataset.train_groups[train])


def _pool_and_test(dataset: Dataset, config: Config):
    """(indices of `dataset.train_x` the hospitals share, indices held out for the coordinator
    or None when the source's own test split is the central one)."""
    if dataset.test_x is not None and len(dataset.test_x):
        return np.arange(len(dataset.train_y)), None
    return split_test(len(dataset.train_y), config.data.test_fraction, seed=config.seed, groups=dataset.train_groups)


def _test_set(dataset: Dataset, test) -> tuple[np.ndarray, np.ndarray]:
    """The central test images and labels for `_pool_and_test`'s `test`."""
    if test is None:
        return dataset.test_x, dataset.test_y
    return dataset.train_x[test], dataset.train_y[test]


def _hospital_indices(dataset: Dataset, config: Config):
    """Where a single source's examples go: (central test indices or None, [(train, eval) per hospital]).

    Every index points into `dataset.train_x`; None means the source's own test split is the
    central one. Labels alone decide it, so the coordinator can describe the partition
    without holding the images.
    """
    data = config.data
    pool, test = _pool_and_test(dataset, config)
    groups = dataset.train_groups
    parts = partition(dataset.train_y[pool], config.hospitals, data.partition, alpha=data.alpha, seed=config.seed,
                      groups=None if groups is None else groups[pool])
    hospitals = []
    for index, idx in enumerate(parts):
        own = pool[idx]
        train, held = holdout_split(np.arange(len(own)), data.local_eval_fraction, seed=config.seed + index,
                                    groups=None if groups is None else groups[own])
        hospitals.append((own[train], own[held]))
    return test, hospitals


def _load(config: Config) -> Dataset:
    data = config.data
    return load_dataset(data.source, data.path, image_size=data.image_size, on_bad_image=data.on_bad_image,
                        color=data.color, duplicates=data.duplicates)


def build_federation(config: Config) -> Federation:
    """Load the configured data and split it into a central test set and one shard per hospital."""
    data = config.data
    names = [hospital_name(i) for i in range(config.hospitals)]
    if isinstance(data.path, list):  # one file or folder per hospital
        datasets = across_hospitals(load_hospital_paths(data.source, data.path, image_size=data.image_size,
                                                        on_bad_image=data.on_bad_image, color=data.color,
                                                        duplicates=data.duplicates), names)
        shards, tests_x, tests_y = [], [], []
        for index, (name, own) in enumerate(zip(names, datasets)):
            train, test_x, test_y = _central_split(own, config, config.seed + index)
            shards.append(_shard(name, train, data.local_eval_fraction, config.seed + index))
            tests_x.append(test_x)
            tests_y.append(test_y)
        notes = [note for own in datasets for note in own.notes]
        federation = Federation(dataclasses.replace(_without_training_images(datasets[0]), notes=notes),
                                np.concatenate(tests_x),
                                np.concatenate(tests_y), shards)
    else:
        dataset = _load(config)
        test, hospitals = _hospital_indices(dataset, config)
        x, y = dataset.train_x, dataset.train_y
        test_x, test_y = _test_set(dataset, test)
        shards = [Shard(name, x[train], y[train], x[held], y[held],
                        sets_within(dataset.identical_sets, np.concatenate([train, held])), _units(dataset, train),
                        _units(dataset, held))
                  for name, (train, held) in zip(names, hospitals)]
        federation = Federation(_without_training_images(dataset), test_x, test_y, shards)
    check_shards([s.train_y for s in federation.shards], names, config.train.batch_size)
    return federation


@functools.lru_cache(maxsize=2)
def _cached(config_json: str) -> Federation:
    return build_federation(from_dict(json.loads(config_json)))


def load_federation(config: Config) -> Federation:
    """`build_federation`, cached per process: simulated hospitals sharing a worker decode once."""
    return _cached(json.dumps(to_dict(config), sort_keys=True))


def central_test_set(config: Config) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """(dataset, test_x, test_y) for the coordinator, split exactly as in `build_federation`.

    The coordinator never trains: it keeps the labels (for the report), not the training images.
    """
    if isinstance(config.data.path, list):
        federation = load_federation(config)
        return federation.dataset, federation.test_x, federation.test_y
    dataset = _load(config)
    test_x, test_y = _test_set(dataset, _pool_and_test(dataset, config)[1])  # no copy of the training part
    return _without_training_images(dataset), test_x, test_y


def hospital_label_counts(config: Config, dataset: Dataset) -> tuple[dict[str, list[int]], list[str]]:
    """(training examples per class of each simulated hospital, class names), for the run report.

    From `dataset`'s labels alone for a single source (images not needed: see
    `central_test_set`); from the cached federation when each hospital has its own files.
    """
    k = len(dataset.class_names)
    if isinstance(config.data.path, list):
        labels = {s.name: s.train_y for s in load_federation(config).shards}
    else:
        _, hospitals = _hospital_indices(dataset, config)
        labels = {hospital_name(i): dataset.train_y[train] for i, (train, _) in enumerate(hospitals)}
    counts = {name: np.bincount(np.asarray(y, dtype=np.int64), minlength=k).tolist() for name, y in labels.items()}
    return counts, [str(c) for c in dataset.class_names]
