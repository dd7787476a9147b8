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
file is assumed to overlap everything.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from client.odometer import fingerprint
from common.durable import replace_file

log = logging.getLogger("hospital")
_LOADED: dict[str, dict | None] = {}  # shard file contents, per process (a shard id names fixed content)


class ShardRegistry:
    """The shard files of one odometer directory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory).absolute() / "shards"

    def register(self, hashes: list[str], source: str, form: str) -> str:
        """Store this shard's hashes (once) and return its id."""
        shard_id = fingerprint(hashes)[:32]
        path = self.directory / f"{shard_id}.json"
        if not path.exists():
            replace_file(path, json.dumps({"source": source, "form": form, "hashes": sorted(set(hashes))}).encode())
        _LOADED[str(path)] = {"source": source, "form": form, "hashes": frozenset(hashes)}
        return shard_id

    def _load(self, shard_id) -> dict | None:
        path = str(self.directory / f"{shard_id}.json")
        if path not in _LOADED:
            try:
                raw = json.loads(Path(path).read_text(encoding="utf-8"))
                _LOADED[path] = {"source": str(raw["source"]), "form": str(raw["form"]),
                                 "hashes": frozenset(map(str, raw["hashes"]))}
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                log.warning("shard file %s is missing or unreadable: its charges count for every shard", path)
                _LOADED[path] = None
        return _LOADED[path]

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
                return info["source"] == own["source"]
            return not own["hashes"].isdisjoint(info["hashes"])

        return overlaps
