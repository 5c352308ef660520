"""The checksums a store keeps per sample: CRC32 (the default; every store written before
CRC32C, and every store written since 2026-12-07) and CRC32C (stores written between; they keep
reading).

Every sample is checked on the read that trains it, so the checksum is on the read path. CRC32
comes from zlib-ng (the ``zlib-ng`` package), which folds the bytes with carry-less multiplies
(``VPCLMULQDQ`` on AVX-512 CPUs, ``PCLMULQDQ`` before them, the CRC instructions on ARMv8): 106 KB
in 1.0-1.5 us on this project's test machine against CRC32C's 3.6-4.1 us (the ``crc32c``
package) and the standard library's 19.7 us, the same values as :func:`zlib.crc32` (figures in
docs/benchmarks.md, "Checked reads").
"""

from __future__ import annotations

from collections.abc import Callable

import crc32c
from zlib_ng import zlib_ng

from reshuffle.store import format as fmt

# (bytes-like, the checksum of the bytes before it = 0) -> uint32: a record read in parts is
# checked as one (bytes, memoryview, a uint8 array row)
Checksum = Callable[..., int]

CHECKSUMS: dict[str, Checksum] = {"crc32": zlib_ng.crc32, "crc32c": crc32c.crc32c}
DEFAULT = "crc32"  # new stores
LEGACY = "crc32"  # a store.json without the key (StoreMeta writes none for it)
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
