"""Datasets kept in shard files: WebDataset tar shards and Parquet files.

Large datasets live in a few hundred shards rather than a million files. Both sources index
their shards once, reading only what labels need, never an image:

* ``webdataset``: ``<path>/<split>/*.tar`` (``val`` also works for test), uncompressed tar files
  whose members are grouped by key, WebDataset's convention: ``<key>.<image ext>`` (png, jpg,
  jpeg, webp, ...) and ``<key>.cls`` (the class as text), e.g. ``000123.png`` + ``000123.cls``.
  Indexing walks each shard's tar headers in order (one sequential pass) and reads the small
  ``.cls`` members; a sample's raw bytes are then one seek and one read inside its shard.
* ``parquet``: ``<path>/<split>/*.parquet`` (or ``<path>/<split>.parquet``) with an encoded image
  column (``image``: bytes, or a struct with a ``bytes`` field as Hugging Face writes it) and an
  integer label column (``label``); options ``image_column`` / ``label_column`` rename them.
  Indexing reads the label column only (Parquet stores columns apart); a sample's raw bytes come
  from its row group, the last ``cache_groups`` (8) read kept in memory, so reading ids in order,
  or in ``corgipile``'s order with a buffer of up to 8 row groups, reads each row group once.

* ``arrow``: a Hugging Face dataset saved with ``save_to_disk`` (``<path>/<split>/data-*.arrow``,
  Arrow stream files; no ``datasets`` package and no hub access needed), columns as for
  ``parquet``. The files are memory-mapped: indexing touches the label column's pages only.

Sample ids run shard by shard in file-name order, so a rank that stages or reads its ids in
order passes through each shard front to back. Images decode with Pillow at read time (options
``image_size``, ``channels``), as ``imagefolder`` does.
"""

from __future__ import annotations

import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from reshuffle.data.imagefolder import EXTENSIONS, PillowDecoder
from reshuffle.data.source import DataNotFoundError, SampleSource

_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "validation")}


def _shard_files(path: str | None, split: str, suffix: str, loader: str) -> list[Path]:
    if path is None:
        raise DataNotFoundError(
            f"{loader} needs a path: set datasets.<name>.path in the system config to a directory holding "
            f"train/*{suffix} and test/*{suffix} (or val/)"
        )
    root = Path(path).expanduser()
    for name in _SPLIT_DIRS[split]:
        found = sorted((root / name).glob(f"*{suffix}")) or sorted(root.glob(f"{name}{suffix}"))
        if found:
            return found
    raise DataNotFoundError(
        f"{loader} {split} split not found: expected {root}/{_SPLIT_DIRS[split][0]}/*{suffix} "
        f"(or {root}/{_SPLIT_DIRS[split][0]}{suffix})"
    )


class _PillowSource(SampleSource):
    def _set_shape(self, image_size: int, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.mode = "L" if channels == 1 else "RGB"
        self.shape = (channels, image_size, image_size)

    @property
    def decoder(self) -> PillowDecoder:
        return PillowDecoder(self.mode, self.shape[1], self.shape[2])


class TarShardSource(_PillowSource):
    """WebDataset tar shards: one sample per key with an image member and a ``.cls`` member."""

    def __init__(self, shards: list[Path], split: str, image_size: int, channels: int) -> None:
        self.name, self.split, self.shards = "webdataset", split, shards
        self._set_shape(image_size, channels)
        where, labels = [], []
        for number, shard in enumerate(shards):
            for offset, size, label in _index_tar(shard):
                where.append((number, offset, size))
                labels.append(label)
        if not labels:
            raise DataNotFoundError(f"no samples (<key>.<image> + <key>.cls) in {shards[0].parent}/*.tar")
        self.where = np.asarray(where, dtype=np.int64)  # (N, 3): shard, data offset, size
        self.shard_index = self.where[:, 0]  # the shard each sample lives in (staging reads by shard)
        self.targets = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.targets.max()) + 1
        self._files = threading.local()  # an open file per shard and thread (DataLoader workers)

    def raw(self, index: int) -> bytes:
        shard, offset, size = (int(v) for v in self.where[index])
        files = self._files.__dict__.setdefault("open", {})
        handle = files.get(shard) or files.setdefault(shard, open(self.shards[shard], "rb"))  # noqa: SIM115
        handle.seek(offset)
        return handle.read(size)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = None  # open files stay with their process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._files = threading.local()


def _index_tar(shard: Path) -> list[tuple[int, int, int]]:
    """(data offset, size, label) of each complete sample of ``shard``, in member order."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    try:
        with tarfile.open(shard, mode="r:") as archive:  # plain tar: offsets are file offsets
            for member in archive:
                if not member.isfile():
                    continue
                key, _, extension = member.name.partition(".")
                if extension.lower() == "cls":
                    text = archive.extractfile(member).read().decode().strip()  # type: ignore[union-attr]
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise DataNotFoundError(
                            f"{shard}: {member.name} holds {text!r}, not a class number"
                        ) from None
                elif f".{extension.lower()}" in EXTENSIONS:
                    images[key] = (member.offset_data, member.size)
                else:
                    continue
                if key not in order:
                    order.append(key)
    except tarfile.ReadError as error:
        raise DataNotFoundError(
            f"{shard} is not an uncompressed tar file ({error}); webdataset shards must be plain .tar"
        ) from None
    missing = [key for key in order if (key in images) != (key in labels)]
    if missing:
        has = "an image but no .cls" if missing[0] in images else "a .cls but no image"
        raise DataNotFoundError(
            f"{shard}: sample {missing[0]!r} has {has} member ({len(missing)} incomplete in this shard)"
        )
    return [(*images[key], labels[key]) for key in order]


class ParquetSource(_PillowSource):
    """Parquet files with an encoded-image column and a label column."""

    def __init__(
        self, files: list[Path], split: str, image_size: int, channels: int, image_column: str,
        label_column: str, cache_groups: int = 8,
    ) -> None:  # fmt: skip
        import pyarrow.parquet as pq

        self.name, self.split, self.files = "parquet", split, files
        self.image_column = image_column
        self._set_shape(image_size, channels)
        labels, groups = [], []  # groups: (file, row group, first id) per row group
        start = 0
        for number, file in enumerate(files):
            reader = pq.ParquetFile(file)
            names = reader.schema_arrow.names
            _check_columns(file, names, (image_column, label_column))
            for group in range(reader.num_row_groups):
                column = reader.read_row_group(group, columns=[label_column]).column(0)
                labels.append(np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64))
                groups.append((number, group, start))
                start += len(column)
        self.targets = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
        if not self.targets.size:
            raise DataNotFoundError(f"no rows in {files[0]}")
        self.num_classes = int(self.targets.max()) + 1
        self.groups = np.asarray(groups, dtype=np.int64)  # (G, 3)
        self.shard_index = np.repeat(
            np.arange(len(groups)), np.diff([*self.groups[:, 2], start])
        )  # row group
        self.cache_groups = cache_groups
        self._cached: OrderedDict[int, list[bytes]] = OrderedDict()  # the last row groups read
        self._lock = threading.Lock()

    def raw(self, index: int) -> bytes:
        at = int(np.searchsorted(self.groups[:, 2], index, side="right")) - 1
        with self._lock:
            rows = self._cached.get(at)
            if rows is None:
                rows = self._cached[at] = self._read_group(at)
                if len(self._cached) > self.cache_groups:
                    self._cached.popitem(last=False)
            else:
                self._cached.move_to_end(at)
        return rows[index - int(self.groups[at, 2])]

    def _read_group(self, at: int) -> list[bytes]:
        import pyarrow.parquet as pq

        number, group, _ = (int(v) for v in self.groups[at])
        column = (
            pq.ParquetFile(self.files[number]).read_row_group(group, columns=[self.image_column]).column(0)
        )
        values = column.to_pylist()
        return [v["bytes"] if isinstance(v, dict) else v for v in values]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cached"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class ArrowSource(_PillowSource):
    """Arrow stream files (Hugging Face ``save_to_disk``), memory-mapped."""

    def __init__(
        self, files: list[Path], split: str, image_size: int, channels: int, image_column: str,
        label_column: str,
    ) -> None:  # fmt: skip
        self.name, self.split, self.files = "arrow", split, files
        self.image_column, self.label_column = image_column, label_column
        self._set_shape(image_size, channels)
        self._tables: list | None = None
        labels = []
        for file, table in zip(files, self.tables(), strict=True):
            names = table.schema.names
            _check_columns(file, names, (image_column, label_column))
            labels.append(np.asarray(table.column(label_column).to_numpy(), dtype=np.int64))
        self.targets = np.concatenate(labels)
        if not self.targets.size:
            raise DataNotFoundError(f"no rows in {files[0]}")
        self.num_classes = int(self.targets.max()) + 1
        self.starts = np.cumsum([0] + [len(a) for a in labels])
        self.shard_index = np.repeat(np.arange(len(files)), [len(a) for a in labels])

    def tables(self) -> list:
        """The files' tables, memory-mapped (opened once per process)."""
        if self._tables is None:
            import pyarrow as pa

            tables = []
            for file in self.files:
                try:
                    tables.append(pa.ipc.open_stream(pa.memory_map(str(file))).read_all())
                except pa.ArrowInvalid as error:
                    raise DataNotFoundError(f"{file} is not an Arrow stream file ({error})") from None
            self._tables = tables
        return self._tables

    def raw(self, index: int) -> bytes:
        at = int(np.searchsorted(self.starts, index, side="right")) - 1
        value = self.tables()[at].column(self.image_column)[index - int(self.starts[at])].as_py()
        return value["bytes"] if isinstance(value, dict) else value

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tables"] = None  # each process maps the files itself
        return state


def load_arrow(
    split: str, *, path: str | None = None, download: bool = False, image_size: int = 32, channels: int = 3,
    image_column: str = "image", label_column: str = "label",
) -> ArrowSource:  # fmt: skip
    """The ``split`` of a Hugging Face dataset saved to disk under ``path``."""
    _needs_pillow("arrow")
    try:
        import pyarrow  # noqa: F401
    except ImportError as error:
        raise ImportError("the arrow loader needs pyarrow: pip install 'reshuffle[formats]'") from error
    files = [f for f in _shard_files(path, split, ".arrow", "arrow") if not f.name.startswith("cache-")]
    return ArrowSource(files, split, image_size, channels, image_column, label_column)


def _check_columns(file: Path, names: list[str], needed: tuple[str, ...]) -> None:
    for column in needed:
        if column not in names:
            raise DataNotFoundError(
                f"{file} has no column {column!r} (it has {', '.join(names)}); set the loader's options "
                "image_column / label_column"
            )


def load_webdataset(
    split: str, *, path: str | None = None, download: bool = False, image_size: int = 32, channels: int = 3
) -> TarShardSource:
    """The ``split`` of the WebDataset tar shards under ``path``."""
    _needs_pillow("webdataset")
    return TarShardSource(_shard_files(path, split, ".tar", "webdataset"), split, image_size, channels)


def load_parquet(
    split: str, *, path: str | None = None, download: bool = False, image_size: int = 32, channels: int = 3,
    image_column: str = "image", label_column: str = "label", cache_groups: int = 8,
) -> ParquetSource:  # fmt: skip
    """The ``split`` of the Parquet files under ``path``."""
    _needs_pillow("parquet")
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as error:
        raise ImportError("the parquet loader needs pyarrow: pip install 'reshuffle[formats]'") from error
    files = _shard_files(path, split, ".parquet", "parquet")
    return ParquetSource(files, split, image_size, channels, image_column, label_column, cache_groups)


def _needs_pillow(loader: str) -> None:
    try:
        import PIL  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{loader} needs Pillow to decode images: pip install pillow") from error
