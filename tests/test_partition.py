"""common/partition.py: coverage, skew statistics, determinism and the refusals."""
import numpy as np
import pytest

from common.errors import UserError
from common.partition import (check_shards, holdout_split, hospital_table, label_skew, partition,
                              split_test)

# 10 balanced classes, 2,000 examples: a stand-in for a small image data set's labels.
LABELS = np.repeat(np.arange(10), 200)
np.random.default_rng(123).shuffle(LABELS)


def shard_labels(shards, labels=LABELS):
    return [labels[s] for s in shards]


def assert_exact_cover(shards, n):
    joined = np.concatenate(shards)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))  # all, no overlap
    for s in shards:
        assert s.dtype == np.int64 and np.all(np.diff(s) > 0)  # sorted, unique


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
@pytest.mark.parametrize("hospitals", [1, 3, 10])
def test_every_example_in_exactly_one_hospital(scheme, hospitals):
    shards = partition(LABELS, hospitals, scheme, alpha=0.3, seed=7, min_size=5)
    assert len(shards) == hospitals
    assert_exact_cover(shards, len(LABELS))
    assert min(len(s) for s in shards) >= 5


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_same_seed_same_split_other_seed_other_split(scheme):
    a = partition(LABELS, 5, scheme, alpha=0.5, seed=3)
    b = partition(LABELS, 5, scheme, alpha=0.5, seed=3)
    c = partition(LABELS, 5, scheme, alpha=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def mean_skew(scheme, alpha, seeds=range(5)):
    return np.mean([label_skew(shard_labels(partition(LABELS, 10, scheme, alpha=alpha, seed=s)), 10)
                    for s in seeds])


def test_label_skew_ordered_by_alpha():
    iid = mean_skew("iid", 0.5)
    strong, mild, weak = mean_skew("dirichlet", 0.1), mean_skew("dirichlet", 1.0), mean_skew("dirichlet", 100.0)
    quantity = mean_skew("quantity", 0.5)
    # iid shards of 200 differ from the global mix only by sampling noise (~0.07).
    assert iid < 0.12 and weak < 0.12 and quantity < 0.2
    assert strong > 0.5, strong  # alpha 0.1: hospitals dominated by a few classes
    assert strong > mild + 0.15 and mild > weak + 0.1


def test_small_alpha_gives_few_classes_per_hospital():
    shards = partition(LABELS, 10, "dirichlet", alpha=0.1, seed=0)
    top_share = [np.bincount(y, minlength=10).max() / len(y) for y in shard_labels(shards)]
    assert np.median(top_share) > 0.4  # iid would be about 0.1


def test_quantity_skew_uneven_sizes_iid_labels():
    sizes = [len(s) for s in partition(LABELS, 10, "quantity", alpha=0.5, seed=1, min_size=20)]
    assert min(sizes) >= 20 and max(sizes) > 2.5 * min(sizes)
    iid_sizes = [len(s) for s in partition(LABELS, 10, "iid", seed=1)]
    assert max(iid_sizes) - min(iid_sizes) <= 1


def test_impossible_requests_are_refused():
    with pytest.raises(UserError, match="data.alpha"):
        # 210 examples, 40 hospitals of at least 5: only a near-even split works, not alpha 0.01.
        partition(np.repeat(np.arange(10), 21), 40, "dirichlet", alpha=0.01, seed=0, min_size=5)
    with pytest.raises(UserError, match="lower the number of hospitals"):
        partition(np.arange(5) % 2, 6, "iid")
    with pytest.raises(UserError, match="data.alpha"):
        partition(LABELS, 3, "dirichlet", alpha=0.0)
    with pytest.raises(UserError, match="data.partition"):
        partition(LABELS, 3, "pathological")
    with pytest.raises(UserError, match="hospitals"):
        partition(LABELS, 0, "iid")


def test_holdout_split():
    idx = np.arange(100, 150)
    train, ev = holdout_split(idx, 0.2, seed=0)
    assert len(ev) == 10 and len(train) == 40
    assert np.array_equal(np.sort(np.concatenate([train, ev])), idx)
    again = holdout_split(idx, 0.2, seed=0)
    assert np.array_equal(again[1], ev)
    train0, ev0 = holdout_split(idx, 0.0, seed=0)
    assert len(ev0) == 0 and np.array_equal(train0, idx)
    # A tiny positive fraction still holds out one example, and never all of them.
    assert len(holdout_split(idx[:3], 0.01, seed=0)[1]) == 1
    assert len(holdout_split(idx[:2], 0.9, seed=0)[0]) == 1
    with pytest.raises(UserError):
        holdout_split(idx, 1.0, seed=0)


def test_split_test_plain_and_stratified():
    train, test = split_test(1000, 0.2, seed=0)
    assert len(test) == 200 and len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1000
    train, test = split_test(len(LABELS), 0.25, seed=0, labels=LABELS)
    assert np.bincount(LABELS[test], minlength=10).tolist() == [50] * 10
    assert len(np.union1d(train, test)) == len(LABELS)
    with pytest.raises(UserError):
        split_test(10, 0.0, seed=0)


def test_label_skew_extremes():
    same = [np.array([0, 1, 2, 3])] * 3
    assert label_skew(same, 4) == pytest.approx(0.0)
    disjoint = [np.array([0, 0]), np.array([1, 1])]
    assert label_skew(disjoint, 2) == pytest.approx(0.5)


def test_hospital_table_readable():
    shards = [np.array([0, 0, 1]), np.array([1, 1, 1, 1, 2])]
    table = hospital_table(shards, ["normal", "pneumonia", "covid"], ["st-marys", "general"])
    lines = table.splitlines()
    assert lines[0].split() == ["hospital", "examples", "normal", "pneumonia", "covid"]
    assert lines[2].split() == ["st-marys", "3", "2", "1", "0"]
    assert lines[3].split() == ["general", "5", "0", "4", "1"]
    assert lines[-1].split() == ["total", "8", "2", "5", "1"]
    assert len({len(l) for l in lines[:2]}) == 1  # header as wide as its rule
    many = hospital_table([np.arange(20) % 15], [f"class{i}" for i in range(15)], ["h0"])
    assert "largest class" in many and "15" in many


def test_check_shards():
    check_shards([np.zeros(32), np.zeros(40)], ["a", "b"], batch_size=32)
    with pytest.raises(UserError, match=r"hospital b has no training examples"):
        check_shards([np.zeros(32), np.zeros(0)], ["a", "b"], batch_size=8)
    with pytest.raises(UserError) as info:
        check_shards([np.zeros(32), np.zeros(10)], ["a", "b"], batch_size=16)
    msg = str(info.value)
    assert "hospital b" in msg and "10" in msg and "train.batch_size" in msg and "\n" not in msg
