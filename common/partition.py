"""Splitting one data set into simulated hospitals, and each hospital's held-out split.

Schemes (`partition(..., scheme=...)`):
- "iid": a shuffled, equal split; every hospital sees the global label mix.
- "dirichlet": label skew. For each class, the share each hospital receives is drawn from
  Dirichlet(alpha, ..., alpha); small alpha (0.1) gives hospitals dominated by one or two
  classes, large alpha (100) approaches iid.
- "quantity": quantity skew. Hospital sizes follow Dirichlet(alpha) proportions (after
  every hospital is given `min_size` examples); labels are iid within each hospital.

Every split takes optional `groups` (one id per example: common/duplicates.py gives identical
images, and one patient's images, one id) and then moves whole groups: a group is never in two
hospitals, nor on both sides of a test or evaluation split. Without groups, or when every group
is a single example, the result is exactly the per-example split.

Everything is a pure function of its arguments and `seed`: the same call gives the same
split in the coordinator, in every simulated client process and in the tests.
"""
from __future__ import annotations

import numpy as np

from common.errors import UserError
from common.sampling import expected_batch_size

SCHEMES = ("iid", "dirichlet", "quantity")
_MAX_TRIES = 1000  # Dirichlet redraws before we tell the user the request is unrealistic


def _units(groups) -> tuple[np.ndarray, np.ndarray]:
    """(each example's unit, each unit's first example): units are the groups in order of first example."""
    ids, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)], first[order]


def _members(unit_of: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Sorted indices of the examples in `units`."""
    return np.flatnonzero(np.isin(unit_of, units)).astype(np.int64)


def partition(labels: np.ndarray, num_hospitals: int, scheme: str, *, alpha: float = 0.5,
              seed: int = 0, min_size: int = 1, groups=None) -> list[np.ndarray]:
    """Split example indices 0..N-1 among hospitals; one sorted int64 array per hospital.

    Every example lands in exactly one hospital and every hospital gets at least
    `min_size` examples, or UserError says which setting to change. With `groups`, whole
    groups are dealt, each by the label of its first example.
    """
    if groups is not None:
        unit_of, firsts = _units(groups)
        parts = partition(np.asarray(labels)[firsts], num_hospitals, scheme, alpha=alpha, seed=seed,
                          min_size=min_size)
        return [_members(unit_of, part) for part in parts]
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} {labels.dtype}")
    if scheme not in SCHEMES:
        raise UserError(f"data.partition is {scheme!r}; use one of {', '.join(SCHEMES)}")
    if isinstance(num_hospitals, bool) or int(num_hospitals) != num_hospitals or num_hospitals < 1:
        raise UserError(f"the number of hospitals is {num_hospitals!r}; use a whole number >= 1")
    if scheme != "iid" and not (np.isfinite(alpha) and alpha > 0):
        raise UserError(f"data.alpha is {alpha!r}; use a positive number (0.1 strong skew, "
                        "100 nearly iid)")
    num_hospitals, min_size = int(num_hospitals), max(int(min_size), 0)
    n = len(labels)
    if n < num_hospitals * max(min_size, 1):
        raise UserError(f"{n} examples cannot give {num_hospitals} hospitals at least "
                        f"{max(min_size, 1)} example(s) each; lower the number of hospitals")
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        shards = np.array_split(rng.permutation(n), num_hospitals)
    elif scheme == "quantity":
        # Give each hospital its minimum first, then split the rest by Dirichlet shares:
        # this always succeeds and keeps the skew, where redrawing would rarely succeed
        # for small alpha and many hospitals.
        sizes = min_size + _split_counts(n - num_hospitals * min_size,
                                         rng.dirichlet(np.full(num_hospitals, float(alpha))))
        shards = np.split(rng.permutation(n), np.cumsum(sizes)[:-1])
    else:
        shards = _dirichlet_label_skew(labels, num_hospitals, float(alpha), min_size, rng)
    return [np.sort(s).astype(np.int64) for s in shards]


def _split_counts(total, proportions):
    """Integer counts summing to `total`, following `proportions` (floor of the cumulative sum)."""
    cuts = np.floor(np.cumsum(proportions) * total).astype(np.int64)
    cuts[-1] = total  # the float cumulative sum can end at 0.9999...
    return np.diff(cuts, prepend=0)


def _dirichlet_label_skew(labels, num_hospitals, alpha, min_size, rng):
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    class_sizes = np.array([len(i) for i in by_class])
    # Draw counts only (cheap) and redraw until every hospital is large enough; the indices
    # are shuffled once, for the accepted draw.
    for _ in range(_MAX_TRIES):
        props = rng.dirichlet(np.full(num_hospitals, alpha), size=len(classes))  # (K, H)
        counts = np.stack([_split_counts(m, p) for m, p in zip(class_sizes, props)])  # (K, H)
        if counts.sum(axis=0).min() >= min_size:
            break
    else:
        raise UserError(f"label-skew partition with data.alpha={alpha:g} could not give each of "
                        f"{num_hospitals} hospitals at least {max(min_size, 1)} example(s) in "
                        f"{_MAX_TRIES} draws; raise data.alpha or lower the number of hospitals")
    shards = [[] for _ in range(num_hospitals)]
    for idx, row in zip(by_class, counts):
        for h, part in enumerate(np.split(rng.permutation(idx), np.cumsum(row)[:-1])):
            shards[h].append(part)
    return [np.concatenate(parts) for parts in shards]


def holdout_split(indices: np.ndarray, fraction: float, *, seed: int,
                  groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Split one hospital's indices into (train, eval) for federated evaluation.

    `fraction` in [0, 1): the share held out. 0 gives an empty eval split. When it is
    positive and the hospital has two or more examples (groups), both parts are non-empty.
    Pass a different seed per hospital (e.g. run seed + hospital number). `groups`, one per
    entry of `indices`, keeps each group on one side.
    """
    if groups is not None:
        indices = np.asarray(indices, dtype=np.int64)
        unit_of, firsts = _units(groups)
        train, held = holdout_split(np.arange(len(firsts)), fraction, seed=seed)
        return indices[_members(unit_of, train)], indices[_members(unit_of, held)]
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"the local evaluation fraction is {fraction!r}; use a value in [0, 1) "
                        "(0 turns local evaluation off)")
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    n_eval = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    elif n < 2:
        n_eval = 0
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[n_eval:]), np.sort(shuffled[:n_eval])


def split_test(dataset_len: int, fraction: float, *, seed: int,
               labels: np.ndarray | None = None, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Central (train, test) index split for a source without its own test split.

    With `labels`, the split is stratified: each class keeps about `fraction` of its
    examples in test (a class with a single example stays in train). With `groups`, whole
    groups go to one side (stratified by each group's first label).
    """
    if groups is not None:
        unit_of, firsts = _units(groups)
        train, test = split_test(len(firsts), fraction, seed=seed,
                                 labels=None if labels is None else np.asarray(labels)[firsts])
        return _members(unit_of, train), _members(unit_of, test)
    if not 0.0 < fraction < 1.0:
        raise UserError(f"the test fraction is {fraction!r}; use a value strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    if labels is None:
        n_test = min(max(int(round(fraction * dataset_len)), 1), dataset_len - 1)
        perm = rng.permutation(dataset_len)
        test = perm[:n_test]
    else:
        labels = np.asarray(labels)
        if len(labels) != dataset_len:
            raise ValueError(f"labels has {len(labels)} entries for a data set of {dataset_len}")
        parts = []
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            k = min(int(round(fraction * len(idx))), len(idx) - 1)
            parts.append(idx[:max(k, 0)])
        test = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    if dataset_len < 2 or len(test) == 0:
        raise UserError(f"a test fraction of {fraction:g} of {dataset_len} examples leaves no "
                        "test examples; raise the test fraction or use more data")
    mask = np.zeros(dataset_len, dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def label_skew(shards_labels: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each hospital's label mix and the pooled mix.

    0 means every hospital has exactly the global mix; 1 - 1/K or so means hospitals
    hold disjoint classes. Empty hospitals are left out.
    """
    hists = [np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes)
             for y in shards_labels if len(y)]
    if not hists:
        return 0.0
    hists = np.stack(hists).astype(np.float64)
    pooled = hists.sum(axis=0) / hists.sum()
    local = hists / hists.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(local - pooled).sum(axis=1)))


def hospital_table(shards_labels: list[np.ndarray], class_names: list[str], names: list[str]) -> str:
    """A terminal table: each hospital's example count and its class histogram.

    Up to 10 classes get one count column each; with more, the table shows how many
    classes a hospital holds and its largest class with its share.
    """
    if len(shards_labels) != len(names):
        raise ValueError(f"{len(shards_labels)} shards but {len(names)} names")
    k = len(class_names)
    hists = [np.bincount(np.asarray(y, dtype=np.int64), minlength=k) for y in shards_labels]
    if any(len(h) > k for h in hists):
        raise ValueError(f"labels beyond the {k} class names given")
    total = np.sum(hists, axis=0) if hists else np.zeros(k, dtype=np.int64)
    if k <= 10:
        header = ["hospital", "examples"] + [_clip(c) for c in class_names]

        def cells(label, h):
            return [label, str(int(h.sum()))] + [str(int(v)) for v in h]
    else:
        header = ["hospital", "examples", "classes", "largest class"]

        def cells(label, h):
            n = int(h.sum())
            top = int(np.argmax(h)) if n else 0
            largest = f"{_clip(class_names[top])} ({100 * h[top] / n:.0f}%)" if n else "-"
            return [label, str(n), str(int((h > 0).sum())), largest]

    rows = [header] + [cells(nm, h) for nm, h in zip(names, hists)] + [cells("total", total)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def fmt(r):
        # Names left-aligned, numbers right-aligned so digits line up.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "-" * len(fmt(rows[0]))
    return "\n".join([fmt(rows[0]), rule] + [fmt(r) for r in rows[1:-1]] + [rule, fmt(rows[-1])])


def _clip(text, width=12):
    text = str(text)
    return text if len(text) <= width else text[:width - 1] + "~"


def check_shards(shards_labels: list[np.ndarray], names: list[str], batch_size: int | str) -> None:
    """Refuse a hospital with no training examples or fewer than one batch of them ("auto" never asks for more than n)."""
    if len(shards_labels) != len(names):
        raise ValueError(f"{len(shards_labels)} shards but {len(names)} names")
    for name, y in zip(names, shards_labels):
        n = len(y)
        if n == 0:
            raise UserError(f"hospital {name} has no training examples; use fewer hospitals or "
                            "another partition (data.partition, a larger data.alpha)")
        if n < expected_batch_size(batch_size, n):
            raise UserError(f"hospital {name} has {n} training examples, fewer than one batch "
                            f"(train.batch_size={batch_size}); lower train.batch_size (or set it to auto), use fewer "
                            "hospitals or another partition (data.partition, a larger data.alpha)")
