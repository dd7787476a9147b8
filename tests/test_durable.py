"""Durable writes: the bytes and the name that points at them are both on disk before we go on."""
import errno
import os
import stat

import pytest

from client.odometer import PrivacyOdometer
from common.durable import append_line, disk_full_line, is_disk_full, replace_file
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


# A real full disk, without root: every write to /dev/full fails with ENOSPC (Linux).
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")


@needs_dev_full
def test_a_replace_on_a_full_disk_names_the_file_keeps_the_old_one_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    replace_file(target, b"old")
    # The temporary file's name is this process's: point it at /dev/full, as if the disk were full.
    (tmp_path / f".state.json.{os.getpid()}.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError) as caught:
        replace_file(target, b"new")
    assert is_disk_full(caught.value) and caught.value.filename == str(target)
    assert disk_full_line(caught.value) == f"cannot write {target}: no space left on the device"
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no stray temporary


@needs_dev_full
def test_an_append_on_a_full_disk_names_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.symlink_to("/dev/full")
    with pytest.raises(OSError) as caught:
        append_line(path, '{"round": 2}')
    assert is_disk_full(caught.value) and caught.value.filename == str(path)


def test_an_append_cut_short_by_a_full_disk_leaves_no_half_line(tmp_path, monkeypatch):
    # The disk fills in the middle of a line: write() puts down a few bytes, then ENOSPC.
    path = tmp_path / "ledger.jsonl"
    append_line(path, '{"round": 1}')
    real_write = os.write

    def fills_up(descriptor, data):
        if len(data) > 4:
            return real_write(descriptor, bytes(data[:4]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", fills_up)
    with pytest.raises(OSError) as caught:
        append_line(path, '{"round": 2}')
    monkeypatch.undo()
    assert is_disk_full(caught.value)
    assert path.read_text() == '{"round": 1}\n'  # every line whole
