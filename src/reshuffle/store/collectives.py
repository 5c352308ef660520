"""The few collectives store mode agrees through: gather every rank's numbers or error lines,
then raise on every rank at once when any failed (not after a timeout in the next collective)."""

from __future__ import annotations

import hashlib
import socket

import numpy as np
import torch
import torch.distributed as dist

from reshuffle.store import format as fmt
from reshuffle.store.wire import PeerError


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_ints(
    values: list[int], device: torch.device | None, group: dist.ProcessGroup | None
) -> np.ndarray:
    """Every rank's ``values`` (the same count on each), one row per rank (collective)."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return torch.stack(everyone).cpu().numpy()


def ranks_on_this_host(device: torch.device | None, group: dist.ProcessGroup | None) -> int:
    """How many ranks of ``group`` run on this rank's host (by host name), itself included
    (collective): the ranks whose stores share one page cache."""
    digest = hashlib.blake2b(socket.gethostname().encode(), digest_size=8).digest()
    host = int.from_bytes(digest, "little", signed=True)
    return int((gather_ints([host], device, group)[:, 0] == host).sum())


def gather_errors(mine: str, group: dist.ProcessGroup | None) -> list[str]:
    """Every rank's error line ("" for none), collective."""
    everyone: list[str] = [""] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return everyone


def agree(errors: list[str], rank: int, what: str, note: str = "") -> None:
    """After :func:`gather_errors`: raise on every rank once any failed, this rank's own error, or
    on the others a ``PeerError`` naming the first that failed (``note``: what is left as it was)."""
    failed = [(r, why) for r, why in enumerate(errors) if why]
    if not failed:
        return
    if errors[rank]:
        raise fmt.StoreError(f"rank {rank}: could not {what}: {errors[rank]}")
    first, why = failed[0]
    raise PeerError(
        f"rank {rank}: {len(failed)} rank(s) could not {what}{note}; "
        f"caused by rank {first}: {why.splitlines()[0]}"
    )
