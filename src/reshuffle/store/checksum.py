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
import numpy as np
from numpy.typing import NDArray
from zlib_ng import zlib_ng

from reshuffle.store import format as fmt

# (bytes-like, the checksum of the bytes before it = 0) -> uint32: a record read in parts is
# checked as one (bytes, memoryview, a uint8 array row)
Checksum = Callable[..., int]

CHECKSUMS: dict[str, Checksum] = {"crc32": zlib_ng.crc32, "crc32c": crc32c.crc32c}
DEFAULT = "crc32"  # new stores
MISMATCH = "its bytes do not match their checksum"  # why a damaged sample is, when it is the bytes
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


_BYTE_BITS = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)
MOST_ROWS = 256  # rows RowChecks folds at once
WORD = np.dtype("<u4")  # a CRC as RowChecks reads its bytes


class RowChecks:
    """Checks a batch of equal-length rows with one checksum call over the whole batch.

    A CRC of concatenated rows is the XOR of each row's CRC shifted past the bytes after it,
    and the shift by ``n`` bytes is linear over GF(2) (what zlib's ``crc32_combine`` computes):
    ``shift(c) = crc(zeros(n), c) ^ crc(zeros(n), 0)``, for CRC32 and CRC32C alike. So the
    rows' recorded CRCs predict the batch's, folded with byte tables in a few vectorised steps,
    where at small sizes one call per row costs more than the bytes (64 rows of 784 B, gathered
    in 14 us: 9 us checked row by row, 3.5 us at once). A damaged row changes the batch's CRC as
    it changes its own (a burst of up to 32 bits always, rows out of place too; otherwise all
    but 2^-32 of damages); the rows are then checked one by one to name it (:func:`first_bad`)."""

    def __init__(self, check: Checksum, length: int) -> None:
        self.check, self.length = check, length
        zeros = bytes(length)
        zero = check(zeros, 0)
        one_row = np.array([check(zeros, 1 << bit) ^ zero for bit in range(32)], dtype=np.uint32)
        self._step = _byte_tables(one_row)  # shift past one row
        self._images = [np.array([1 << bit for bit in range(32)], dtype=np.uint32)]  # past k rows
        self._flat = _byte_tables(self._images[0]).ravel()  # (k, 4 bytes, 256) tables, flattened
        self._places: dict[int, NDArray[np.intp]] = {}  # batch size -> (4B,) each CRC byte's table offset

    def matches(self, rows: NDArray[np.uint8], crcs: NDArray[np.integer]) -> bool:
        """Whether the (B, length) C-contiguous ``rows`` match their recorded CRCs ``crcs`` (B,)
        (fastest as a contiguous little-endian uint32 array, ``WORD``, whose bytes index the
        tables as they are). A batch of more than ``MOST_ROWS`` rows is checked in parts of that
        many (the tables hold 4 KiB per row of the largest part)."""
        words: NDArray[np.uint32] = np.ascontiguousarray(crcs, dtype=WORD)
        if rows.shape[0] <= MOST_ROWS:
            return self._matches(rows, words)
        return all(
            self._matches(rows[start : start + MOST_ROWS], words[start : start + MOST_ROWS])
            for start in range(0, rows.shape[0], MOST_ROWS)
        )

    def _matches(self, rows: NDArray[np.uint8], crcs: NDArray[np.uint32]) -> bool:
        size = rows.shape[0]
        places = self._places.get(size)
        if places is None:
            self._grow(size)
            after = size - 1 - np.arange(size)  # rows after each one
            places = self._places[size] = (after[:, None] * 1024 + np.arange(4) * 256).astype(np.intp).ravel()
        # each CRC byte, least significant first, picks its row's table entry
        parts = self._flat.take(np.add(crcs.view(np.uint8), places))
        return int(np.bitwise_xor.reduce(parts)) == self.check(rows)

    def _grow(self, size: int) -> None:
        tables = [self._flat]
        while len(self._images) < size:
            images = self._images[-1]
            self._images.append(
                self._step[0][images & 255] ^ self._step[1][(images >> 8) & 255]
                ^ self._step[2][(images >> 16) & 255] ^ self._step[3][images >> 24]
            )  # fmt: skip
            tables.append(_byte_tables(self._images[-1]).ravel())
        self._flat = np.concatenate(tables)


def first_bad(check: Checksum, rows: NDArray[np.uint8], crcs: NDArray[np.int64]) -> int | None:
    """The first of ``rows`` whose ``check`` is not its CRC in ``crcs`` (None: all match)."""
    found = list(map(check, rows))  # one call per row: the least Python per row
    return next((r for r, crc in enumerate(crcs.tolist()) if found[r] != crc), None)


def _byte_tables(images: NDArray[np.uint32]) -> NDArray[np.uint32]:
    """(4, 256): for each byte of a 32-bit value, the XOR of the images of its set bits."""
    tables = np.empty((4, 256), dtype=np.uint32)
    for byte in range(4):
        chosen = np.where(_BYTE_BITS, images[8 * byte : 8 * byte + 8][None, :], np.uint32(0))
        tables[byte] = np.bitwise_xor.reduce(chosen, axis=1)
    return tables
