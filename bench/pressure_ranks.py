"""Several ranks on one host whose page cache holds only a part of their stores: the reads the
library chooses against buffered reads, in the same run.

    .venv/bin/python bench/pressure_ranks.py      # ~15 minutes on 2 cores

The ranks of a host share its page cache, so whether a rank reads around it
(:mod:`reshuffle.store.direct`) is decided for their stores together, not for its own. Makes or
reuses bench/scale.py's JPEG set; each run stages it afresh into one store per rank (``--ranks``
gloo ranks) and reads ``--epochs`` epochs of partial 0.1 in the plan's order through
``ShuffledData.loader`` (raw bytes, batch 64, one DataLoader worker per rank) while the next
epoch's exchange runs beside them (bench/scale_ranks.py's ranks), with the page cache held to each
``--cache-share`` of the stores together (bench/scale.py's *pressure*: a helper holds the rest of
memory, leaving 1 GiB per rank for the processes at work, of which they use about half: with 2
ranks and 0.3, a rank's store alone fits in the memory left, both together do not; with 0.05
neither). Each round runs the job twice, in alternating order: *chosen* (the library's choice,
``RESHUFFLE_DIRECT_READS`` unset) and *buffered* (``RESHUFFLE_DIRECT_READS=0``, what each rank
whose store fits alone chose before the ranks of a host counted together). Per run: the epochs'
read rate over all ranks (sample bytes over the slowest rank's reading time), the disk's bytes
read over the bytes trained (device-wide, over rank 0's reading: the exchange's reads of the
samples it sends are in it), the exposed share of the exchange, and what each rank chose.
Writes the ``pressure-ranks`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from types import SimpleNamespace

from common import machine, spawn_ranks, write_results
from reshuffle.report.table import format_table
from reshuffle.store.direct import SETTING
from scale import evict, generate, page_cache_held, set_arguments
from scale_ranks import rank_job

MODES = {"chosen": None, "buffered": "0"}  # RESHUFFLE_DIRECT_READS for each run


def run(
    mode: str, share: float, args: argparse.Namespace, files: list[str], labels: list[int], set_bytes: int
) -> dict:
    """One job of ``--ranks`` ranks with the page cache held to ``share`` of the stores, reads as
    ``mode`` says; its figures."""
    store_dir = args.root / "stores-pressure"
    shutil.rmtree(store_dir, ignore_errors=True)
    evict(args.root / "images")
    os.environ.pop(SETTING, None)
    if MODES[mode] is not None:
        os.environ[SETTING] = MODES[mode]  # the spawned ranks inherit it
    try:
        with page_cache_held(SimpleNamespace(cache_share=share), set_bytes, args.ranks << 30):
            ranks = spawn_ranks(rank_job, args.ranks, str(store_dir), "partial", 0.1, args.epochs, files,
                                labels, args.batch, 1, timeout_s=3600)  # fmt: skip
    finally:
        os.environ.pop(SETTING, None)
        shutil.rmtree(store_dir, ignore_errors=True)
    epochs = [[rank["rows"][epoch] for rank in ranks] for epoch in range(args.epochs)]
    read = sum(r["read_bytes"] for rows in epochs for r in rows)
    reading = sum(max(r["reading_s"] for r in rows) for rows in epochs)
    return {
        "mode": mode,
        "share": share,
        "read_mb_s": read / reading / 1e6,
        "disk_per_trained": sum(rows[0]["disk_read"] for rows in epochs) / read,
        "exposed": statistics.fmean(r["exposed_s"] / r["epoch_s"] for rows in epochs for r in rows),
        "around": [rank["around"] for rank in ranks],
        "sharing": [rank["sharing"] for rank in ranks],
        "fits_alone": [rank["fits_alone"] for rank in ranks],
        "available_share": min(rank["available"] for rank in ranks) / set_bytes,
        "staging_s": statistics.fmean(rank["staging_s"] for rank in ranks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    set_arguments(parser, "where the JPEG set is made or reused (bench/scale.py's)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-share", type=float, nargs="+", default=[0.3, 0.05],
                        help="of the stores the page cache may hold, beside 1 GiB a rank")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md")
    args = parser.parse_args()
    files, labels = generate(args.root, args.count, args.classes, args.size, os.cpu_count() or 2)
    set_bytes = sum(os.path.getsize(f) for f in files)
    passes = []
    for share in args.cache_share:
        for round_index in range(args.rounds):
            for mode in MODES if round_index % 2 == 0 else reversed(MODES):
                result = run(mode, share, args, files, labels, set_bytes) | {"round": round_index}
                print(result, flush=True)
                passes.append(result)
    report(args, passes, set_bytes)


def report(args: argparse.Namespace, passes: list[dict], set_bytes: int) -> None:
    table = []
    for share in args.cache_share:

        def of(mode: str, key: str, share: float = share) -> list:
            return [p[key] for p in passes if p["mode"] == mode and p["share"] == share]

        chosen_rates, buffered_rates = of("chosen", "read_mb_s"), of("buffered", "read_mb_s")
        ratios = [c / b for c, b in zip(chosen_rates, buffered_rates, strict=True)]
        per_round = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        for mode in MODES:
            rates = of(mode, "read_mb_s")
            chosen = {"around the page cache" if a else "buffered" for p in of(mode, "around") for a in p}
            sharing = sorted({s for p in of(mode, "sharing") for s in p})
            alone = {f for p in of(mode, "fits_alone") for f in p}
            table.append([
                f"{share:.0%}", mode, " / ".join(sorted(chosen)), ", ".join(map(str, sharing)),
                " / ".join("yes" if f else "no" for f in sorted(alone, reverse=True)),
                f"{statistics.median(of(mode, 'available_share')):.0%}",
                f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})",
                per_round if mode == "chosen" else "1",
                f"{statistics.median(of(mode, 'disk_per_trained')):.3f}",
                f"{statistics.median(of(mode, 'exposed')):.1%}",
            ])  # fmt: skip
    headers = ["cache held to", "reads", "each rank read", "ranks on the host", "a rank's store fits alone",
               "memory available / stores",
               "read MB/s, all ranks (min-max)", "chosen / buffered, per round (min-max)",
               "disk bytes / trained", "exposed share"]  # fmt: skip
    markdown = (
        f"### Several ranks on one host under memory pressure (`bench/pressure_ranks.py`)\n\n"
        f"Machine: {machine()}. {args.count:,} JPEGs ({set_bytes / 1e9:.2f} GB), {args.ranks} gloo ranks on "
        f"one host, each with its share in its own store on the same disk, the page cache held to "
        f"{' and '.join(f'{x:.0%}' for x in args.cache_share)} of the stores together (beside 1 GiB a "
        f"rank), partial 0.1, {args.epochs} epochs read in the plan's order (raw bytes, batch {args.batch}, "
        f"1 DataLoader worker per rank) while the exchange runs beside them; {args.rounds} rounds, the two "
        "runs of a round in alternating order. *chosen*: the library's choice (`RESHUFFLE_DIRECT_READS` "
        "unset); *buffered*: `RESHUFFLE_DIRECT_READS=0`. *read MB/s*: sample bytes of all epochs over the "
        "slowest rank's reading time; *disk bytes / trained*: the disk's reads during rank 0's reading "
        "(the exchange's reads of what it sends are in it) over the sample bytes trained; *fits alone*: a "
        "rank's store against `MemAvailable` after its last epoch, and that over the stores together "
        "(what the page cache could hold beside the ranks' processes). Command: "
        f"`.venv/bin/python bench/pressure_ranks.py --ranks {args.ranks} --rounds {args.rounds} "
        f"--cache-share {' '.join(map(str, args.cache_share))}`.\n\n"
        + format_table(headers, table, markdown=True)
    )
    print(markdown)
    if not args.no_write:
        write_results("pressure-ranks", {"args": vars(args) | {"root": str(args.root)}, "passes": passes},
                      markdown)  # fmt: skip


if __name__ == "__main__":
    main()
