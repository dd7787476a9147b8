"""Exact duplicate images, and which images must stay together when a data set is split.

Published medical sets hold a handful of exact duplicates (the same file under two names, one
image exported twice). Dealt to two simulated hospitals, one image is then in both shards: the
shard registry (client/shards.py) rightly charges each shard for the other's spend, which no
hospital's plan foresaw. Dealt to both sides of a test split, it inflates the reported accuracy.
So duplicates are found when the data is loaded, by the content of the decoded image (its pixels
as the model sees them, after resizing: the same bytes the odometer's example hashes cover), and
every split keeps each group whole:

- "group" (the default): every set of identical training images, and every patient's images
  where the source names patients, form one group; partitions and splits move whole groups.
  Test images identical to a training image (or of a training patient) are left out of the test set.
- "drop": only the first image of each identical set is kept (in train, then in test); a test
  image identical to a training one is dropped. Patients still form groups.

`grouped(dataset, policy)` applies the policy once, at load time; `Dataset.train_groups` then
holds one group id per training image, and common/partition.py splits by it.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from common.dataset import Dataset

POLICIES = ("group", "drop")


def image_hashes(x: np.ndarray) -> list[str]:
    """One SHA-256 (128 bits, hex) per image over its pixels, shape and dtype (the label is not part of it)."""
    x = np.ascontiguousarray(x)
    form = f"{x.dtype.str}{x.shape[1:]}|".encode()
    return [hashlib.sha256(form + x[i].tobytes()).hexdigest()[:32] for i in range(len(x))]


def group_ids(keys: list[list]) -> np.ndarray:
    """One id per item such that items sharing any key share an id; ids 0, 1, ... in order of first item.

    `keys[i]` lists item i's keys (its image hash, its patient). Union-find over items: with no
    shared key the ids are 0..N-1 in order, so a set without duplicates splits exactly as before.
    """
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}
    for item, item_keys in enumerate(keys):
        for key in item_keys:
            if key is None:
                continue
            other = first.setdefault(key, item)
            a, b = root(item), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    renumber: dict[int, int] = {}
    return np.array([renumber.setdefault(root(i), len(renumber)) for i in range(len(keys))], dtype=np.int64)


def _keys(hashes: list[str], patients) -> list[list]:
    if patients is None:
        return [[("image", h)] for h in hashes]
    return [[("image", h), ("patient", str(p))] for h, p in zip(hashes, patients)]


def grouped(dataset: Dataset, policy: str = "group") -> Dataset:
    """`dataset` with its duplicates handled by `policy` and `train_groups` set; notes say what was found."""
    if policy not in POLICIES:
        raise ValueError(f"duplicates policy must be one of {POLICIES}, got {policy!r}")
    train_hashes = image_hashes(dataset.train_x)
    notes = list(dataset.notes)
    train_x, train_y, train_patients = dataset.train_x, dataset.train_y, dataset.train_patients
    identical = group_ids([[("image", h)] for h in train_hashes])
    sizes = np.bincount(identical)
    repeated = int((sizes > 1).sum())
    copies = int(sizes[sizes > 1].sum()) - repeated  # images beyond the first of each identical set
    if policy == "drop" and copies:
        keep = np.sort(np.unique(identical, return_index=True)[1])
        train_x, train_y = train_x[keep], train_y[keep]
        train_patients = None if train_patients is None else train_patients[keep]
        train_hashes = [train_hashes[i] for i in keep]
        notes.append(f"dropped {copies} duplicate image(s): {repeated} set(s) of identical training images "
                     "kept their first image only (data.duplicates=drop)")
    elif repeated:
        notes.append(f"found {repeated} set(s) of identical training images ({repeated + copies} images): each set "
                     "stays in one hospital and on one side of every split (data.duplicates=group)")
    groups = group_ids(_keys(train_hashes, train_patients))
    sets = None  # each training image's identical set when it has copies (-1: unique), for the hospital table
    if policy == "group" and repeated:
        sets = np.where(sizes[identical] > 1, identical, -1)

    test_x, test_y, test_patients = dataset.test_x, dataset.test_y, dataset.test_patients
    if test_x is not None and len(test_x):
        test_hashes = image_hashes(test_x)
        seen = set(train_hashes)
        known_patients = set() if train_patients is None else set(map(str, train_patients))
        keep = []
        for i, h in enumerate(test_hashes):
            patient = None if test_patients is None else str(test_patients[i])
            if h in seen or (patient is not None and patient in known_patients):
                continue
            if policy == "drop":
                seen.add(h)  # later identical test images go too
            keep.append(i)
        left_out = len(test_hashes) - len(keep)
        if left_out:
            keep = np.array(keep, dtype=np.int64)
            test_x, test_y = test_x[keep], test_y[keep]
            test_patients = None if test_patients is None else test_patients[keep]
            notes.append(f"left {left_out} test image(s) out of the test split: identical to a training image "
                         f"{'or another test image ' if policy == 'drop' else ''}(or of a training patient), they "
                         "would inflate the test accuracy")
    return dataclasses.replace(dataset, train_x=train_x, train_y=train_y, train_patients=train_patients,
                               test_x=test_x, test_y=test_y, test_patients=test_patients, notes=notes,
                               train_groups=groups, identical_sets=sets)


def sets_within(identical_sets: np.ndarray | None, members: np.ndarray) -> int:
    """How many sets of identical images lie among `members` (indices into the training images)."""
    if identical_sets is None or len(members) == 0:
        return 0
    ids = identical_sets[members]
    return len(np.unique(ids[ids >= 0]))


def subset(dataset: Dataset, keep: np.ndarray) -> Dataset:
    """`dataset` with only the training images at `keep`, their labels, patients and groups with them."""
    def take(a):
        return None if a is None else a[keep]

    return dataclasses.replace(dataset, train_x=dataset.train_x[keep], train_y=dataset.train_y[keep],
                               train_patients=take(dataset.train_patients), train_groups=take(dataset.train_groups),
                               identical_sets=take(dataset.identical_sets))


def across_hospitals(datasets: list[Dataset], names: list[str]) -> list[Dataset]:
    """One file or folder per hospital: an image already in an earlier hospital's data is left out of later ones.

    Hospitals hold disjoint data (DESIGN.md); the same image in two of them would be one patient
    in both, charged by neither hospital's plan."""
    seen: set[str] = set()
    out = []
    for name, dataset in zip(names, datasets):
        hashes = image_hashes(dataset.train_x)
        keep = np.array([h not in seen for h in hashes], dtype=bool)
        seen.update(hashes)
        if not keep.all():
            dataset = subset(dataset, np.flatnonzero(keep))
            dataset.notes = dataset.notes + [f"left {int((~keep).sum())} image(s) out of {name}'s data: identical to "
                                             "images of an earlier hospital's (one image, one hospital)"]
        out.append(dataset)
    return out


def privacy_units(patients: np.ndarray | None, groups: np.ndarray | None) -> np.ndarray | None:
    """Dense unit ids 0..P-1 for the training images, or None when the data names no patient.

    The unit is the image's group: its patient, joined with any other patient holding an
    identical image (the copy is one record of both), so a unit's clipped contribution bounds
    every one of its patients' whole contribution."""
    if patients is None or groups is None:
        return None
    return np.unique(groups, return_inverse=True)[1].astype(np.int64)
