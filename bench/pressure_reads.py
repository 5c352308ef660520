"""The reads alone under memory pressure: how fast one rank's store is read when the page cache
holds only a part of it, buffered and around the page cache.

    .venv/bin/python bench/scale.py                 # first: stages the store this reads
    .venv/bin/python bench/pressure_reads.py        # a few minutes on 2 cores

Reads every sample of the store ``bench/scale.py`` staged (``<root>/store``, one rank) once, in
a random order, in batches of 64 split between ``--processes`` forked processes the way a
DataLoader's workers take them (batch k to process k mod P), each record checked against its
checksum, with the page cache held to ``--cache-share`` of the store (bench/scale.py's
``pressure``: a helper holds the rest of memory). No DataLoader, no collate: what the reads cost.

* ``store``: :meth:`PackReader.many <reshuffle.store.reads.PackReader.many>`, as a store-mode
  DataLoader worker calls it, with ``RESHUFFLE_DIRECT_READS=0``: buffered ``pread`` of each
  sample, the batch and the next three announced to the kernel (``POSIX_FADV_WILLNEED``) when
  they are not cached (how a store is read without liburing).
* ``direct`` (where the ``liburing`` package imports; ``pip install 'reshuffle[uring]'``): the same
  call with ``RESHUFFLE_DIRECT_READS=1``: the library's reads around the page cache
  (:mod:`reshuffle.store.direct`, ``O_DIRECT`` through ``io_uring``, its ``DEPTH`` in flight
  within each batch).
* ``uring-D`` (the same condition): ``O_DIRECT`` reads through ``io_uring`` written out here, D in
  flight per process over the process's whole order (not batch by batch), each into its own slot
  of a page-aligned buffer, checked and copied out: how deep a queue pays.

Modes alternate within each round; each figure is a median over the rounds. Results:
``bench/out/pressure_reads.json`` and the ``pressure-reads`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results
from reshuffle.store import RankStore
from reshuffle.store import format as fmt
from reshuffle.store.checksum import checksum
from reshuffle.store.dataset import AHEAD_BATCHES
from reshuffle.store.direct import DEPTH, SETTING
from scale import device_of, disk_sectors_read, evict, page_cache_held

BATCH = 64
ALIGN = 4096  # O_DIRECT: offsets, lengths and buffers aligned to the disk's block (4 KiB covers 512 B)


def _batches(store: RankStore) -> list[np.ndarray]:
    order = np.random.default_rng(0).permutation(store.reader.ids.size)
    return [order[i : i + BATCH] for i in range(0, order.size, BATCH)]


def read_store(store: RankStore, batches: list[np.ndarray], part: int, processes: int) -> tuple[int, int]:
    """This process's batches through the store's reads (``many``); (samples, bytes)."""
    samples = nbytes = 0
    for k in range(part, len(batches), processes):
        following = batches[k + 1 : k + 1 + AHEAD_BATCHES]
        ahead = (lambda f=following: np.concatenate(f)) if following else None
        for record in store.reader.many(batches[k], ahead=ahead):
            samples += 1
            nbytes += len(record)
    return samples, nbytes


def read_uring(
    store: RankStore, batches: list[np.ndarray], part: int, processes: int, depth: int
) -> tuple[int, int]:
    """This process's batches read around the page cache, ``depth`` reads in flight; (samples, bytes)."""
    import liburing as uring

    reader, check = store.reader, checksum(store.meta.checksum)
    mine = np.concatenate(batches[part::processes]).tolist()
    slot_bytes = (int(reader.lengths.max()) + 2 * ALIGN) // ALIGN * ALIGN
    arena = mmap.mmap(-1, slot_bytes * depth)  # page-aligned
    view = memoryview(arena)
    files: dict[int, int] = {}
    ring, completions = uring.Ring(), uring.Cqe()
    uring.io_uring_queue_init(2 * depth, ring)
    pending: dict[int, tuple[int, int, int, int, object]] = {}  # index -> slot, cut, length, crc, iovec
    finished: dict[int, int] = {}

    def submit(index: int, slot: int) -> None:
        where = mine[index]
        sequence, start = int(reader.packs[where]), int(reader.offsets[where])
        length = int(reader.lengths[where])
        if sequence not in files:
            path = store.pack_dir / fmt.pack_name(sequence)
            files[sequence] = os.open(path, os.O_RDONLY | os.O_DIRECT)
        first, end = start // ALIGN * ALIGN, -(-(start + length) // ALIGN) * ALIGN
        iovec = uring.Iovec([view[slot * slot_bytes : slot * slot_bytes + end - first]])
        entry = uring.io_uring_get_sqe(ring)
        uring.io_uring_prep_readv(entry, files[sequence], iovec, first)
        entry.user_data = index
        pending[index] = (slot, start - first, length, int(reader.crcs[where]), iovec)

    submitted = min(depth, len(mine))
    for index in range(submitted):
        submit(index, index)
    uring.io_uring_submit(ring)
    nbytes = 0
    try:
        for index in range(len(mine)):
            while index not in finished:
                uring.io_uring_wait_cqe(ring, completions)
                done = completions[0]
                finished[done.user_data] = done.res
                uring.io_uring_cqe_seen(ring, done)
            got = finished.pop(index)
            slot, cut, length, crc, _ = pending.pop(index)
            if got < cut + length:
                raise OSError(f"short direct read: {got} bytes, wanted {cut + length}")
            payload = bytes(view[slot * slot_bytes + cut : slot * slot_bytes + cut + length])
            if check(payload) != crc:
                raise ValueError(f"sample at position {mine[index]} does not match its checksum")
            nbytes += length
            if submitted < len(mine):
                submit(submitted, slot)
                submitted += 1
                uring.io_uring_submit(ring)
    finally:
        uring.io_uring_queue_exit(ring)
        for descriptor in files.values():
            os.close(descriptor)
    return len(mine), nbytes


def _worker(mode: str, root: str, part: int, processes: int, queue: multiprocessing.Queue) -> None:
    os.environ[SETTING] = "1" if mode == "direct" else "0"  # read when the store opens
    store = RankStore.open(Path(root) / "store", 0)
    batches = _batches(store)
    started, cpu = time.perf_counter(), time.process_time()
    if mode in ("store", "direct"):
        samples, nbytes = read_store(store, batches, part, processes)
    else:
        samples, nbytes = read_uring(store, batches, part, processes, int(mode.split("-")[1]))
    queue.put((samples, nbytes, time.perf_counter() - started, time.process_time() - cpu))


def one_pass(mode: str, args: argparse.Namespace, store_bytes: int, device: str) -> dict:
    """Every sample once in ``mode`` with a cold store and a page cache of ``--cache-share`` of it."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    evict(args.root / "store")
    with page_cache_held(SimpleNamespace(cache_share=args.cache_share), store_bytes):
        before, started = disk_sectors_read(device), time.perf_counter()
        workers = [context.Process(target=_worker, args=(mode, str(args.root), part, args.processes, queue))
                   for part in range(args.processes)]  # fmt: skip
        for worker in workers:
            worker.start()
        results = [queue.get(timeout=900) for _ in workers]
        for worker in workers:
            worker.join()
        seconds = time.perf_counter() - started
        disk_bytes = (disk_sectors_read(device) - before) * 512
    samples, nbytes = sum(r[0] for r in results), sum(r[1] for r in results)
    return {"mode": mode, "samples": samples, "bytes": nbytes, "seconds": seconds, "disk_bytes": disk_bytes,
            "cpu_seconds": sum(r[3] for r in results)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reshuffle-scale",
                        help="bench/scale.py's --root (its store is read)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="readers, as a DataLoader's workers")
    parser.add_argument("--depths", type=int, nargs="*", default=[16, 32, 64],
                        help="io_uring reads in flight")  # fmt: skip
    parser.add_argument("--cache-share", type=float, default=0.3, help="of the store the page cache may hold")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    if not (args.root / "store").is_dir():
        raise SystemExit(
            f"no store under {args.root}: run `.venv/bin/python bench/scale.py --root {args.root}` first"
        )
    try:
        import liburing  # noqa: F401

        modes = ["store", "direct", *(f"uring-{depth}" for depth in args.depths)]
    except ImportError:
        print("liburing is not installed (pip install 'reshuffle[bench]'): the store's path only", flush=True)
        modes = ["store"]
    store = RankStore.open(args.root / "store", 0)
    store_bytes, device = int(store.reader.lengths.sum()), device_of(args.root)
    passes = []
    for round_index in range(args.rounds):
        for mode in modes:
            result = one_pass(mode, args, store_bytes, device)
            result["round"] = round_index
            passes.append(result)
            print(json.dumps(result), flush=True)
    rows = []
    for mode in modes:
        mine = [p for p in passes if p["mode"] == mode]
        rates = [p["samples"] / p["seconds"] for p in mine]
        baseline = [p for p in passes if p["mode"] == "store"]
        ratios = [p["samples"] / p["seconds"] / (s["samples"] / s["seconds"])
                  for p, s in zip(mine, baseline, strict=True)]  # fmt: skip
        rows.append(
            f"| {mode} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
            f"| {statistics.median(p['bytes'] / p['seconds'] / 1e6 for p in mine):,.0f} "
            f"| {statistics.median(ratios):.2f} "
            f"| {statistics.median(p['disk_bytes'] / p['bytes'] for p in mine):.3f} "
            f"| {statistics.median(p['cpu_seconds'] for p in mine):.1f} |"
        )
    markdown = f"""## The reads alone under memory pressure (`bench/pressure_reads.py`)

Machine: {machine()}. Every sample of bench/scale.py's store ({store.reader.ids.size:,} samples,
{store_bytes / 1e9:.2f} GB) read once in a random order, batches of {BATCH} split between
{args.processes} forked processes, every record checked, the page cache held to
{args.cache_share:.0%} of the store; {args.rounds} rounds, the modes alternating. *store*: the
store's buffered reads (`PackReader.many` with `RESHUFFLE_DIRECT_READS=0`, `pread`, this batch
and the next {AHEAD_BATCHES} announced); *direct*: the same call reading around the page cache
(`RESHUFFLE_DIRECT_READS=1`: `O_DIRECT` through `io_uring`, up to {DEPTH} in flight within each
batch); *uring-D*: `O_DIRECT` reads through `io_uring` written out in the bench, D in flight per
process across batches. *per round / store*: the median over rounds of the
mode's samples/s over the store path's in the same round. *CPU s*: user + system of the readers.
Command: `.venv/bin/python bench/pressure_reads.py --rounds {args.rounds}`.

| mode | samples/s (range) | MB/s | per round / store | disk bytes / read | CPU s |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""
    print(markdown)
    if not args.no_write:
        write_results("pressure_reads", passes, markdown)


if __name__ == "__main__":
    main()
