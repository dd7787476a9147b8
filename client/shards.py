"""Which simulated shards share images: accounting that follows the images, not the names.

A simulation may be rerun with another partition, seed or number of hospitals: the same
image then lands in another simulated hospital's shard, and its privacy loss composes over
every run that used it. Each shard's example hashes are kept in `<odometer_dir>/shards/<id>.json`
(id: the first 32 hex digits of the shard's fingerprint), and every charge in the shared
odometer names its shard.

The bound is conservative: a shard's spend is the composition of every charge on any shard
that shared at least one image with it (the worst image of the shard is covered, and every
other image is charged at least as much as it truly spent). Hashes are over the loaded
example (its bytes after decoding and resizing): shards whose examples are stored in another
form (dtype or shape, e.g. another `data.image_size`) cannot be compared image by image, so
they are assumed to overlap whenever they come from the same source, and an unreadable shard
file is assumed to overlap everything. "The same source" is decided by content, not by how a
path is spelt: the resolved path, or the same bytes (the file's SHA-256, or a folder's files and
their bytes) wherever they sit (`source_identity`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from client.odometer import fingerprint
from common.durable import replace_file

log = logging.getLogger("hospital")
_LOADED: dict[str, dict | None] = {}  # shard file contents, per process (a shard id names fixed content)
_IDENTITIES: dict[tuple, tuple[str, str]] = {}  # (kind, resolved path, size, mtime) -> identity, per process


def source_identity(kind: str, path: str) -> tuple[str, str]:
    """(the source by its resolved path, the source by its content) of `data.source`, `data.path`.

    The content is the SHA-256 of the file, or for a folder of every file's relative path and
    bytes in sorted order: the same images copied elsewhere, or named through a symlink or a
    relative path, are the same data. Sources without a path (the bundled digits) are their kind.
    """
    if not path:
        return f"{kind}:", f"{kind}:"
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return f"{kind}:{resolved}", f"{kind}:{resolved}"
    key = (kind, str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _IDENTITIES:
        digest = hashlib.sha256()
        files = [resolved] if resolved.is_file() else sorted(p for p in resolved.rglob("*") if p.is_file())
        for file in files:
            digest.update(os.fsencode(file.relative_to(resolved)) if file != resolved else b"")
            with open(file, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        _IDENTITIES[key] = (f"{kind}:{resolved}", f"{kind}:sha256:{digest.hexdigest()}")
    return _IDENTITIES[key]


class ShardRegistry:
    """The shard files of one odometer directory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory).absolute() / "shards"

    def register(self, hashes: list[str], source: tuple[str, str], form: str) -> str:
        """Store this shard's hashes (once) and return its id. `source`: source_identity()."""
        shard_id = fingerprint(hashes)[:32]
        path = self.directory / f"{shard_id}.json"
        located, content = source
        stored = self._load(shard_id) if path.exists() else None
        if stored is None or stored["form"] != form or not stored["content"]:
            # New, or written by an earlier version without a content identity: (re)write it.
            replace_file(path, json.dumps({"source": located, "content": content, "form": form,
                                           "hashes": sorted(set(hashes))}).encode())
        _LOADED[str(path)] = {"source": located, "content": content, "form": form, "hashes": frozenset(hashes)}
        return shard_id

    def _load(self, shard_id) -> dict | None:
        path = str(self.directory / f"{shard_id}.json")
        if path not in _LOADED:
            try:
                raw = json.loads(Path(path).read_text(encoding="utf-8"))
                _LOADED[path] = {"source": _located(str(raw["source"])), "content": str(raw.get("content", "")),
                                 "form": str(raw["form"]), "hashes": frozenset(map(str, raw["hashes"]))}
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                log.warning("shard file %s is missing or unreadable: its charges count for every shard", path)
                _LOADED[path] = None
        return _LOADED[path]

    def distinct_examples(self, shard_id: str) -> int | None:
        """How many distinct examples the shard holds (None when its file is unreadable)."""
        info = self._load(shard_id)
        return None if info is None else len(info["hashes"])

    def overlap_filter(self, shard_id: str):
        """record -> True when the record's charge was spent on data sharing an example with this shard."""
        own = self._load(shard_id)

        def overlaps(record: dict) -> bool:
            other = record.get("shard")
            if not isinstance(other, str) or other == shard_id:
                return True  # this shard, or a charge that does not say which data: counted
            info = self._load(other)
            if info is None or own is None:
                return True
            if info["form"] != own["form"]:
                return info["source"] == own["source"] or bool(info["content"]) and info["content"] == own["content"]
            return not own["hashes"].isdisjoint(info["hashes"])

        return overlaps


def _located(source: str) -> str:
    """An earlier version stored `kind:path` as spelt: resolve it (from here) to compare."""
    kind, _, path = source.partition(":")
    return f"{kind}:{Path(path).expanduser().resolve()}" if path and not path.startswith("/") else source
