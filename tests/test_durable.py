"""Durable writes: the bytes and the name that points at them are both on disk before we go on."""
import os
import stat

import pytest

from client.odometer import PrivacyOdometer
from common.durable import append_line, replace_file
from common.privacy import PrivacyEvent


@pytest.fixture
def synced(monkeypatch):
    """Record what every os.fsync call flushed: ("dir", path) or ("file", path)."""
    calls = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        kind = "dir" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"
        calls.append((kind, os.path.realpath(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the synced descriptors")
def test_replace_file_syncs_the_file_then_its_directory(tmp_path, synced):
    target = tmp_path / "sub" / "state.json"
    replace_file(target, b"first")
    replace_file(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]  # no temporary left behind
    directory = os.path.realpath(target.parent)
    assert [kind for kind, _ in synced] == ["file", "dir", "file", "dir"]
    assert synced[1][1] == synced[3][1] == directory  # the rename is made durable each time


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the synced descriptors")
def test_append_line_syncs_the_directory_only_when_it_creates_the_file(tmp_path, synced):
    path = tmp_path / "ledger.jsonl"
    append_line(path, "one")
    append_line(path, "two")
    assert path.read_text() == "one\ntwo\n"
    assert synced == [("file", os.path.realpath(path)), ("dir", os.path.realpath(tmp_path)),
                      ("file", os.path.realpath(path))]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the synced descriptors")
def test_an_odometers_first_charge_is_named_on_disk_before_training(tmp_path, synced):
    # A charge whose file name is lost in a power cut would let the hospital spend its budget again.
    odometer = PrivacyOdometer(tmp_path / "odometer.jsonl", "hospital-0", 10.0, 1e-5)
    assert odometer.reserve(PrivacyEvent(1.0, 0.1, 30), run=1, round_number=1).charged
    directory = os.path.realpath(tmp_path)
    odometer_file = os.path.realpath(tmp_path / "odometer.jsonl")
    first_dir_sync = synced.index(("dir", directory))
    assert ("file", odometer_file) in synced[:first_dir_sync]
