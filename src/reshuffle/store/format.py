"""On-disk format of a sample store, and the atomic-write and path-safety rules it lives by.

A store is a directory::

    store.json                     what the store holds: dataset, world size, plan (identical on every node)
    rank-00003/manifest.json       the committed state of rank 3: epoch, generation, index, packs
    rank-00003/prepared.json       phase 1 of a two-phase commit (only between an exchange and its commit)
    rank-00003/index-00000007.bin  the records of a generation: a sorted array of RECORD
    rank-00003/packs/pack-00000012.bin  immutable sample bytes, appended once, never rewritten
    rank-00003/packs/reserve.bin   space allocated ahead for the next exchange's arrivals (optional)
    rank-00003/damaged.json        a sample a read found damaged (only then; the store must be restaged)

Nothing is pickled: records are little-endian numpy structured arrays, metadata is JSON. Every
file name read from a manifest must match its pattern and resolve inside the rank directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from reshuffle.errors import ReshuffleError

FORMAT_VERSION = 1
STORE_FILE = "store.json"
MANIFEST = "manifest.json"
PREPARED = "prepared.json"
LOCK = "job.lock"  # held (flock) by the job using the rank directory; holds its pid and host
PACK_DIR = "packs"
# Blocks allocated after a commit for the next exchange's arrivals; its writer renames it into a
# pack. Not part of any state: deleted with other leftovers, never reported as a problem.
RESERVE = "reserve.bin"
RESERVE_PATH = f"{PACK_DIR}/{RESERVE}"  # relative to the rank directory
# Written by the read that found a sample damaged (reads.py): the store is refused from then on.
DAMAGED = "damaged.json"

# One record per sample in an index file (40 bytes), sorted by id.
RECORD = np.dtype(
    [("id", "<i8"), ("label", "<i8"), ("offset", "<u8"), ("length", "<u8"), ("pack", "<u4"), ("crc", "<u4")]
)
# One header per sample on the wire, followed by `length` payload bytes (32 bytes).
WIRE_MAGIC = 0x52534846  # "RSHF": the header's crc is zlib's CRC32
WIRE_MAGIC_CRC32C = 0x52534843  # "RSHC": the header's crc is CRC32C (see checksum.py)
WIRE_HEADER = np.dtype([("id", "<i8"), ("label", "<i8"), ("length", "<u8"), ("crc", "<u4"), ("magic", "<u4")])

_PACK_NAME = re.compile(r"^pack-(\d{8})\.bin$")
_INDEX_NAME = re.compile(r"^index-(\d{8})\.bin$")
_RANK_NAME = re.compile(r"^rank-(\d{5})$")


class StoreError(ReshuffleError, RuntimeError):
    """A store is missing, damaged or does not match the job; the message says what and how to fix it."""


def rank_dir_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def rank_of_dir(name: str) -> int | None:
    match = _RANK_NAME.match(name)
    return int(match.group(1)) if match else None


def pack_name(sequence: int) -> str:
    return f"pack-{sequence:08d}.bin"


def pack_sequence(name: str) -> int | None:
    match = _PACK_NAME.match(name)
    return int(match.group(1)) if match else None


def index_name(generation: int) -> str:
    return f"index-{generation:08d}.bin"


def index_generation(name: str) -> int | None:
    match = _INDEX_NAME.match(name)
    return int(match.group(1)) if match else None


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing anything that is not a plain name or resolves outside ``root``."""
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts or not parts:
        raise StoreError(f"refusing store path {relative!r}: not a plain path inside {root}")
    path = root / relative
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise StoreError(f"refusing store path {relative!r}: it resolves outside {root} (a symlink?)")
    return path


def open_for_writing(path: Path, flags: int, root: Path) -> int:
    """``os.open`` of a store file for writing, with the containment check every read has: the
    path must resolve inside ``root``, and its last component is never followed if it is a symlink
    (``O_NOFOLLOW``), so no write ever lands outside the store."""
    checked = inside(root, str(path.relative_to(root)))
    try:
        return os.open(checked, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StoreError(
                f"refusing to write {path}: it is a symlink (a store's files are its own); remove it, "
                f"or restage the store"
            ) from None
        raise


_LOCKS: dict[Path, int] = {}  # directories this process holds the job lock of


def lock_directory(directory: Path) -> int:
    """Take ``directory``'s exclusive job lock (``flock`` on ``job.lock``, held until the process
    ends; taking it again in the same process is a no-op); StoreError naming the holder if another
    process (another job) has it."""
    import fcntl
    import socket

    key = directory.resolve()
    if key in _LOCKS:
        return _LOCKS[key]
    directory.mkdir(parents=True, exist_ok=True)
    fd = open_for_writing(directory / LOCK, os.O_RDWR | os.O_CREAT, directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StoreError(
            f"{directory} is in use by another job ({holder}); two jobs on one store would corrupt it. "
            "Wait for that job to end, or give this one another shuffle.store_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _LOCKS[key] = fd
    return fd


def fsync_path(path: Path) -> None:
    """Make ``path`` durable: a file's bytes, or a rename or unlink in a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    # Unique per process and thread: ranks of one node write the shared store.json concurrently.
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)


def write_json(path: Path, value: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{what} {path} is unreadable ({error})") from None
    if not isinstance(value, dict):
        raise StoreError(f"{what} {path} is not a JSON object")
    return value


def write_index(path: Path, records: np.ndarray) -> str:
    """Write an index atomically; returns its sha256."""
    data = np.ascontiguousarray(records, dtype=RECORD).tobytes()
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_index(path: Path, sha256: str) -> np.ndarray:
    """The records of an index file, checked against the manifest's digest."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"index {path} is missing") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StoreError(f"index {path} is corrupt (its checksum does not match the manifest)")
    if len(data) % RECORD.itemsize:
        raise StoreError(f"index {path} is truncated ({len(data)} bytes is not a whole number of records)")
    return np.frombuffer(data, dtype=RECORD).copy()


def manifest_value(manifest: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    """A manifest field of the expected type, or a StoreError naming the field."""
    value = manifest.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StoreError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    return value
