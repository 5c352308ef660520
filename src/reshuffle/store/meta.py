"""``StoreMeta``: what a store holds (``store.json``), identical on every node of a job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshuffle.store import format as fmt
from reshuffle.store.checksum import LEGACY, Checksum, checksum


@dataclass(frozen=True)
class StoreMeta:
    """What a store holds; identical in ``store.json`` on every node of a job."""

    world_size: int
    num_samples: int
    num_classes: int
    dataset: dict[str, Any]  # name, split and anything else that identifies the source
    plan: dict[str, Any]  # the planner configuration the store follows
    # How each sample's bytes are checked (checksum.CHECKSUMS): what the store was written with
    # wins over what a job would choose, so stores of earlier versions (crc32) keep reading.
    checksum: str = LEGACY

    def to_json(self) -> dict[str, Any]:
        value = {
            "format": "reshuffle-store",
            "version": fmt.FORMAT_VERSION,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "dataset": self.dataset,
            "plan": self.plan,
        }
        if self.checksum != LEGACY:  # an older store.json stays byte for byte as it was
            value["checksum"] = self.checksum
        return value

    @property
    def checksum_function(self) -> Checksum:
        return checksum(self.checksum)

    @classmethod
    def from_json(cls, value: dict[str, Any], path: Path) -> StoreMeta:
        if value.get("format") != "reshuffle-store" or value.get("version") != fmt.FORMAT_VERSION:
            raise fmt.StoreError(f"{path} is not a reshuffle store (format version {fmt.FORMAT_VERSION})")
        return cls(
            world_size=fmt.manifest_value(value, "world_size", int, path),
            num_samples=fmt.manifest_value(value, "num_samples", int, path),
            num_classes=fmt.manifest_value(value, "num_classes", int, path),
            dataset=fmt.manifest_value(value, "dataset", dict, path),
            plan=fmt.manifest_value(value, "plan", dict, path),
            checksum=str(value.get("checksum", LEGACY)),
        )

    def mismatch(self, other: StoreMeta) -> str | None:
        """Why a store written with ``other`` cannot serve this job, or None (the checksum is the
        store's own choice, not the job's)."""
        if other.world_size != self.world_size:
            return (
                f"the store was written for world size {other.world_size}, this job has {self.world_size}; "
                f"run with {other.world_size} ranks, or {RESTAGE}"
            )
        for name in ("num_samples", "num_classes", "dataset", "plan"):
            theirs, mine = getattr(other, name), getattr(self, name)
            if theirs == mine:
                continue
            if isinstance(theirs, dict) and isinstance(mine, dict):
                differ = "; ".join(
                    f"{name}.{key}: {theirs.get(key)!r} in the store, {mine.get(key)!r} in this job"
                    for key in sorted(set(theirs) | set(mine), key=str)
                    if theirs.get(key) != mine.get(key)
                )
            else:
                differ = f"{name}: {theirs!r} in the store, {mine!r} in this job"
            return f"the store was written for another job ({differ}); {RESTAGE}"
        return None


# How to get a store for this job, in the terms of each caller.
RESTAGE = (
    "point the store directory at a new (or emptied) directory to restage: store_dir= in "
    "ShuffledData, shuffle.store_dir in a config"
)


def read_meta(root: Path) -> StoreMeta:
    path = root / fmt.STORE_FILE
    return StoreMeta.from_json(fmt.read_json(path, "store description"), path)
