"""Offline verification of a whole store: ``reshuffle verify STORE_DIR``.

Checks that the rank stores together hold every sample exactly once with intact checksums, and
names each problem: missing or extra rank directories (a store of another world size), missing
or damaged manifests and indexes, missing or truncated packs, corrupt samples, stray files,
manifests of different epochs (stale), interrupted commits, samples held twice or by nobody, and
holdings that differ from the store's plan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reshuffle.plan import ShufflePlanner
from reshuffle.store import format as fmt
from reshuffle.store.meta import StoreMeta, read_meta
from reshuffle.store.rank_store import RankStore
from reshuffle.store.reads import CorruptSampleError


class InFlight(str):
    """A finding that is no damage: an exchange (or compaction) in flight when the job stopped,
    which the next start of the job finishes or rolls back."""


def open_verified(root: str | Path, rank: int, meta: StoreMeta | None = None) -> RankStore:
    """:meth:`RankStore.open`, then every check of :func:`rank_problems` (checksums included):
    a damaged store is refused with the same messages ``reshuffle verify`` prints."""
    store = RankStore.open(root, rank, meta)
    if found := rank_problems(store, checksums=True):
        raise fmt.StoreError(f"store {root} is damaged; refusing to open it:\n  " + "\n  ".join(found))
    return store


def check_holdings(store: RankStore, planner: ShufflePlanner) -> None:
    """Raise StoreError unless the store holds exactly the plan's holdings at its epoch."""
    expected = planner.plan(store.epoch).holdings(store.rank)
    if not np.array_equal(store.ids, expected):
        extra = np.setdiff1d(store.ids, expected).size
        missing = np.setdiff1d(expected, store.ids).size
        raise fmt.StoreError(
            f"rank {store.rank}'s store at epoch {store.epoch} holds {extra} sample(s) "
            f"the plan does not give it and lacks {missing} it should hold; "
            "the store belongs to another plan or is damaged: restage it"
        )


def _ids(ids: np.ndarray) -> str:
    shown = ", ".join(map(str, ids[:10].tolist()))
    return shown + (f" ... ({ids.size} in all)" if ids.size > 10 else "")


def verify_store(
    root: str | Path, *more: str | Path, checksums: bool = True, node: bool = False
) -> list[str]:
    """Every problem found in the store at ``root`` (an empty list: all is well).

    A job whose rank folders live on several nodes is checked whole by giving every node's store
    directory (``more``); ``node=True`` checks only the ranks present (one node's share: their
    files and samples, not the union over ranks, which needs every rank)."""
    roots = [Path(r) for r in (root, *more)]
    metas = []
    for each in roots:
        if not each.is_dir():
            return [f"{each} is not a directory"]
        try:
            metas.append(read_meta(each))
        except fmt.StoreError as error:
            return [f"{error}; is {each} a store directory?"]
    meta = metas[0]
    problems: list[str] = [
        f"{other}: store.json differs from {roots[0]}'s (stores of different jobs)"
        for other, theirs in zip(roots[1:], metas[1:], strict=True)
        if theirs.to_json() != meta.to_json()
    ]
    ranks_present: dict[int, Path] = {}
    for each in roots:
        problems += _rank_dirs(each, meta, ranks_present)
    stores: list[RankStore] = []
    for rank in range(meta.world_size):
        if rank not in ranks_present:
            if not node:
                problems.append(
                    f"rank {rank}: directory {fmt.rank_dir_name(rank)} is missing (on another node? give "
                    "every node's store directory, or --node to check this node's share)"
                )
            continue
        try:
            store = RankStore.open(ranks_present[rank], rank)
        except fmt.StoreError as error:
            problems.append(f"rank {rank}: {error}")
            continue
        try:
            problems += rank_problems(store, checksums=checksums)
        except fmt.StoreError as error:  # e.g. a file that resolves outside the store: name it, go on
            problems.append(f"rank {rank}: {error}")
        if (pending := store.prepared_epoch()) is not None:
            problems.append(
                InFlight(
                    f"rank {rank}: an exchange into epoch {pending} is in flight (prepared, not committed); "
                    "the next start of the job finishes it or rolls it back"
                )
            )
        stores.append(store)
    epochs = {store.rank: store.epoch for store in stores}
    if len(set(epochs.values())) > 1:
        newest = max(epochs.values())
        stale = sorted(rank for rank, epoch in epochs.items() if epoch != newest)
        behind = [store for store in stores if store.rank in stale]
        finishable = all(s.epoch == newest - 1 and s.prepared_epoch() == newest for s in behind)
        advice = (
            "a commit was interrupted; restart the job to finish it"
            if finishable
            else "no exchange in flight can bring them together, so a restart cannot repair it; restage "
            "the store (remove it: the next run stages it from the source)"
        )
        line = (
            f"stale manifest: rank(s) {stale} are at epoch(s) {sorted({epochs[r] for r in stale})}, "
            f"the others at {newest} ({advice})"
        )
        problems.append(InFlight(line) if finishable else line)
    if not ranks_present:
        problems.append(f"no rank directory in {', '.join(map(str, roots))}")
    if len(stores) == meta.world_size and len({store.epoch for store in stores}) == 1:
        problems += _check_union(stores, meta.num_samples)
        if not damage(problems):
            problems += _check_plan(stores, meta.plan)
    return problems


def damage(problems: list[str]) -> list[str]:
    """The problems that are damage, not an exchange in flight (:class:`InFlight`)."""
    return [problem for problem in problems if not isinstance(problem, InFlight)]


def _rank_dirs(root: Path, meta: StoreMeta, found: dict[int, Path]) -> list[str]:
    """Record ``root``'s rank directories in ``found`` (rank -> store root); the problems seen."""
    problems = []
    for entry in sorted(root.iterdir()):
        rank = fmt.rank_of_dir(entry.name)
        if entry.name == fmt.STORE_FILE or entry.name.endswith(".tmp"):
            continue
        if rank is None or not entry.is_dir():
            problems.append(f"stray file {entry.name} in {root} (not part of a store); remove it")
        elif rank >= meta.world_size:
            problems.append(
                f"{entry.name}: the store was written for world size {meta.world_size}; this directory "
                "belongs to a store of another world size"
            )
        elif rank in found:
            problems.append(f"rank {rank}: a directory in both {found[rank]} and {root}; keep one")
        else:
            found[rank] = root
    return problems


def rank_problems(store: RankStore, *, checksums: bool = True) -> list[str]:
    """Everything wrong with this rank's committed files (empty when all is well)."""
    found: list[str] = []
    manifest = fmt.read_json(store.directory / fmt.MANIFEST, "manifest")
    sizes = manifest.get("pack_sizes", {})
    unsafe = set()
    for name, expected in sorted(sizes.items()):
        try:
            path = fmt.inside(store.directory, f"{fmt.PACK_DIR}/{name}")
        except fmt.StoreError as error:
            found.append(f"rank {store.rank}: {error}")
            unsafe.add(name)
            continue
        if not path.is_file():
            found.append(f"rank {store.rank}: pack {fmt.PACK_DIR}/{name} is missing")
            continue
        actual = path.stat().st_size
        if actual != expected:
            state = "truncated" if actual < expected else "longer than committed"
            found.append(
                f"rank {store.rank}: pack {fmt.PACK_DIR}/{name} is {state} "
                f"({actual} bytes, manifest says {expected})"
            )
    if checksums:
        on_disk = {
            name: (store.pack_dir / name).stat().st_size
            for name in sizes
            if name not in unsafe and (store.pack_dir / name).is_file()
        }
        ends = store.records["offset"] + store.records["length"]
        available = np.array([on_disk.get(fmt.pack_name(int(s)), -1) for s in store.records["pack"]])
        readable = store.records[available >= ends.astype(np.int64)]
        bad = [int(r["id"]) for r in readable if not _intact(store, r)]
        if bad:
            listed = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            found.append(f"rank {store.rank}: {len(bad)} corrupt sample(s) (checksum mismatch): ids {listed}")
    if (damage := store.damage()) is not None:
        found.append(f"rank {store.rank}: {damage}")
    found += [type(line)(f"rank {store.rank}: {line}") for line in stray_files(store)]
    return found


def _intact(store: RankStore, record: np.void) -> bool:
    try:
        store.record_bytes(record, note_damage=False)  # checked against the record's checksum
    except CorruptSampleError:
        return False
    return True


def stray_files(store: RankStore) -> list[str]:
    """Files in the rank directory that no committed or prepared state explains."""
    wanted = store.referenced_files()
    lines: list[str] = []
    for path in sorted(store.directory.rglob("*")):
        relative = path.relative_to(store.directory).as_posix()
        if path.is_dir() and relative == fmt.PACK_DIR:
            continue
        if relative in wanted or relative == fmt.RESERVE_PATH:
            continue
        if (
            fmt.pack_sequence(path.name) is not None
            or fmt.index_generation(path.name) is not None
            or path.name.endswith(".tmp")
        ):
            lines.append(
                InFlight(
                    f"unreferenced file {relative} (left by an interrupted exchange or compaction; "
                    "restarting the job removes it)"
                )
            )
        else:
            lines.append(f"stray file {relative} (not part of a store); remove it")
    return lines


def _check_union(stores: list[RankStore], num_samples: int) -> list[str]:
    ids = np.concatenate([store.ids for store in stores])
    owners = np.concatenate([np.full(len(store), store.rank) for store in stores])
    counts = np.bincount(ids, minlength=num_samples)
    problems = []
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        problems.append(f"missing: sample(s) {_ids(missing)} are held by no rank")
    duplicated = np.flatnonzero(counts > 1)
    for sample in duplicated[:10]:
        problems.append(
            f"duplicated: sample {sample} is held by ranks {sorted(owners[ids == sample].tolist())}"
        )
    if duplicated.size > 10:
        problems.append(f"duplicated: {duplicated.size} samples in all are held by more than one rank")
    return problems


def _check_plan(stores: list[RankStore], config: dict) -> list[str]:
    labels = np.empty(sum(len(s) for s in stores), dtype=np.int64)
    for store in stores:
        labels[store.ids] = store.records["label"]
    try:
        planner = ShufflePlanner(
            config["num_samples"],
            config["world_size"],
            strategy=config["strategy"],
            fraction=config["fraction"],
            partition=config["partition"],
            labels=labels,
            seed=config["seed"],
            drop_last=config["drop_last"],
            ranks_per_node=config.get("ranks_per_node", 1),
            **config.get("options", {}),
        )
    except (KeyError, TypeError, ValueError) as error:
        return [f"store.json describes a plan this version cannot rebuild ({error})"]
    if (
        planner.config["labels_sha256"] != config.get("labels_sha256")
        and config.get("labels_sha256") is not None
    ):
        return [
            "the labels stored with the samples differ from those the plan was made with (a corrupt store?)"
        ]
    if planner.strategy.uses_losses:
        # Who holds what follows the losses observed in training (kept in the run's checkpoints,
        # not in the store): conservation and integrity are checked above, the plan cannot be.
        return []
    problems = []
    for store in stores:
        expected = planner.plan(store.epoch).holdings(store.rank)
        if not np.array_equal(store.ids, expected):
            problems.append(
                f"rank {store.rank}: holds {np.setdiff1d(store.ids, expected).size} sample(s) "
                "its plan does not give "
                f"it at epoch {store.epoch} and lacks {np.setdiff1d(expected, store.ids).size}"
            )
    return problems
