"""Store mode with several ranks at the size it exists for: 2 gloo ranks (4 with ``--ranks 4``
where the cores allow), each with its share of bench/scale.py's JPEG set in its own store,
``partial`` 0.1 and ``global`` for 5 epochs, every epoch read in the plan's order through
``ShuffledData.loader`` (raw bytes, as bench/scale.py's epochs) while the exchange runs beside it.

Per strategy and epoch boundary, each a ratio against a baseline measured in the same run:

* the exchange's rate (sample bytes a rank sent, over the exchange's seconds from start until
  its arrivals were durable) against ``all_to_all_single`` of the very same byte counts between
  the same ranks (run after the last epoch, on a group of its own), and against ``dd``'s direct-I/O
  write rate on the same disk (the arrivals are written and fsynced there);
* the exposed share: the time the loop waited at the boundary (``end_epoch`` plus the commit in
  ``set_epoch``) over the epoch's time;
* the store's disk footprint (allocated blocks) over its live sample bytes, at the boundary's
  peak (arrivals written beside the samples still to be sent) and after the last epoch;
* each rank's peak anonymous and resident memory (its process, and the busiest of its children:
  staging's and the loader's workers), with the whole set and again with a quarter of it
  (``--small-count``): memory that grew with the data set would show as their ratio. The
  exchange's round buffers grow with an exchange up to their bound, 4 x ``chunk_mb`` per rank.

Run: ``.venv/bin/python bench/scale_ranks.py [--root DIR] [--count 40000] [--ranks 2]`` (makes
or reuses the JPEG set under ``--root`` as bench/scale.py does; writes the "scale-ranks" section
of docs/benchmarks.md). About 14 minutes for 40,000 JPEGs on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

from common import machine, spawn_ranks, write_results
from reshuffle.report.table import format_table
from scale import (
    Files,
    dd_write_seconds,
    device_of,
    disk_sectors_read,
    evict,
    generate,
    raw_collate,
    set_arguments,
    watch_memory,
)

STRATEGIES = {"partial 0.1": ("partial", 0.1), "global": ("global", 0.0)}
MEMORY = {"anon_mb": "rank anonymous", "rss_mb": "rank resident", "child_anon_mb": "children anonymous",
          "child_rss_mb": "children resident"}  # fmt: skip


def rank_job(rank: int, world: int, store_dir: str, strategy: str, fraction: float, epochs: int,
             files: list[str], labels: list[int], batch: int, workers: int) -> dict:  # fmt: skip
    import numpy as np
    import torch
    import torch.distributed as dist

    from reshuffle import ShuffledData
    from reshuffle.store.direct import memory_available
    from reshuffle.store.space import allocated_bytes

    peaks: dict[int, tuple[int, int]] = {}  # pid -> peak (resident, anonymous) kB
    stop = threading.Event()
    watcher = threading.Thread(target=watch_memory, args=(os.getpid(), peaks, stop), daemon=True)
    watcher.start()
    raw_group = dist.new_group(backend="gloo")  # the baseline's own group, as the exchange has one
    started = time.perf_counter()
    data = ShuffledData(Files(files, labels), store_dir, strategy=strategy, fraction=fraction, seed=0,
                        epochs=epochs, chunk_mb=64)  # fmt: skip
    loader = data.loader(batch_size=batch, num_workers=workers, collate_fn=raw_collate)
    rows, staging_s, device = [], 0.0, device_of(Path(store_dir).parent)
    for epoch in range(epochs):
        boundary = time.perf_counter()
        data.set_epoch(epoch)  # the commit of the exchange that ran during the last epoch (or staging)
        commit_s = time.perf_counter() - boundary
        if epoch == 0:
            staging_s, commit_s = commit_s, 0.0
        began, sectors = time.perf_counter(), disk_sectors_read(device)
        read = sum(nbytes for nbytes, _ in loader)
        reading_s = time.perf_counter() - began
        disk_read = (disk_sectors_read(device) - sectors) * 512  # the whole disk's, every rank's
        waited = time.perf_counter()
        stats = data.end_epoch()
        exposed_s = time.perf_counter() - waited + commit_s
        store = data.store
        assert store is not None
        live = int(store.records["length"].sum())
        row = {"epoch": epoch, "read_bytes": read, "reading_s": reading_s, "exposed_s": exposed_s,
               "epoch_s": reading_s + exposed_s, "allocated": allocated_bytes(store.directory),
               "live": live, "disk_read": disk_read}  # fmt: skip
        if stats is not None:
            sizes = torch.zeros(world, dtype=torch.int64)  # bytes sent to each peer
            for dst, ids in data.plan.sends(rank).items():  # type: ignore[union-attr]
                sizes[dst] = int(store.records["length"][store.position(np.asarray(ids))].sum())
            row.update(sent=stats.bytes_sent, received=stats.bytes_received, exchange_s=stats.seconds,
                       sizes=sizes)  # fmt: skip
        rows.append(row)
    store = data.store
    assert store is not None
    available = memory_available()
    reads = {
        "around": store.reader.around_page_cache,
        "sharing": store.ranks_sharing_memory,
        "fits_alone": available is not None and int(store.records["length"].sum()) <= available,
        "available": available or 0,
    }
    data.close()
    stop.set()
    watcher.join()
    # The baseline: the same byte counts, peer to peer, through the raw collective, after the
    # memory was measured (its buffers hold what an exchange sends; the store's never do).
    for row in rows:
        sizes = row.pop("sizes", None)
        if sizes is not None:
            received = torch.zeros(world, dtype=torch.int64)
            dist.all_to_all_single(received, sizes, group=raw_group)
            send = torch.empty(int(sizes.sum()), dtype=torch.uint8)
            receive = torch.empty(int(received.sum()), dtype=torch.uint8)
            dist.barrier(group=raw_group)
            raw_started = time.perf_counter()
            dist.all_to_all_single(receive, send, received.tolist(), sizes.tolist(), group=raw_group)
            row["raw_s"] = time.perf_counter() - raw_started
            del send, receive
    store = data.store
    final = {"allocated": allocated_bytes(store.directory), "live": int(store.records["length"].sum())}
    own = peaks.pop(os.getpid(), (0, 0))
    memory = {"rss_mb": own[0] / 1024, "anon_mb": own[1] / 1024,
              "child_rss_mb": max((v[0] for v in peaks.values()), default=0) / 1024,
              "child_anon_mb": max((v[1] for v in peaks.values()), default=0) / 1024}  # fmt: skip
    return {"staging_s": staging_s, "started": started, "rows": rows, "final": final, "memory": memory,
            "reserve_left": (store.pack_dir / "reserve.bin").exists(), **reads}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    set_arguments(parser, "where the JPEG set is made or reused (bench/scale.py's)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--small-count", type=int, help="the smaller set's JPEGs (default: a quarter)")
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md")
    args = parser.parse_args()
    files, labels = generate(args.root, args.count, args.classes, args.size, os.cpu_count() or 2)
    set_bytes = sum(os.path.getsize(f) for f in files)
    args.small_count = args.small_count or args.count // 4
    runs = {name: (*options, args.count) for name, options in STRATEGIES.items()}
    runs |= {f"{name}, small": (*options, args.small_count) for name, options in STRATEGIES.items()}
    results = {}
    for name, (strategy, fraction, count) in runs.items():
        store_dir = args.root / f"stores-{strategy}"
        shutil.rmtree(store_dir, ignore_errors=True)
        evict(args.root / "images")  # every staging reads its JPEGs from the disk, as a first one does
        results[name] = spawn_ranks(rank_job, args.ranks, str(store_dir), strategy, fraction, args.epochs,
                                    files[:count], labels[:count], args.batch, args.workers,
                                    timeout_s=3600)  # fmt: skip
        shutil.rmtree(store_dir, ignore_errors=True)
    small = {name: results.pop(f"{name}, small") for name in STRATEGIES}
    moved = max(
        r["sent"] for ranks in results.values() for rank in ranks for r in rank["rows"] if "sent" in r
    )
    dd_mb_s = moved / dd_write_seconds(args.root, moved) / 1e6
    small_bytes = sum(os.path.getsize(f) for f in files[: args.small_count])
    report(args, results, small, set_bytes, small_bytes, dd_mb_s)


def report(
    args: argparse.Namespace, results: dict, small: dict, set_bytes: int, small_bytes: int, dd_mb_s: float
) -> None:
    mb = 1e6
    table = []
    for name, ranks in results.items():
        for epoch in range(args.epochs):
            rows = [rank["rows"][epoch] for rank in ranks]
            cells = [name, epoch]
            if "sent" in rows[0]:
                sent = statistics.fmean(r["sent"] for r in rows)
                rate = statistics.fmean(r["sent"] / r["exchange_s"] for r in rows) / mb
                raw = statistics.fmean(r["sent"] / r["raw_s"] for r in rows) / mb
                cells += [
                    round(sent / mb),
                    round(rate),
                    round(raw),
                    round(rate / raw, 2),
                    round(rate / dd_mb_s, 2),
                ]
            else:
                cells += ["-"] * 5
            exposed = statistics.fmean(r["exposed_s"] / r["epoch_s"] for r in rows)
            speed = sum(r["read_bytes"] for r in rows) / max(r["reading_s"] for r in rows) / mb
            peak = max(r["allocated"] / r["live"] for r in rows)
            cells += [round(statistics.fmean(r["epoch_s"] for r in rows), 1), round(speed), f"{exposed:.1%}",
                      round(peak, 3)]  # fmt: skip
            table.append(cells)
        final = max(rank["final"]["allocated"] / rank["final"]["live"] for rank in ranks)
        reserve = any(rank["reserve_left"] for rank in ranks)
        staging = statistics.fmean(rank["staging_s"] for rank in ranks)
        table.append([name, "end", "-", "-", "-", "-", "-", f"staging {staging:.1f} s", "-", "-",
                      f"{final:.3f}{' (reserve left!)' if reserve else ''}"])  # fmt: skip

    def most(ranks: list, key: str) -> float:
        return max(rank["memory"][key] for rank in ranks)

    memory_rows = []
    for name, whole in results.items():
        part = small[name]
        for count, nbytes, ranks in ((args.count, set_bytes, whole), (args.small_count, small_bytes, part)):
            memory_rows.append([f"{name}, {count:,} JPEGs ({nbytes / 1e9:.2f} GB)",
                                *(round(most(ranks, key)) for key in MEMORY)])  # fmt: skip
        memory_rows.append([f"{name}: ratio", *(f"{most(whole, key) / most(part, key):.2f}"
                                                if most(part, key) else "-" for key in MEMORY)])  # fmt: skip
    headers = ["strategy", "epoch", "MB sent per rank", "exchange MB/s", "raw all_to_all MB/s",
               "exchange / raw", "exchange / dd", "epoch s", "read MB/s (all ranks)", "exposed share",
               "store / live bytes"]  # fmt: skip
    markdown = (
        f"### Store mode with {args.ranks} ranks at scale (`bench/scale_ranks.py`)\n\n"
        f"Machine: {machine()}. {args.count:,} JPEGs ({set_bytes / 1e9:.2f} GB), {args.ranks} gloo ranks "
        f"on one host, each with its share in its own store on the same disk, {args.epochs} epochs read "
        f"in the plan's order (raw bytes, batch {args.batch}, {args.workers} DataLoader worker per rank) "
        "while the next epoch's exchange runs beside them. *exchange MB/s*: sample bytes a rank sent over "
        "the exchange's seconds (start until its arrivals were written and fsynced); *raw all_to_all*: "
        "the same byte counts between the same ranks through `all_to_all_single` after the last epoch; *dd*: "
        f"`dd` direct-I/O write on the same disk, {dd_mb_s:.0f} MB/s; *exposed share*: the loop's wait "
        "at the boundary (`end_epoch` plus the commit) over the epoch; *store / live*: allocated "
        "blocks over live sample bytes at the boundary's peak (arrivals beside the samples still "
        "to be sent) and, on the *end* row, after the last epoch; the *end* row's staging read the "
        "JPEGs cold from the same disk. Command: "
        f"`.venv/bin/python bench/scale_ranks.py --count {args.count} --ranks {args.ranks}`.\n\n"
        + format_table(headers, table, markdown=True)
        + "\n\nPeak memory per rank (the largest over the ranks), MB: *rank* is the rank's process "
        "(the plan, the index, the exchange's round buffers, the interpreter and torch), *children* "
        "the busiest of its children (staging's workers, then the loader's, which were forked "
        "from the rank and count the pages they share with it). The smaller sets are the first "
        f"{args.small_count:,} JPEGs. An exchange's round buffers (kept across exchanges) grow with "
        "what it sends up to their bound, 2 x 2 x `chunk_mb` (here 256 MB) per rank.\n\n"
        + format_table(["run", *MEMORY.values()], memory_rows, markdown=True)
    )
    print(markdown)
    if not args.no_write:
        write_results("scale-ranks", {"args": vars(args) | {"root": str(args.root)}, "results": results,
                                      "dd_mb_s": dd_mb_s}, markdown)  # fmt: skip


if __name__ == "__main__":
    main()
