"""A rank's committed (``manifest.json``) or prepared (``prepared.json``) state, read and checked
before a store trusts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reshuffle.store import format as fmt
from reshuffle.store.meta import StoreMeta


def parse_state(
    manifest: dict[str, Any], path: Path, directory: Path, rank: int, meta: StoreMeta
) -> tuple[int, int, np.ndarray]:
    """A committed or prepared state of rank ``rank``'s store in ``directory`` (``manifest``, read
    from ``path``), checked against the store's ``meta``: ``(epoch, generation, index records)``.

    Raises:
        StoreError: naming what does not match (another rank or world size, an index that does
            not match its manifest, ids or labels out of range, a pack the manifest does not list).
    """
    if manifest.get("format") != "reshuffle-rank-store":
        raise fmt.StoreError(f"{path} is not a rank manifest")
    for key, expected in (("rank", rank), ("world_size", meta.world_size)):
        if fmt.manifest_value(manifest, key, int, path) != expected:
            raise fmt.StoreError(
                f"{path} was written for {key} {manifest[key]}, not {expected}: "
                "the store was written for another world size or its rank directories were moved"
            )
    epoch = fmt.manifest_value(manifest, "epoch", int, path)
    generation = fmt.manifest_value(manifest, "generation", int, path)
    index = fmt.manifest_value(manifest, "index", str, path)
    if fmt.index_generation(index) != generation:
        raise fmt.StoreError(f"{path}: index file name {index!r} does not match generation {generation}")
    records = fmt.read_index(
        fmt.inside(directory, index), fmt.manifest_value(manifest, "index_sha256", str, path)
    )
    if records.size != fmt.manifest_value(manifest, "count", int, path):
        raise fmt.StoreError(
            f"{path}: the index holds {records.size} records, the manifest says {manifest['count']}"
        )
    ids = records["id"]
    if records.size and (ids.min() < 0 or ids.max() >= meta.num_samples or np.any(np.diff(ids) <= 0)):
        raise fmt.StoreError(f"{path}: the index has ids out of range, unsorted or repeated")
    if records.size and (records["label"].min() < 0 or records["label"].max() >= meta.num_classes):
        raise fmt.StoreError(f"{path}: the index has labels outside 0..{meta.num_classes - 1}")
    sizes = fmt.manifest_value(manifest, "pack_sizes", dict, path)
    for sequence in np.unique(records["pack"]).tolist():
        name = fmt.pack_name(sequence)
        if name not in sizes:
            raise fmt.StoreError(f"{path}: records point into {name}, which the manifest does not list")
    return epoch, generation, records
