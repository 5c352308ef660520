"""Store mode at the size it exists for: an ImageNet-like set of real JPEGs read by reshuffle's
store and index modes and by the loaders users would otherwise pick, on the same disk.

    .venv/bin/pip install -e '.[bench]'      # MosaicML Streaming, LitData, WebDataset (bench only)
    .venv/bin/python bench/scale.py          # about 25 GB of disk and an hour on 2 cores at the defaults

Generates (or reuses) ``--count`` JPEGs (``--size`` px, 4:4:4, quality 90, about 106 KB each at
the defaults: 40,000 images, 4.2 GB, 100 classes) as an ImageFolder tree under ``--root``, writes
them in each system's format (timed: staging MB/s, against ``dd``'s direct write of as many bytes
on the same disk), then reads one epoch per system and condition, each in a fresh process
(``DataLoader``, ``--batch`` 64, ``--workers`` 2, a shuffled order), interleaved system by
system and repeated ``--repeats`` times:

* ``warm``: the store's files in the page cache (an epoch read just before);
* ``cold``: the data's files dropped from the page cache first (``POSIX_FADV_DONTNEED``; the
  interpreter and libraries stay cached, so the disk bytes counted are the data's);
* ``pressure``: cold, and a helper process holds anonymous memory (written, so resident; this VM
  has no swap) until what the page cache can hold is ``--cache-share`` (0.3) of the store: most of
  an epoch's reads must come from the disk, and what was read early is evicted before the end.

Raw epochs yield each sample's bytes (the collate, in the workers, only counts them); decoded
epochs (``--decode-limit`` samples, warm) decode with PIL, resize to 224 and make a tensor in the
workers. Per epoch: samples/s, bytes read from the disk (``/proc/diskstats``) per byte trained,
and the peak resident and anonymous memory of the main process and of the busiest worker.

Systems: ``reshuffle-store`` (``ShuffledData`` in store mode, 1 rank), ``reshuffle-index``
(``ShuffledData`` in index mode over the files), ``imagefolder`` (torchvision's, a loader that
returns bytes), ``mds`` (MosaicML Streaming, local), ``litdata`` (local), ``webdataset`` (tar
shards, shuffle buffer 1,000). Results: ``bench/out/scale.json`` and the ``scale`` section of
docs/benchmarks.md. ``--profile`` instead prints where a warm read's time goes per sample (user
and system CPU, minor page faults) for each of ``--systems``, read in one process;
``--announcements`` how many records each batch of a store epoch under pressure read one by one
from the disk before the rest were announced to the kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common import machine, write_results

SYSTEMS = ("reshuffle-store", "reshuffle-index", "imagefolder", "mds", "litdata", "webdataset")
CONDITIONS = ("warm", "cold", "pressure")
WARM_EPOCHS = 3  # timed warm epochs per repeat (after one that fills the cache)
FORMATS = {"reshuffle-store": "store", "mds": "mds", "litdata": "litdata", "webdataset": "wds"}


# ----------------------------------------------------------------------------- the data set


def _images(args: tuple[str, int, int, int, int]) -> int:
    """Write JPEGs ``start .. stop`` (one process's share); their bytes in all."""
    from PIL import Image

    root, start, stop, classes, size = args
    written = 0
    for index in range(start, stop):
        rng = np.random.default_rng((20261206, index))
        path = Path(root) / f"class_{index % classes:03d}" / f"{index:07d}.jpg"
        if path.is_file():
            written += path.stat().st_size
            continue
        low = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC)).astype(np.int16)
        pixels = np.clip(smooth + rng.normal(0, rng.uniform(35, 60), smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90, subsampling=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(buffer.getvalue())
        temporary.rename(path)
        written += len(buffer.getvalue())
    return written


def generate(root: Path, count: int, classes: int, size: int, workers: int) -> tuple[list[str], list[int]]:
    """The ImageFolder tree (made once; reused when its description matches); files and labels."""
    import multiprocessing

    images = root / "images"
    description = {"count": count, "classes": classes, "size": size, "format": "jpeg q90 4:4:4"}
    marker = root / "images.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == description):
        shutil.rmtree(images, ignore_errors=True)
        for name in FORMATS.values():
            shutil.rmtree(root / name, ignore_errors=True)
        started = time.perf_counter()
        bounds = np.linspace(0, count, workers * 8 + 1).astype(int)
        jobs = [(str(images), int(a), int(b), classes, size) for a, b in itertools.pairwise(bounds)]
        with multiprocessing.Pool(workers) as pool:
            total = sum(pool.map(_images, jobs))
        marker.write_text(json.dumps(description))
        print(f"generated {count} JPEGs, {total / 1e9:.2f} GB, in {time.perf_counter() - started:.0f} s")
    files = [str(images / f"class_{i % classes:03d}" / f"{i:07d}.jpg") for i in range(count)]
    return files, [i % classes for i in range(count)]


class Files:
    """Item ``i``: (the JPEG's bytes, its label), read from its own file."""

    def __init__(self, files: list[str], labels: list[int]) -> None:
        self.files, self.targets = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        with open(self.files[index], "rb") as handle:
            return handle.read(), self.targets[index]


# ----------------------------------------------------------------------------- writing


def _one_rank_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def write_format(system: str, root: Path, files: list[str], labels: list[int]) -> float:
    """Write the set in ``system``'s format under ``root`` (from scratch); seconds, until durable."""
    target = root / FORMATS[system]
    shutil.rmtree(target, ignore_errors=True)
    os.sync()  # the removal's discards (a disk mounted with discard) before the clock starts
    source = Files(files, labels)
    started = time.perf_counter()
    if system == "reshuffle-store":
        from reshuffle import ShuffledData

        _one_rank_group()
        data = ShuffledData(source, target, strategy="local", seed=0, epochs=1)
        data.set_epoch(0)  # stages
        data.close()
    elif system == "mds":
        from streaming import MDSWriter

        with MDSWriter(out=str(target), columns={"image": "bytes", "label": "int"}, size_limit="64mb") as out:
            for index in range(len(source)):
                image, label = source[index]
                out.write({"image": image, "label": label})
    elif system == "litdata":
        import litdata

        litdata.optimize(fn=_litdata_item, inputs=list(zip(files, labels, strict=True)),
                         output_dir=str(target), chunk_bytes="64MB", num_workers=1,
                         mode="overwrite")  # fmt: skip
    elif system == "webdataset":
        import webdataset

        target.mkdir(parents=True)
        with webdataset.ShardWriter(str(target / "shard-%06d.tar"), maxsize=256 << 20, verbose=0) as sink:
            for index in range(len(source)):
                image, label = source[index]
                sink.write({"__key__": f"{index:07d}", "jpg": image, "cls": label})
    os.sync()  # every writer's bytes on the disk, as reshuffle's fsyncs have them
    return time.perf_counter() - started


def _litdata_item(item: tuple[str, int]) -> dict[str, Any]:
    with open(item[0], "rb") as handle:
        return {"image": handle.read(), "label": item[1]}


def copy_bound_seconds(root: Path, nbytes: int) -> float:
    """The least a staging that reads its source from the disk it writes to can take, from the
    disk alone: ``dd`` reading a cold file of ``nbytes`` sequentially with direct I/O while another
    ``dd`` writes as many bytes beside it (16 MiB blocks, both at once, until durable). A staging
    reads its source as well as writing the store, so its rate is bounded by the disk's combined
    read and write rate over two; reading many small files instead of one can only be slower."""
    source, target = root / "copy-source.bin", root / "copy-target.bin"
    count = max(1, nbytes // (16 << 20))
    subprocess.run(["dd", "if=/dev/urandom", f"of={source}", "bs=16M", f"count={count}", "oflag=direct",
                    "conv=fsync", "status=none"], check=True)  # fmt: skip
    started = time.perf_counter()
    reader = subprocess.Popen(["dd", f"if={source}", "of=/dev/null", "bs=16M", "iflag=direct", "status=none"])
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "oflag=direct",
                    "conv=fsync", "status=none"], check=True)  # fmt: skip
    reader.wait()
    seconds = time.perf_counter() - started
    source.unlink()
    target.unlink()
    return seconds * nbytes / (count * (16 << 20))


def warm(files: list[str]) -> None:
    """Read every file once: the source in the page cache, as from a device the store is not on."""
    for name in files:
        with open(name, "rb") as handle:
            while handle.read(1 << 20):
                pass


def dd_write_seconds(root: Path, nbytes: int) -> float:
    """``dd`` writing ``nbytes`` with direct I/O on the same disk (then removed)."""
    target = root / "dd.bin"
    count = max(1, nbytes // (16 << 20))
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "oflag=direct",
                    "conv=fsync", "status=none"], check=True)  # fmt: skip
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds * nbytes / (count * (16 << 20))


# ----------------------------------------------------------------------------- one epoch (child)


def raw_collate(batch: list[Any]) -> tuple[int, int]:
    """Count the batch's bytes (in the worker): the epoch's work is reading them."""
    return sum(len(_image(item)) for item in batch), len(batch)


def decoded_collate(batch: list[Any]) -> tuple[Any, int]:
    """Decode, resize to 224 and make a tensor, in the worker, as a training pipeline would."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    tensors = [
        pil_to_tensor(Image.open(io.BytesIO(_image(item))).convert("RGB").resize((224, 224)))
        for item in batch
    ]
    return torch.stack(tensors), len(batch)


def _image(item: Any) -> bytes:
    if isinstance(item, dict):
        return item["image"] if "image" in item else item["jpg"]
    return item[0]


def read_epoch(system: str, root: Path, files: list[str], labels: list[int], options: dict) -> dict:
    """One epoch of ``system`` in this process; samples, bytes and seconds."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler, Subset

    limit = options["limit"] or len(files)
    collate = decoded_collate if options["decode"] else raw_collate
    if options["decode"]:  # imported before the workers fork, for every system alike: imported
        # in each worker instead, they cost ~1 CPU-second a worker of a 3-5 s epoch (ImageFolder
        # had torchvision imported already, and decoded 1.3x faster than the rest for it)
        import PIL.Image  # noqa: F401
        import torchvision.transforms.functional  # noqa: F401
    loader_options = {
        "batch_size": options["batch"],
        "num_workers": options["workers"],
        "collate_fn": collate,
    }
    generator = torch.Generator().manual_seed(0)
    if system in ("reshuffle-store", "reshuffle-index"):
        from reshuffle import ShuffledData

        if system == "reshuffle-store":
            _one_rank_group()
            data = ShuffledData(Files(files, labels), root / "store", strategy="local", seed=0, epochs=1)
        else:
            data = ShuffledData(Files(files, labels), mode="index", strategy="local", seed=0, epochs=1)
        data.set_epoch(0)
        order = list(data.sampler)[:limit]
        loader = DataLoader(data.dataset, sampler=order, **loader_options)
    elif system == "imagefolder":
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(str(root / "images"), loader=_read_bytes)
        sampler = RandomSampler(dataset, generator=generator, num_samples=limit)
        loader = DataLoader(dataset, sampler=sampler, **loader_options)
    elif system == "mds":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        dataset = StreamingDataset(local=str(root / "mds"), shuffle=True, shuffle_seed=0,
                                   batch_size=options["batch"])  # fmt: skip
        loader = DataLoader(Subset(dataset, range(limit)) if options["limit"] else dataset, **loader_options)
    elif system == "litdata":
        import litdata

        dataset = litdata.StreamingDataset(str(root / "litdata"), shuffle=True, seed=0)
        if options["limit"]:
            dataset = Subset(dataset, range(limit))
        loader = DataLoader(dataset, **loader_options)
    elif system == "webdataset":
        import webdataset

        shards = sorted(str(p) for p in (root / "wds").glob("shard-*.tar"))
        dataset = webdataset.WebDataset(shards, shardshuffle=len(shards), seed=0, empty_check=False).shuffle(
            1000
        )
        if options["limit"]:
            dataset = dataset.slice(limit // max(1, options["workers"]))
        loader = DataLoader(dataset, **loader_options)
    else:
        raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    device = device_of(root)
    before = disk_sectors_read(device)
    started = time.perf_counter()
    samples = nbytes = 0
    for payload, count in loader:
        samples += count
        nbytes += payload if isinstance(payload, int) else 0
    seconds = time.perf_counter() - started
    disk_bytes = (disk_sectors_read(device) - before) * 512
    if system == "reshuffle-store":
        data.close()
    return {"samples": samples, "bytes": nbytes, "seconds": seconds, "disk_bytes": disk_bytes}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


# ----------------------------------------------------------------------------- the driver


def disk_sectors_read(device: str) -> int:
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if fields[2] == device:
            return int(fields[5])
    raise ValueError(f"no disk {device} in /proc/diskstats")


def device_of(path: Path) -> str:
    number = os.stat(path).st_dev
    major, minor = os.major(number), os.minor(number)
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if int(fields[0]) == major and int(fields[1]) == minor:
            return fields[2]  # a partition has counters of its own
    raise ValueError(f"cannot find the disk holding {path}")


def _memory_kb(pid: int) -> tuple[int, int]:
    """(resident, anonymous) kB of a process, (0, 0) once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = {
        line.split(":")[0]: int(line.split()[1])
        for line in status.splitlines()
        if line.startswith(("VmRSS", "RssAnon"))
    }
    return values.get("VmRSS", 0), values.get("RssAnon", 0)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def watch_memory(pid: int, peaks: dict[int, tuple[int, int]], stop: threading.Event) -> None:
    """Peak (resident, anonymous) per process of ``pid``'s tree, polled every 0.2 s."""
    while not stop.is_set():
        tree, frontier = [], [pid]
        while frontier:
            node = frontier.pop()
            tree.append(node)
            frontier += _children(node)
        for node in tree:
            rss, anon = _memory_kb(node)
            old = peaks.get(node, (0, 0))
            peaks[node] = (max(old[0], rss), max(old[1], anon))
        stop.wait(0.2)


def evict(directory: Path) -> int:
    """Drop ``directory``'s files from the page cache (``POSIX_FADV_DONTNEED``, after a sync):
    cold data, while the interpreter and libraries stay cached, so the disk bytes an epoch reads
    are its data's. Returns the bytes of the files evicted."""
    os.sync()
    total = 0
    for path in directory.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(descriptor).st_size
            finally:
                os.close(descriptor)
    return total


def hold_memory(keep_for_cache: int) -> subprocess.Popen | None:
    """A process holding (written, so resident) all available memory but ``keep_for_cache``
    bytes; None where nothing needs holding."""
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable"))  # fmt: skip
    hold = available - keep_for_cache
    if hold <= 0:
        return None
    holder = subprocess.Popen(
        [sys.executable, "-c", "import numpy, sys; a = numpy.ones(int(sys.argv[1]), numpy.uint8); "
         "print('held', flush=True); sys.stdin.read()", str(hold)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    holder.stdout.readline()  # every page written
    return holder


@contextlib.contextmanager
def page_cache_held(args: argparse.Namespace, nbytes: int, room: int = 1 << 30) -> Iterator[None]:
    """Inside the block, the page cache can hold ``--cache-share`` of ``nbytes``, plus ``room``
    bytes for the processes at work (:func:`hold_memory`)."""
    holder = hold_memory(int(args.cache_share * nbytes) + room)
    try:
        yield
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def run_epoch(
    system: str, condition: str, args: argparse.Namespace, store_bytes: int, device: str, decode: bool = False
) -> dict:
    """One epoch in a fresh process under ``condition``; its figures."""
    if condition in ("cold", "pressure"):
        for directory in ("images", *FORMATS.values()):
            if (args.root / directory).exists():
                evict(args.root / directory)
    command = [sys.executable, __file__, "--epoch", system, "--root", str(args.root),
               "--count", str(args.count), "--classes", str(args.classes), "--batch", str(args.batch),
               "--workers", str(args.workers)]  # fmt: skip
    if decode:
        command += ["--decode", "--decode-limit", str(args.decode_limit)]
    peaks: dict[int, tuple[int, int]] = {}
    with page_cache_held(args, store_bytes) if condition == "pressure" else contextlib.nullcontext():
        before = disk_sectors_read(device)
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        stop = threading.Event()
        watcher = threading.Thread(target=watch_memory, args=(child.pid, peaks, stop), daemon=True)
        watcher.start()
        out, _ = child.communicate(timeout=3600)
        stop.set()
        watcher.join()
        process_disk_bytes = (disk_sectors_read(device) - before) * 512
    if child.returncode != 0:
        raise RuntimeError(f"{system} ({condition}) failed with exit {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    main_rss, main_anon = peaks.get(child.pid, (0, 0))
    workers = [v for pid, v in peaks.items() if pid != child.pid]
    result.update(
        system=system, condition=condition, decode=decode, process_disk_bytes=process_disk_bytes,
        main_rss_mb=main_rss / 1024, main_anon_mb=main_anon / 1024,
        worker_rss_mb=max((v[0] for v in workers), default=0) / 1024,
        worker_anon_mb=max((v[1] for v in workers), default=0) / 1024,
    )  # fmt: skip
    return result


def set_arguments(parser: argparse.ArgumentParser, root_help: str) -> None:
    """The JPEG set's options, shared by the benchmarks that make or reuse it."""
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reshuffle-scale",
                        help=root_help)  # fmt: skip
    parser.add_argument("--count", type=int, default=40_000, help="JPEGs in the set")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    set_arguments(parser, "where the set and every format live (about 5x its size)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--cache-share", type=float, default=0.3, help="page cache left, as a share of the store"
    )
    parser.add_argument("--decode-limit", type=int, default=3000, help="samples per decoded epoch")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md")
    parser.add_argument("--epoch", choices=SYSTEMS, help=argparse.SUPPRESS)  # the children's entries
    parser.add_argument("--write", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="per sample CPU of warm reads, then exit")
    parser.add_argument("--announcements", action="store_true",
                        help="records a batch reads before announcing the rest, under pressure")  # fmt: skip
    args = parser.parse_args()
    files = [
        str(args.root / "images" / f"class_{i % args.classes:03d}" / f"{i:07d}.jpg")
        for i in range(args.count)
    ]
    labels = [i % args.classes for i in range(args.count)]
    if args.write:  # in a process of its own: a store's job lock lives as long as its process
        print(json.dumps(write_format(args.write, args.root, files, labels)))
        return
    if args.profile:
        profile(args, files, labels)
        return
    if args.announcements:
        announcements(args, files, labels)
        return
    if args.epoch:
        options = {"batch": args.batch, "workers": args.workers, "decode": args.decode,
                   "limit": args.decode_limit if args.decode else 0}  # fmt: skip
        print(json.dumps(read_epoch(args.epoch, args.root, files, labels, options)))
        return
    args.root.mkdir(parents=True, exist_ok=True)
    files, labels = generate(args.root, args.count, args.classes, args.size, max(1, os.cpu_count() or 1))
    set_bytes = sum(os.path.getsize(f) for f in files)
    device = device_of(args.root)
    conditions = list(args.conditions)
    staging = {}

    def write(system: str) -> float:
        command = [sys.executable, __file__, "--write", system, "--root", str(args.root),
                   "--count", str(args.count), "--classes", str(args.classes)]  # fmt: skip
        written = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        return set_bytes / float(written.stdout.strip().splitlines()[-1]) / 1e6

    def write_cold(system: str) -> float:
        evict(args.root / "images")  # every writer reads the JPEGs from the disk
        return write(system)

    def write_pressed() -> float:
        evict(args.root / "images")
        with page_cache_held(args, set_bytes):
            return write("reshuffle-store")

    def write_warm() -> float:
        warm(files)  # as from another device; the store the epochs read is the last one staged
        return write("reshuffle-store")

    for system in [s for s in args.systems if s in FORMATS]:
        # the store's stagings vary run to run (283-770 MB/s cold here): median of 3 each; the
        # peers' writers, 4-7x slower, once
        runs = 3 if system == "reshuffle-store" else 1
        staging[system] = {"mb_per_s": statistics.median(write_cold(system) for _ in range(runs))}
        print(f"staged {system}: {staging[system]['mb_per_s']:.0f} MB/s", flush=True)
    if "reshuffle-store" in staging:  # a page cache smaller than the store; the source in it
        staging["reshuffle-store"]["pressure_mb_per_s"] = statistics.median(write_pressed() for _ in range(3))
        staging["reshuffle-store"]["warm_source_mb_per_s"] = statistics.median(write_warm() for _ in range(3))
    dd_seconds = statistics.median(dd_write_seconds(args.root, set_bytes) for _ in range(3))
    copy_mb = set_bytes / copy_bound_seconds(args.root, set_bytes) / 1e6
    staging["copy-bound"] = {"mb_per_s": copy_mb}
    store_bytes = (
        sum(p.stat().st_size for p in (args.root / "store").rglob("*") if p.is_file())
        if (args.root / "store").exists()
        else set_bytes
    )
    epochs = []
    for repeat in range(args.repeats):
        # each repeat starts the round at another system: the first epoch after a change of
        # condition (a memory holder killed, the cache refilled) ran slow here, whoever ran it
        turn = repeat % len(args.systems)
        for condition in conditions:
            for system in args.systems[turn:] + args.systems[:turn]:
                if condition == "warm":
                    run_epoch(system, "warm", args, store_bytes, device)  # fills the cache
                # a warm epoch takes 1-5 s and varies by +-15% on this VM: 3 of them a repeat
                for _ in range(WARM_EPOCHS if condition == "warm" else 1):
                    result = run_epoch(system, condition, args, store_bytes, device)
                    result["repeat"] = repeat
                    epochs.append(result)
                    rate = result["samples"] / result["seconds"]
                    print(f"{system:16s} {condition:8s} {rate:8.0f} samples/s  "
                          f"disk/trained {result['disk_bytes'] / max(1, result['bytes']):.2f} "
                          f"(whole process {result['process_disk_bytes'] / max(1, result['bytes']):.2f})",
                          flush=True)  # fmt: skip
    for system in args.systems:  # decoded, warm
        run_epoch(system, "warm", args, store_bytes, device, decode=True)
        result = run_epoch(system, "warm", args, store_bytes, device, decode=True)
        epochs.append(result)
        print(f"{system:16s} decoded  {result['samples'] / result['seconds']:8.0f} samples/s", flush=True)
    report(args, staging, dd_seconds, set_bytes, store_bytes, epochs, conditions)


def profile(args: argparse.Namespace, files: list[str], labels: list[int]) -> None:
    """Where a warm epoch's time goes: per sample, user and system CPU seconds and minor page
    faults of 20,000 samples read in this process (no workers), after a warm-up."""
    import resource

    options = {"batch": args.batch, "workers": 0, "decode": False, "limit": min(len(files), 20_000)}
    for system in args.systems:
        read_epoch(system, args.root, files, labels, options)  # the cache warm, the code loaded
        before = resource.getrusage(resource.RUSAGE_SELF)
        result = read_epoch(system, args.root, files, labels, options)
        after = resource.getrusage(resource.RUSAGE_SELF)
        samples = result["samples"]
        print(f"{system:16s} {samples / result['seconds']:8.0f} samples/s  "
              f"user {(after.ru_utime - before.ru_utime) / samples * 1e6:5.1f} us  "
              f"system {(after.ru_stime - before.ru_stime) / samples * 1e6:5.1f} us  "
              f"minor faults {(after.ru_minflt - before.ru_minflt) / samples:5.1f} per sample")  # fmt: skip


def announcements(args: argparse.Namespace, files: list[str], labels: list[int]) -> None:
    """How soon a store epoch's batches go to the disk side by side under pressure: per batch,
    the records read one by one before the rest were announced (``POSIX_FADV_WILLNEED``), over
    one epoch in the plan's order, read in this process (no workers) with the page cache held
    to ``--cache-share`` of the store (staged by an earlier run, or now)."""
    from collections import Counter

    from reshuffle import ShuffledData

    _one_rank_group()
    data = ShuffledData(Files(files, labels), args.root / "store", strategy="local", seed=0, epochs=1)
    data.set_epoch(0)
    store = data.store
    assert store is not None
    reader, order = store.reader, np.asarray(list(data.sampler))
    real, seen = reader._announce, []
    reader._announce = lambda rest: (seen.append(rest.size), real(rest))  # type: ignore[method-assign]
    counts: Counter[int] = Counter()
    store_bytes = sum(p.stat().st_size for p in (args.root / "store").rglob("*") if p.is_file())
    evict(args.root / "store")
    with page_cache_held(args, store_bytes):
        for first in range(0, order.size, args.batch):
            batch, seen[:] = order[first : first + args.batch], []
            for _ in store.read_many(batch):
                pass
            counts[batch.size - seen[0] if seen else batch.size] += 1
    data.close()
    batches = sum(counts.values())
    print(f"{batches} batches of {args.batch}; records read before the rest were announced: "
          + ", ".join(f"{n}: {c} ({c / batches:.1%})" for n, c in sorted(counts.items())))  # fmt: skip


def report(args, staging, dd_seconds, set_bytes, store_bytes, epochs, conditions) -> None:
    from reshuffle.report.table import format_table

    def cell(system: str, condition: str, key: str, decode: bool = False) -> float:
        values = [key(e) if callable(key) else e[key] for e in epochs
                  if (e["system"], e["condition"], e["decode"]) == (system, condition, decode)]  # fmt: skip
        return statistics.median(values) if values else float("nan")

    rate = lambda e: e["samples"] / e["seconds"]  # noqa: E731
    read_ratio = lambda e: e["disk_bytes"] / max(1, e["bytes"])  # noqa: E731
    rows = []
    for system in args.systems:
        row = [system]
        for condition in conditions:
            row += [cell(system, condition, rate), cell(system, condition, read_ratio)]
        row += [cell(system, "warm", rate, decode=True)]
        row += [max((e["main_anon_mb"] for e in epochs if e["system"] == system), default=0),
                max((e["worker_anon_mb"] for e in epochs if e["system"] == system), default=0),
                max((e["main_rss_mb"] for e in epochs if e["system"] == system), default=0),
                max((e["worker_rss_mb"] for e in epochs if e["system"] == system), default=0)]  # fmt: skip
        row += [staging[system]["mb_per_s"] if system in staging else "-"]
        rows.append(row)
    headers = ["system"]
    for condition in conditions:
        headers += [f"{condition} samples/s", f"{condition} disk/trained"]
    headers += ["decoded samples/s (warm)", "main anon MB", "worker anon MB", "main RSS MB", "worker RSS MB",
                "staging MB/s"]  # fmt: skip
    table = format_table(headers, rows, markdown=True)
    print(table)
    others = [s for s in args.systems if not s.startswith("reshuffle")]
    ratios = []
    for condition in conditions:
        best = max((cell(s, condition, rate) for s in others), default=float("nan"))
        store = cell("reshuffle-store", condition, rate)
        readers = [cell(s, condition, rate) for s in ("imagefolder", "reshuffle-index")]
        files = max((v for v in readers if v == v), default=float("nan"))  # the faster that reads files
        ratios.append(
            f"{condition}: store / best other {store / best:.2f}, store / files {store / files:.2f}"
        )
    dd_mb = set_bytes / dd_seconds / 1e6
    nan = float("nan")
    store_staging = staging.get("reshuffle-store", {})
    copy_mb = staging.get("copy-bound", {}).get("mb_per_s", nan)
    cold_mb, pressure_mb = store_staging.get("mb_per_s", nan), store_staging.get("pressure_mb_per_s", nan)
    warm_mb = store_staging.get("warm_source_mb_per_s", nan)
    markdown = f"""## Store mode at scale: real JPEGs against the peers (`bench/scale.py`)

{machine()}, {os.cpu_count()} CPUs; {args.count:,} JPEGs ({set_bytes / 1e9:.2f} GB, {args.classes} classes,
{args.size} px, quality 90, 4:4:4), one epoch per system and condition in a fresh process
(`DataLoader`, batch {args.batch}, {args.workers} workers, shuffled order), median of {args.repeats}
({args.repeats * WARM_EPOCHS} warm), each repeat's round of systems starting at the next one;
"pressure": a helper holds anonymous memory so that the page cache can hold {args.cache_share:.0%} of
the store. "disk/trained": bytes read from the disk (`/proc/diskstats`) while the epoch's loop ran,
per byte trained (the process's start before it, which under pressure rereads libraries the
helper evicted, is not counted). Memory:
the peak over the run of the main process and of the busiest worker. Command:
`.venv/bin/python bench/scale.py --count {args.count} --repeats {args.repeats}`.

{table}

Staging, against `dd`'s direct write of as many bytes on the same disk ({dd_mb:.0f} MB/s, median
of 3); reshuffle's stagings median of 3, the peers' one each. The table's column: the JPEGs
cold on that disk, {cold_mb / dd_mb:.2f} of `dd`. The same with
the page cache held to {args.cache_share:.0%} of the store, as for a store bigger than memory:
{pressure_mb:.0f} MB/s ({pressure_mb / dd_mb:.2f}). The JPEGs in the page cache (as from another
device): {warm_mb:.0f} MB/s ({warm_mb / dd_mb:.2f}). The disk's own bound for a staging that reads
its source from the disk it writes to (one `dd` reading a cold file while another writes as many
bytes, both sequential with direct I/O): {copy_mb:.0f} MB/s, {copy_mb / dd_mb:.2f} of `dd`; the
store's staging from the cold JPEGs is {cold_mb / copy_mb:.2f} of it. The store holds
{store_bytes / 1e9:.2f} GB for {set_bytes / 1e9:.2f} GB of JPEGs.

{"; ".join(ratios)}.
"""
    if not args.no_write:
        write_results("scale", {"staging": staging, "dd_seconds": dd_seconds, "epochs": epochs}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
