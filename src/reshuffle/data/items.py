"""Any map-style dataset as a sample source: items serialised to bytes without pickle.

Store mode keeps and exchanges bytes. A user's dataset yields Python items (an image tensor and a
label, a dict of arrays, a PIL image and a caption, ...), so :func:`encode_item` writes each item
in a small self-describing format and :func:`decode_item` gives back an equal item. Nothing is
pickled: a corrupt or hostile store can produce a wrong item or an error, never run code.

The format (little-endian), one *value* per item::

    item   := b"RSI1" value
            | b"RSI2" size:u32 value body     (size: the value's bytes; the value holds 'X' tags)
    value  := tag:u8 body
    tag 'T' torch.Tensor  dtype:str  ndim:u8  shape:u64*ndim  data:blob   (any dtype, bfloat16 too)
    tag 'N' numpy array   dtype:str  ndim:u8  shape:u64*ndim  data:blob   (numeric and bool dtypes)
    tag 'P' PIL image     mode:str  width:u32  height:u32  data:blob      (lossless: Image.tobytes)
    tag 'B' bytes         data:blob
    tag 'S' str           utf-8:blob
    tag 'I' int           i64
    tag 'F' float         f64
    tag '?' bool          u8
    tag '0' None
    tag '(' tuple, '[' list   count:u32  value*count
    tag '{' dict          count:u32  (key:str value)*count                (string keys)
    tag 'X' the body      (bytes: the record's last part, after the value)
    str    := length:u16 utf-8;  blob := length:u64 bytes

An item whose largest ``bytes`` value is ``BODY_FROM`` bytes or more (an encoded JPEG and its
label, the ImageNet case) is written ``RSI2``: that value goes last, as the *body*, so a store read
fetches it straight into its own ``bytes`` object (:meth:`PackReader.many
<reshuffle.store.reads.PackReader.many>` with :func:`head_size`) and decoding returns it without
copying it out of the record. Stores written before ``RSI2`` hold ``RSI1`` items; both decode.

Tensors come back on the CPU, contiguous; numpy scalars come back as 0-d arrays.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from reshuffle.data.source import SampleSource
from reshuffle.data.transforms import Transform

MAGIC = b"RSI1"
MAGIC_BODY = b"RSI2"  # the value, then the body (see above)
# The least bytes value written as the body: below it a second read costs more than the copy it saves.
BODY_FROM = 16 << 10
SUPPORTED = "torch tensors, numpy arrays, PIL images, bytes, str, int, float, bool, None, and tuples, lists "
SUPPORTED += "or str-keyed dicts of these"


class ItemError(TypeError):
    """An item holds a type the byte format cannot represent; the message names it and the fix."""


def encode_item(item: Any) -> bytes:
    """``item`` as bytes in the format above. Raises :class:`ItemError` naming an unsupported type."""
    body = _largest_bytes(item)
    if body is None or len(body) < BODY_FROM:
        out = bytearray(MAGIC)
        _encode(item, out, "item", None)
        return bytes(out)
    value = bytearray()
    _encode(item, value, "item", body)
    return b"".join((MAGIC_BODY, struct.pack("<I", len(value)), value, body))


def head_size(prefix: bytes) -> int | None:
    """How many of a record's first bytes come before its body, read from ``prefix`` (its first
    bytes, 8 or more); None for a record without a body (``RSI1``, or not an item)."""
    if prefix[:4] != MAGIC_BODY or len(prefix) < 8:
        return None
    return 8 + _U32.unpack_from(prefix, 4)[0]


def decode_item(data: bytes | memoryview, body: bytes | None = None) -> Any:
    """The item :func:`encode_item` wrote: from the whole record ``data``, or from its head
    (``data``, :func:`head_size` bytes) and its ``body`` read apart. Raises ValueError on bytes of
    another format."""
    view = memoryview(data)
    magic = view[:4].tobytes()
    if magic == MAGIC_BODY:
        head = 8 + _U32.unpack_from(view, 4)[0] if len(view) >= 8 else len(view) + 1
        if head > len(view) or (body is not None and head != len(view)):
            raise ValueError("an encoded item's head is truncated; the sample is corrupt")
        if body is None:  # the whole record: the body is what follows the head
            view, body = view[:head], view[head:].tobytes()
        value, end = _decode(view, 8, body)
    elif magic == MAGIC and body is None:
        value, end = _decode(view, 4, None)
    else:
        raise ValueError("not an encoded dataset item (bad magic); the store holds another format")
    if end != len(view):
        raise ValueError(f"an encoded item has {len(view) - end} trailing byte(s); the sample is corrupt")
    return value


def _largest_bytes(value: Any) -> bytes | bytearray | memoryview | None:
    """The longest bytes-like value in ``item`` (the body of an ``RSI2`` record), or None."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    parts = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    found = None
    for part in parts:
        candidate = _largest_bytes(part)
        if candidate is not None and (found is None or len(candidate) > len(found)):
            found = candidate
    return found


def _str(text: str, out: bytearray) -> None:
    data = text.encode()
    out += struct.pack("<H", len(data)) + data


def _blob(data: bytes | memoryview, out: bytearray) -> None:
    out += struct.pack("<Q", len(data))
    out += data


def _shape(shape: Sequence[int], out: bytearray) -> None:
    out += struct.pack(f"<B{len(shape)}Q", len(shape), *shape)


def _encode(value: Any, out: bytearray, where: str, body: Any) -> None:
    """Append ``value`` to ``out``; ``body`` (the record's body, or None) is written as 'X'."""
    if body is not None and value is body:
        out += b"X"
    elif isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        out += b"T"
        _str(str(value.dtype).removeprefix("torch."), out)
        _shape(value.shape, out)
        _blob(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"", out)
    elif isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        array = array if array.flags.c_contiguous else array.copy(order="C")  # 0-d stays 0-d
        if array.dtype.kind not in "biufc":
            raise ItemError(
                f"{where}: a numpy array of dtype {array.dtype} cannot be stored; store mode keeps "
                f"{SUPPORTED}; convert it (e.g. to a numeric array or bytes) in the dataset"
            )
        out += b"N"
        _str(array.dtype.str, out)
        _shape(array.shape, out)
        _blob(array.tobytes(), out)
    elif _is_pil(value):
        out += b"P"
        _str(value.mode, out)
        out += struct.pack("<II", *value.size)
        _blob(value.tobytes(), out)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out += b"B"
        _blob(bytes(value), out)
    elif isinstance(value, str):
        out += b"S"
        _blob(value.encode(), out)
    elif isinstance(value, bool):
        out += b"?" + struct.pack("<B", bool(value))
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ItemError(f"{where}: the int {value} does not fit in 64 bits; store it as str or bytes")
        out += b"I" + struct.pack("<q", value)
    elif isinstance(value, float):
        out += b"F" + struct.pack("<d", value)
    elif value is None:
        out += b"0"
    elif isinstance(value, (tuple, list)):
        out += (b"(" if isinstance(value, tuple) else b"[") + struct.pack("<I", len(value))
        for position, part in enumerate(value):
            _encode(part, out, f"{where}[{position}]", body)
    elif isinstance(value, dict):
        out += b"{" + struct.pack("<I", len(value))
        for key, part in value.items():
            if not isinstance(key, str):
                raise ItemError(f"{where}: dict keys must be str to be stored, got {type(key).__name__}")
            _str(key, out)
            _encode(part, out, f"{where}[{key!r}]", body)
    else:
        raise ItemError(
            f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be stored without "
            f"pickle; store mode keeps {SUPPORTED}. Convert it in the dataset's __getitem__ (or use "
            "mode='index', which stores nothing)"
        )


def _is_pil(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("PIL.") and hasattr(value, "tobytes") and hasattr(value, "mode")


def _read_str(view: memoryview, at: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<H", view, at)
    return bytes(view[at + 2 : at + 2 + length]).decode(), at + 2 + length


def _read_blob(view: memoryview, at: int) -> tuple[memoryview, int]:
    (length,) = struct.unpack_from("<Q", view, at)
    end = at + 8 + length
    if end > len(view):
        raise ValueError("an encoded item is truncated; the sample is corrupt")
    return view[at + 8 : end], end


def _read_shape(view: memoryview, at: int) -> tuple[tuple[int, ...], int]:
    (ndim,) = struct.unpack_from("<B", view, at)
    return tuple(struct.unpack_from(f"<{ndim}Q", view, at + 1)), at + 1 + 8 * ndim


def _decode(view: memoryview, at: int, body: bytes | None) -> tuple[Any, int]:
    tag, at = view[at], at + 1  # an int: the most common tags are compared first
    if tag == _BODY:
        if body is None:
            raise ValueError("an encoded item refers to a body it does not have; the sample is corrupt")
        return body, at
    if tag == _BYTES:
        data, at = _read_blob(view, at)
        return bytes(data), at
    if tag == _INT:
        return _I64.unpack_from(view, at)[0], at + 8
    if tag == _TENSOR:
        name, at = _read_str(view, at)
        shape, at = _read_shape(view, at)
        data, at = _read_blob(view, at)
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"an encoded tensor names an unknown dtype {name!r}")
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0)
        return raw.to(torch.uint8).view(dtype).reshape(shape), at
    if tag == _NUMPY:
        name, at = _read_str(view, at)
        shape, at = _read_shape(view, at)
        data, at = _read_blob(view, at)
        return np.frombuffer(data, dtype=np.dtype(name)).reshape(shape).copy(), at
    if tag == _PIL:
        from PIL import Image

        mode, at = _read_str(view, at)
        size = struct.unpack_from("<II", view, at)
        data, at = _read_blob(view, at + 8)
        return Image.frombytes(mode, size, bytes(data)), at
    if tag == _STR:
        data, at = _read_blob(view, at)
        return bytes(data).decode(), at
    if tag == _FLOAT:
        return struct.unpack_from("<d", view, at)[0], at + 8
    if tag == _BOOL:
        return bool(view[at]), at + 1
    if tag == _NONE:
        return None, at
    if tag in (_TUPLE, _LIST):
        (count,) = struct.unpack_from("<I", view, at)
        at += 4
        parts = []
        for _ in range(count):
            part, at = _decode(view, at, body)
            parts.append(part)
        return (tuple(parts) if tag == _TUPLE else parts), at
    if tag == _DICT:
        (count,) = struct.unpack_from("<I", view, at)
        at += 4
        result = {}
        for _ in range(count):
            key, at = _read_str(view, at)
            result[key], at = _decode(view, at, body)
        return result, at
    raise ValueError(f"an encoded item has an unknown tag {bytes([tag])!r}; the sample is corrupt")


_I64, _U32 = struct.Struct("<q"), struct.Struct("<I")
# the tags as ints (what indexing a memoryview gives)
_BODY, _BYTES, _INT, _TENSOR, _NUMPY, _PIL, _STR = b"XBITNPS"
_FLOAT, _BOOL, _NONE, _TUPLE, _LIST, _DICT = b"F?0([{"
# The head of an RSI2 record whose item is a (bytes, int) tuple, the ImageNet case (an encoded
# image and its label), up to the int: magic, value size, tuple of 2, the body, an int's tag
_PAIR_HEAD = MAGIC_BODY + _U32.pack(15) + b"(" + _U32.pack(2) + b"XI"
_PAIR_HEAD_SIZE = len(_PAIR_HEAD) + 8


class ItemDecoder:
    """Picklable ``record -> item`` (what store-mode DataLoader workers receive): a record is its
    bytes, or ``(head, body)`` when a read split it where :meth:`head_size` said."""

    head_size = staticmethod(head_size)

    def __call__(self, raw: bytes | memoryview | tuple[bytes, bytes]) -> Any:
        if not isinstance(raw, tuple):
            return decode_item(raw)
        head, body = raw
        if len(head) == _PAIR_HEAD_SIZE and head[:-8] == _PAIR_HEAD:  # (bytes, int): decode_item's answer,
            return body, _I64.unpack_from(head, len(_PAIR_HEAD))[0]  # a fifth of its time per sample
        return decode_item(head, body)


class DatasetSource(SampleSource):
    """A user's map-style dataset as a :class:`SampleSource`: ``raw(i)`` is ``encode_item(dataset[i])``.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__(int)``.
        labels: one integer class per sample. Default: ``dataset.targets`` (or ``.labels``) when
            present; otherwise each item's second element when items are ``(input, int label, ...)``
            (this reads every item once, on every rank: give ``labels`` for a large dataset);
            otherwise every sample gets class 0 (only the label partitions need real labels).
            With ``read_labels=False`` items are never read for labels: ``targets`` stays None
            when neither ``labels`` nor an attribute gives them (index mode, unlabelled plans).
        name: what ``store.json`` records as the dataset (a store only reopens for the same name).
    """

    split = "train"

    def __init__(
        self,
        dataset: Any,
        labels: ArrayLike | None = None,
        *,
        name: str | None = None,
        read_labels: bool = True,
    ) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"{type(dataset).__name__} is not a map-style dataset (it needs __len__ and "
                "__getitem__); wrap an iterable dataset in a map-style one, or use its shard files"
            )
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        # None only when nothing needs labels (read_labels=False without dataset.targets): never read then
        self.targets = _labels_of(dataset, labels, read_items=read_labels)  # type: ignore[assignment]
        self.num_classes = (
            int(self.targets.max()) + 1 if self.targets is not None and self.targets.size else 1
        )
        self.shape = ()

    def __len__(self) -> int:
        return len(self.dataset)

    def raw(self, index: int) -> bytes:
        try:
            return encode_item(self.dataset[index])
        except ItemError as error:
            raise ItemError(f"sample {index}: {error}") from None

    @property
    def decoder(self) -> Callable[[bytes | memoryview], Any]:
        return ItemDecoder()


def _labels_of(dataset: Any, labels: ArrayLike | None, *, read_items: bool) -> NDArray[np.int64] | None:
    if labels is None:
        labels = next((getattr(dataset, n) for n in ("targets", "labels") if hasattr(dataset, n)), None)
    if labels is None and not read_items:
        return None
    if labels is None:
        labels = [_item_label(dataset[i]) for i in range(len(dataset))]
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.shape != (len(dataset),) or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(
            f"labels must be one integer class per sample ({len(dataset)}), got shape {array.shape} "
            f"dtype {array.dtype}; pass labels= (e.g. the dataset's targets)"
        )
    if array.size and array.min() < 0:
        raise ValueError("labels must be non-negative class ids; pass labels= with classes 0..C-1")
    return array.astype(np.int64)


def _item_label(item: Any) -> int:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        label = item[1]
        if isinstance(label, torch.Tensor) and label.numel() == 1:
            label = label.item()
        if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
            return int(label)
    return 0


def source_of(
    dataset: Any,
    labels: ArrayLike | None,
    name: str | None,
    transform: Transform | None,
    *,
    read_labels: bool,
) -> SampleSource:
    """``dataset`` as a sample source: reshuffle's own as they are, any other map-style dataset
    through :class:`DatasetSource` (labels from ``labels`` or ``dataset.targets``)."""
    if isinstance(dataset, SampleSource):
        if transform is None:
            raise ValueError(
                f"a reshuffle sample source ({dataset.name}) needs transform= (reshuffle.data.transform_for)"
            )
        return dataset
    return DatasetSource(dataset, labels, name=name, read_labels=read_labels)
