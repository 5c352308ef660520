"""``StoreMeta``: what a store holds (``store.json``), identical on every node of a job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshuffle.store import format as fmt


@dataclass(frozen=True)
class StoreMeta:
    """What a store holds; identical in ``store.json`` on every node of a job."""

    world_size: int
    num_samples: int
    num_classes: int
    dataset: dict[str, Any]  # name, split and anything else that identifies the source
    plan: dict[str, Any]  # the planner configuration the store follows

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "reshuffle-store",
            "version": fmt.FORMAT_VERSION,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "dataset": self.dataset,
            "plan": self.plan,
        }

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
        )

    def mismatch(self, other: StoreMeta) -> str | None:
        """Why a store written with ``other`` cannot serve this job, or None."""
        if other.world_size != self.world_size:
            return (
                f"the store was written for world size {other.world_size}, this job has {self.world_size}; "
                f"run with {other.world_size} ranks, or point shuffle.store_dir at an empty directory "
                "to restage"
            )
        for name in ("num_samples", "num_classes", "dataset", "plan"):
            if getattr(other, name) != getattr(self, name):
                return (
                    f"the store holds {name} {getattr(other, name)!r}, "
                    f"this job expects {getattr(self, name)!r}; "
                    "point shuffle.store_dir at a new directory (or delete this one) to restage"
                )
        return None


def read_meta(root: Path) -> StoreMeta:
    path = root / fmt.STORE_FILE
    return StoreMeta.from_json(fmt.read_json(path, "store description"), path)
