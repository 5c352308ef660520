"""The checksums a store keeps per sample: CRC32C (hardware-accelerated, the default for new
stores) and zlib's CRC32 (stores written before CRC32C; they keep reading).

Every sample is checked on the read that trains it, so the checksum is on the read path: CRC32C
from the ``crc32c`` package is several times faster than zlib's CRC32 (figures in
docs/benchmarks.md, "Checked reads").
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import crc32c

from reshuffle.store import format as fmt

# (bytes-like, the checksum of the bytes before it = 0) -> uint32: a record read in parts is
# checked as one (bytes, memoryview, a uint8 array row)
Checksum = Callable[..., int]

CHECKSUMS: dict[str, Checksum] = {"crc32": zlib.crc32, "crc32c": crc32c.crc32c}
DEFAULT = "crc32c"  # new stores; a store.json without the key was written with crc32
LEGACY = "crc32"
# The wire header's magic names the checksum its crc field holds, so peers agree on how to check.
WIRE_MAGIC = {"crc32": fmt.WIRE_MAGIC, "crc32c": fmt.WIRE_MAGIC_CRC32C}
BY_MAGIC = {magic: name for name, magic in WIRE_MAGIC.items()}


def checksum(name: str) -> Checksum:
    """The function of the checksum named ``name`` (a StoreError for an unknown one)."""
    if name not in CHECKSUMS:
        raise fmt.StoreError(
            f"the store's samples carry {name!r} checksums, which this version cannot check "
            f"(known: {', '.join(sorted(CHECKSUMS))}); upgrade reshuffle, or restage the store"
        )
    return CHECKSUMS[name]
