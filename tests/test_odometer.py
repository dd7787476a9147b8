"""The odometer under a careless operator: races, truncation, deletion, and data that moves."""
import json
import multiprocessing

import numpy as np
import pytest

from client import odometer as odometer_module
from client.odometer import OdometerError, PrivacyOdometer, example_hashes, fingerprint
from common.config import load_config
from common.privacy import PrivacyEvent, epsilon

EVENT = PrivacyEvent(1.0, 0.1, 30)
DELTA = 1e-5


def _racer(path, budget, barrier, results):
    """One process: open the odometer, wait for the other, then try to charge one round."""
    odometer = PrivacyOdometer(path, "hospital-0", budget, DELTA)
    barrier.wait()
    results.put(odometer.reserve(EVENT, run=multiprocessing.current_process().pid, round_number=1).charged)


def test_two_processes_race_for_a_budget_that_fits_one_round(tmp_path):
    one_round = epsilon([EVENT], DELTA)
    budget = (one_round + epsilon([EVENT, EVENT], DELTA)) / 2  # one round fits, two do not
    path = tmp_path / "odometer.jsonl"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    racers = [context.Process(target=_racer, args=(path, budget, barrier, results)) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=300)
        assert racer.exitcode == 0
    outcomes = sorted(results.get(timeout=10) for _ in racers)
    assert outcomes == [False, True]  # exactly one trained
    odometer = PrivacyOdometer(path, "hospital-0", budget, DELTA)
    assert len(odometer.records) == 1
    assert odometer.spent() == pytest.approx(one_round) and odometer.spent() <= budget


def _charged(tmp_path, rounds=3):
    path = tmp_path / "h.jsonl"
    odometer = PrivacyOdometer(path, "h", 100.0, DELTA, data_fingerprint="f" * 64)
    for number in range(1, rounds + 1):
        assert odometer.reserve(EVENT, run=1, round_number=number).charged
    return path


def test_charges_are_chained_and_carry_the_data_fingerprint(tmp_path):
    path = _charged(tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert all(r["data_fingerprint"] == "f" * 64 for r in records)
    assert records[0]["prev"] == "" and records[1]["prev"] != records[2]["prev"]
    odometer_module._SEEN.clear()  # a new process
    assert len(PrivacyOdometer(path, "h", 100.0, DELTA).records) == 3


@pytest.mark.parametrize("damage", ["truncate", "empty", "edit", "drop_middle", "delete"])
def test_a_damaged_odometer_is_refused(tmp_path, damage):
    path = _charged(tmp_path)
    lines = path.read_text().splitlines()
    odometer_module._SEEN.clear()  # a new process: only the files themselves can tell
    if damage == "truncate":
        path.write_text("\n".join(lines[:2]) + "\n")
    elif damage == "empty":
        path.write_text("")
    elif damage == "edit":
        record = json.loads(lines[1])
        record["steps"] = 1  # claims less spend
        path.write_text("\n".join([lines[0], json.dumps(record), lines[2]]) + "\n")
    elif damage == "drop_middle":
        path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    else:
        path.unlink()
    with pytest.raises(OdometerError, match="odometer"):
        PrivacyOdometer(path, "h", 100.0, DELTA)


def test_an_odometer_deleted_mid_run_does_not_restart_at_zero(tmp_path):
    path = _charged(tmp_path)
    odometer = PrivacyOdometer(path, "h", 100.0, DELTA)
    path.unlink()
    path.with_name(path.name + ".head").unlink()  # both gone: only this process remembers
    with pytest.raises(OdometerError, match="deleted or truncated"):
        odometer.reserve(EVENT, run=1, round_number=4)


def test_fingerprint_ignores_order_and_sees_one_changed_pixel():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, 20)
    order = rng.permutation(20)
    assert fingerprint(example_hashes(x, y)) == fingerprint(example_hashes(x[order], y[order]))
    changed = x.copy()
    changed[5, 0, 0, 0] ^= 1
    assert fingerprint(example_hashes(changed, y)) != fingerprint(example_hashes(x, y))
    assert fingerprint(example_hashes(x, 1 - y)) != fingerprint(example_hashes(x, y))


def test_simulated_accounting_follows_the_images(tmp_path):
    """A rerun with another seed and number of hospitals starts from every image's earlier use."""
    from client.task import simulation_site

    directory = f"privacy.odometer_dir={tmp_path}"
    first = load_config(None, [directory, "hospitals=2", "seed=0", "train.batch_size=16", "privacy.max_epsilon=8"])
    first_sites = [simulation_site(first, i) for i in range(2)]
    assert first_sites[0].odometer.reserve(EVENT, run=1, round_number=1).charged
    # In the same run the other hospital holds other images: nothing of hospital-0's counts.
    assert simulation_site(first, 1).odometer.events() == []
    used = set(example_hashes(first_sites[0].train_x, first_sites[0].train_y))

    second = load_config(None, [directory, "hospitals=3", "seed=1", "train.batch_size=16", "privacy.max_epsilon=8"])
    overlapping = 0
    for index in range(3):
        site = simulation_site(second, index)
        shares = bool(used & set(example_hashes(site.train_x, site.train_y)))
        overlapping += shares
        assert site.odometer.prior_events(run=2) == ([EVENT] if shares else [])
    assert overlapping >= 1


def test_per_name_odometers_of_an_earlier_version_are_not_ignored(tmp_path):
    from client.task import simulation_site

    (tmp_path / "hospital-0.jsonl").write_text(json.dumps(EVENT.to_dict() | {"run": 1, "round": 1}) + "\n")
    config = load_config(None, [f"privacy.odometer_dir={tmp_path}", "hospitals=2", "train.batch_size=16"])
    with pytest.raises(OdometerError, match="earlier version"):
        simulation_site(config, 0)


def test_a_charge_that_cannot_be_written_refuses_training_as_an_odometer_failure(tmp_path, monkeypatch):
    import errno

    import client.odometer as odometer_module

    odometer = PrivacyOdometer(tmp_path / "odo.jsonl", "h", max_epsilon=8.0, delta=1e-5)
    assert odometer.reserve(EVENT, run=1, round_number=1).charged

    def full(path, line):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(odometer_module, "append_line", full)
    with pytest.raises(OdometerError, match="cannot be written \\(No space left on device\\)") as info:
        odometer.reserve(EVENT, run=1, round_number=2)
    assert info.value.category == "odometer"
    monkeypatch.undo()
    again = PrivacyOdometer(tmp_path / "odo.jsonl", "h", max_epsilon=8.0, delta=1e-5)
    assert len(again.records) == 1  # nothing half-written, and the file still reads
    assert again.reserve(EVENT, run=1, round_number=2).charged


def test_the_same_npz_named_by_another_path_and_prepared_at_another_size_inherits_the_spend(tmp_path, monkeypatch):
    """Issue 25 item 2: a relative path at the native size, then a symlink's absolute path at 32x32."""
    from client.task import simulation_site

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "scans.npz", train_images=rng.integers(0, 255, (120, 28, 28), dtype=np.uint8),
             train_labels=rng.integers(0, 2, (120, 1)), test_images=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
             test_labels=rng.integers(0, 2, (20, 1)))
    (tmp_path / "elsewhere").symlink_to(data)
    odometer = f"privacy.odometer_dir={tmp_path / 'odometer'}"
    common = [odometer, "hospitals=1", "data.source=npz", "train.batch_size=16", "privacy.max_epsilon=20"]
    monkeypatch.chdir(tmp_path)
    native = simulation_site(load_config(None, common + ["data.path=data/scans.npz"]), 0)
    assert native.train_x.shape[1:3] == (28, 28)
    assert native.odometer.reserve(EVENT, run=1, round_number=1).charged

    resized = simulation_site(load_config(None, common + [f"data.path={tmp_path}/elsewhere/scans.npz",
                                                          "data.image_size=32"]), 0)
    assert resized.train_x.shape[1:3] == (32, 32)
    assert resized.odometer.prior_events(run=2) == [EVENT]
    assert resized.odometer.spent() == pytest.approx(epsilon([EVENT], DELTA))

    # The same bytes copied to a new place (no shared path at all) are still the same data.
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "scans.npz").write_bytes((data / "scans.npz").read_bytes())
    copied = simulation_site(load_config(None, common + [f"data.path={tmp_path}/copy/scans.npz",
                                                         "data.image_size=16"]), 0)
    assert copied.odometer.prior_events(run=3) == [EVENT]
    # Other data at another size starts from zero.
    np.savez(tmp_path / "other.npz", train_images=rng.integers(0, 255, (120, 28, 28), dtype=np.uint8),
             train_labels=rng.integers(0, 2, (120, 1)))
    other = simulation_site(load_config(None, common + [f"data.path={tmp_path}/other.npz", "data.image_size=32"]), 0)
    assert other.odometer.prior_events(run=4) == []
