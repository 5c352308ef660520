"""Store mode costs, each as a ratio against a baseline measured in the same run.

1. **Exchange throughput** vs raw ``all_to_all_single`` of the same byte counts on the same
   process group (2 ranks on this machine): one full ``Exchanger.exchange`` (read from the store,
   send, verify, write and fsync the arrivals, commit), with the store on the system disk and on
   tmpfs (``/dev/shm``; no disk in the way). Also "prepared": from start until the new state is
   durable (what overlaps training). Target (issue 3): >= 0.6.
2. **Pack / unpack** (building send streams from the store; checking and writing arrivals) vs
   ``memcpy`` of the same bytes, one process.
3. **Random reads** by id: ``RankStore.read`` vs copying a row out of an in-memory uint8 tensor,
   and vs one file per sample (open, read, close); raw bytes, and through the datasets (decode +
   transform: ``StoreDataset`` vs index mode's ``SourceDataset``). Target (issue 3): >= 0.5 of
   the in-memory tensor.

Run: ``.venv/bin/python bench/exchange.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, spawn_ranks, timing, write_results
from reshuffle.text_table import format_table

SAMPLE_BYTES = 64 * 1024


def _exchange_rank(rank: int, world: int, root: str, num: int, fraction: float, repeats: int) -> dict:
    import torch.distributed as dist

    from reshuffle import ShufflePlanner
    from reshuffle.data.synthetic import load_synthetic
    from reshuffle.store import Exchanger, new_exchange_group, stage

    source = load_synthetic("train", num_samples=num, shape=(1, 8, 8), sample_bytes=SAMPLE_BYTES)
    planner = ShufflePlanner(num, world, strategy="partial", fraction=fraction, seed=1)
    store, _ = stage(root, rank, source, planner)
    group = new_exchange_group(300)
    exchanger = Exchanger(store, planner, group=group, chunk_bytes=64 << 20)
    exchanger.exchange(0)  # warm: page cache, first holes
    rows = []
    for epoch in range(1, repeats + 1):
        dist.barrier(group=group)
        started = time.perf_counter()
        stats = exchanger.exchange(epoch)
        whole = time.perf_counter() - started
        # The same byte counts, peer to peer, through the raw collective.
        sizes = torch.zeros(world, dtype=torch.int64)
        for dst, ids in planner.plan(epoch + 1).sends(rank).items():
            sizes[dst] = int(store.records["length"][store.position(ids)].sum()) + 32 * ids.size
        received = torch.empty(world, dtype=torch.int64)
        dist.all_to_all_single(received, sizes, group=group)
        send = torch.empty(int(sizes.sum()), dtype=torch.uint8)
        receive = torch.empty(int(received.sum()), dtype=torch.uint8)
        send.fill_(1)
        receive.fill_(0)
        dist.barrier(group=group)
        started = time.perf_counter()
        dist.all_to_all_single(receive, send, received.tolist(), sizes.tolist(), group=group)
        raw = time.perf_counter() - started
        rows.append({"bytes": int(sizes.sum()), "whole_s": whole, "prepared_s": stats.seconds, "raw_s": raw})
    return {"rows": rows}


def exchange_throughput(base: str, num: int, fraction: float, repeats: int) -> dict:
    root = tempfile.mkdtemp(dir=base)
    try:
        ranks = spawn_ranks(_exchange_rank, 2, root, num, fraction, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [row for result in ranks for row in result["rows"]]
    return {
        "where": base,
        "bytes_per_rank": statistics.median(r["bytes"] for r in rows),
        "whole": timing([r["whole_s"] for r in rows]),
        "prepared": timing([r["prepared_s"] for r in rows]),
        "raw": timing([r["raw_s"] for r in rows]),
        "ratio_whole": statistics.median(r["raw_s"] / r["whole_s"] for r in rows),
        "ratio_prepared": statistics.median(r["raw_s"] / r["prepared_s"] for r in rows),
    }


def pack_unpack(base: str, repeats: int) -> dict:
    from reshuffle import ShufflePlanner
    from reshuffle.data.synthetic import load_synthetic
    from reshuffle.store import stage
    from reshuffle.store.exchange import _Incoming, _Outgoing

    num = 2048
    source = load_synthetic("train", num_samples=num, shape=(1, 8, 8), sample_bytes=SAMPLE_BYTES)
    planner = ShufflePlanner(num, 1, strategy="local")
    root = tempfile.mkdtemp(dir=base)
    store, _ = stage(root, 0, source, planner)
    ids = np.sort(np.random.default_rng(0).choice(store.ids, 1024, replace=False))
    packs, unpacks, copies = [], [], []
    try:
        for _ in range(repeats):
            stream = _Outgoing(store, ids)
            buffer = bytearray(stream.size)
            started = time.perf_counter()
            stream.take(stream.size, memoryview(buffer))
            packs.append(time.perf_counter() - started)
            writer = store.pack_writer()
            sink = _Incoming(0, ids, stream.size, source.num_classes, writer)
            started = time.perf_counter()
            sink.feed(memoryview(buffer))
            sink.finish()
            writer.close()
            unpacks.append(time.perf_counter() - started)
            writer.abort()  # drop the copies again
            target = bytearray(len(buffer))
            started = time.perf_counter()
            target[:] = buffer
            copies.append(time.perf_counter() - started)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = len(buffer)
    return {
        "bytes": size,
        "pack_gbps": size / statistics.median(packs) / 1e9,
        "unpack_gbps": size / statistics.median(unpacks) / 1e9,
        "memcpy_gbps": size / statistics.median(copies) / 1e9,
    }


def random_reads(base: str, sample_bytes: int, num: int, reads: int) -> dict:
    from reshuffle import ShufflePlanner
    from reshuffle.data import SourceDataset
    from reshuffle.data.synthetic import load_synthetic
    from reshuffle.data.transforms import build_transform
    from reshuffle.store import StoreDataset, stage

    shape = (1, 28, 28)
    source = load_synthetic("train", num_samples=num, shape=shape, sample_bytes=sample_bytes)
    planner = ShufflePlanner(num, 1, strategy="local")
    root = Path(tempfile.mkdtemp(dir=base))
    try:
        store, _ = stage(root / "store", 0, source, planner)
        table = torch.from_numpy(np.stack([np.frombuffer(source.raw(i), dtype=np.uint8) for i in range(num)]))
        files = root / "files"
        files.mkdir()
        for i in range(num):
            (files / f"{i}.bin").write_bytes(source.raw(i))
        order = np.random.default_rng(0).integers(0, num, size=reads).tolist()
        transform = build_transform(["normalize"], [0.5], [0.25])
        store_dataset, index_dataset = (
            StoreDataset(store, source.decoder, transform),
            SourceDataset(source, transform),
        )

        def rate(fn) -> float:
            for i in order[:200]:
                fn(i)  # warm the page cache and the maps
            best = []
            for _ in range(3):
                started = time.perf_counter()
                for i in order:
                    fn(i)
                best.append(time.perf_counter() - started)
            return reads / statistics.median(best)

        def one_file(i: int) -> bytes:
            with open(files / f"{i}.bin", "rb") as handle:
                return handle.read()

        result = {
            "sample_bytes": sample_bytes,
            "store_per_s": rate(store.read),
            "tensor_per_s": rate(lambda i: table[i].clone()),
            "files_per_s": rate(one_file),
            "store_dataset_per_s": rate(store_dataset.__getitem__),
            "index_dataset_per_s": rate(index_dataset.__getitem__),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    disk = tempfile.gettempdir()
    places = [disk] + (["/dev/shm"] if os.path.isdir("/dev/shm") else [])
    throughput = [exchange_throughput(place, 8192, 0.25, repeats) for place in places]
    packing = pack_unpack(disk, repeats)
    reads = [random_reads(disk, size, 4000, 20_000 if args.quick else 50_000) for size in (784, SAMPLE_BYTES)]

    exchange_table = format_table(
        [
            "store on",
            "MiB per rank",
            "raw a2a ms",
            "exchange ms",
            "ratio",
            "prepared ms",
            "ratio (prepared)",
            "spread",
        ],
        [
            (
                "tmpfs" if r["where"] == "/dev/shm" else "disk",
                r["bytes_per_rank"] / 2**20,
                r["raw"].median_s * 1e3,
                r["whole"].median_s * 1e3,
                r["ratio_whole"],
                r["prepared"].median_s * 1e3,
                r["ratio_prepared"],
                f"{r['whole'].spread:.0%}",
            )
            for r in throughput
        ],
        markdown=True,
    )
    read_table = format_table(
        ["sample bytes", "store reads/s", "tensor reads/s", "store / tensor", "one-file reads/s",
         "store / one-file",
         "StoreDataset items/s", "index SourceDataset items/s", "store / index"],
        [
            (
                r["sample_bytes"], r["store_per_s"], r["tensor_per_s"], r["store_per_s"] / r["tensor_per_s"],
                r["files_per_s"], r["store_per_s"] / r["files_per_s"], r["store_dataset_per_s"],
                r["index_dataset_per_s"], r["store_dataset_per_s"] / r["index_dataset_per_s"],
            )
            for r in reads
        ],
        markdown=True,
    )  # fmt: skip
    print(exchange_table, read_table, packing, sep="\n\n")
    best = max(r["ratio_whole"] for r in throughput)
    worst_read = min(r["store_per_s"] / r["tensor_per_s"] for r in reads)
    markdown = f"""## Store mode: exchange, packing, random reads (`bench/exchange.py`)

{machine()}; median over {repeats} exchanges on each of 2 ranks (partial, Q = 0.25, 8,192 samples
of 64 KiB: 64 MiB leave each rank per exchange). "exchange" is a whole `Exchanger.exchange` (read,
send, verify, write + fsync, two-phase commit); "prepared" stops when the new state is durable,
which is the part that overlaps training. Baseline: `all_to_all_single` of the same byte counts on
the same group, right after.

{exchange_table}

Target (issue 3): exchange >= 0.6 of raw `all_to_all_single`. Best here: {best:.2f}:
**{"met" if best >= 0.6 else "not met"}**. On this 2-vCPU machine the loopback transport is itself
CPU work (kernel copies) and competes with the store work of the same two cores: building the
streams, crc32, writing and fsyncing arrivals (see packing below). On the system disk, the
fsync of the arrivals adds the disk's write time (about 270 MB/s here). Both run in the background
while an epoch trains, so what matters for training is the exposed time (the training benchmark).

Packing and unpacking 64 MiB (1,024 samples) in one process: pack (store -> send buffer)
{packing["pack_gbps"]:.2f} GB/s, unpack (verify headers, crc32, write to a pack, fsync)
{packing["unpack_gbps"]:.2f} GB/s, against memcpy {packing["memcpy_gbps"]:.2f} GB/s of the same bytes
(ratios {packing["pack_gbps"] / packing["memcpy_gbps"]:.2f} and
{packing["unpack_gbps"] / packing["memcpy_gbps"]:.2f}).

Random reads by id (4,000 samples, warm page cache; "StoreDataset" and "SourceDataset" include
decoding and normalisation):

{read_table}

Target (issue 3): store reads >= 0.5 of indexing an in-memory tensor. Worst here:
{worst_read:.2f}: **{"met" if worst_read >= 0.5 else "not met"}**.
"""
    write_results("exchange", {"throughput": throughput, "packing": packing, "reads": reads}, markdown)


if __name__ == "__main__":
    main()
