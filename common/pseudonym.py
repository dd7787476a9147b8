"""Patient pseudonyms: a keyed SHA-256 of each raw patient id, with a secret that never leaves the node.

A loader that learns which images belong to one patient (a labels table's patient column, the
PatientID of DICOM files) keeps only `pseudonymise(ids, data_path)`, never the raw ids: the
pseudonym groups a patient's images (common/duplicates.py keeps them together through every
split and partition) and says nothing about who the patient is.

The key (the "salt") is a random secret created once per data set with `secrets` and kept in a
file beside it, `.<name>.salt` (for a table `labels.csv`: `.labels.csv.salt` in its folder; for
an image folder ROOT: `ROOT/.patients.salt`), so that the same patient gets the same pseudonym
in every run and process on this node: a resumed run splits exactly as before. Where that
folder is read-only, the secret lives in this user's data folder (platformdirs) under a name
derived from the data set's absolute path. A new secret makes new pseudonyms; nothing else changes.
The pseudonym is an HMAC, not a bare hash of the id: without the secret, nobody can link it to
an id by hashing guessed ids (patient ids are short and often sequential).
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
from pathlib import Path

PSEUDONYM_HEX = 16  # 64 bits: collisions are negligible for any hospital's number of patients


def pseudonymise(ids, data_path) -> list[str]:
    """One pseudonym per raw id (str), keyed by the secret of the data set at `data_path`."""
    key = bytes.fromhex(salt_for(data_path))
    return [hmac.new(key, str(i).encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX] for i in ids]


def salt_for(data_path) -> str:
    """The data set's secret (hex), created on first use: beside the data, else in the user's data folder."""
    data_path = Path(data_path).resolve()
    if data_path.is_dir():
        beside = data_path / ".patients.salt"
    else:
        beside = data_path.parent / f".{data_path.name}.salt"
    if beside.exists():
        return _read(beside)
    try:
        return _create_once(beside)
    except OSError as err:  # a read-only folder says EACCES (or EPERM), a read-only file system EROFS
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    from platformdirs import user_data_dir

    digest = hashlib.sha256(str(data_path).encode("utf-8")).hexdigest()[:24]
    return _create_once(Path(user_data_dir("hospital-fl")) / "salts" / f"{digest}.salt")


def _read(path: Path) -> str:
    text = path.read_text().strip()
    bytes.fromhex(text)  # a damaged secret file fails here rather than keying with garbage
    return text


def _create_once(path: Path) -> str:
    """Write a fresh secret at `path` unless one is there, atomically: concurrent loaders agree on one."""
    if path.exists():
        return _read(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # a secret: readable by this user only
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process linked its secret first; then use that one
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)
