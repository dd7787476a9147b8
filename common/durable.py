"""Writes that are on disk before the program goes on: a file replaced whole, or a line appended.

The odometer's charge must be durable before an update leaves the hospital, and the ledger,
split and checkpoints must survive a crash in one piece. fsync of the file makes its bytes
durable, but not the directory entry that names it: after a power cut a file created (or
renamed into place) just before can be missing, and a missing odometer would let a hospital
spend its budget twice. So both writers also fsync the directory when they change it.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


def replace_file(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory.

    Readers see the old file or the new one, never half of one. The temporary name carries
    the process id, so two processes replacing the same file never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync_directory(path.parent)


def append_line(path: str | Path, line: str) -> None:
    """Append `line` and a newline to `path` and fsync it (and its directory when the file is new)."""
    path = Path(path)
    created = not path.exists()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
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
