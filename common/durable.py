"""Writes that are on disk before the program goes on: a file replaced whole, or a line appended.

The odometer's charge must be durable before an update leaves the hospital, and the ledger,
split and checkpoints must survive a crash in one piece. fsync of the file makes its bytes
durable, but not the directory entry that names it: after a power cut a file created (or
renamed into place) just before can be missing, and a missing odometer would let a hospital
spend its budget twice. So both writers also fsync the directory when they change it.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

# A write that fails for lack of space: ENOSPC, or EDQUOT when a quota is what is full.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_WORDS = "no space left on the device"  # in every disk-full line (disk_full_line)
BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise translate newlines


def replace_file(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory.

    Readers see the old file or the new one, never half of one. The temporary name carries
    the process id, so two processes replacing the same file never share one.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | BINARY, 0o666)
            try:
                _write_all(descriptor, data)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(temporary, path)
        except BaseException as error:
            # A full disk (or a kill's KeyboardInterrupt) must not leave half a file beside the
            # real one: the old file stands, and nothing else is left.
            _remove_quietly(temporary)
            if isinstance(error, OSError) and error.filename == str(temporary):
                error.filename = str(path)  # the temporary name means nothing to the user
            raise
        sync_directory(path.parent)


def append_line(path: str | Path, line: str) -> None:
    """Append `line` and a newline to `path` and fsync it (and its directory when the file is new)."""
    path = Path(path)
    created = not path.exists()
    with naming(path):
        # Unbuffered: a buffered file would write its rest again when closed after a failure.
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | BINARY, 0o666)
        try:
            whole = os.fstat(descriptor).st_size  # every line before this one is whole
            try:
                _write_all(descriptor, (line + "\n").encode("utf-8"))
                os.fsync(descriptor)
            except OSError:
                # A disk that fills mid-line would leave half a JSON line, and every later
                # reader of the file (the ledger, an odometer) would refuse it: cut it off.
                _truncate_quietly(descriptor, whole)
                raise
        finally:
            os.close(descriptor)
        if created:
            sync_directory(path.parent)


def sync_directory(directory: str | Path) -> None:
    """fsync a directory, so the names created or renamed in it survive a crash (POSIX only)."""
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals its metadata
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        # Some file systems (several network and FUSE ones) cannot sync a directory; the file's
        # own fsync is then all there is, and refusing to write would only stop the hospital.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def is_disk_full(error: BaseException) -> bool:
    """Did this write fail because the file system (or the user's quota) is full?"""
    return isinstance(error, OSError) and error.errno in NO_SPACE


def disk_full_line(error: OSError) -> str:
    """One line for the user: which file could not be written, and that the disk is full."""
    where = error.filename or "a file of the run"
    return f"cannot write {where}: {DISK_FULL_WORDS}"


@contextlib.contextmanager
def naming(path: Path):
    """Make an OSError raised inside name `path`: a failed write() or fsync() names no file,
    and a user told "no space left" needs to know where."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise


def _write_all(descriptor: int, data: bytes) -> None:
    """os.write until every byte is written (one call may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def _truncate_quietly(descriptor: int, length: int) -> None:
    try:
        os.ftruncate(descriptor, length)  # needs no free space
    except OSError:
        pass  # a file that cannot be cut (a device such as /dev/full) holds no half line either


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # never created, or the directory itself is gone: nothing is left either way
