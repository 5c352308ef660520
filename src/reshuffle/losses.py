"""Per-sample loss tracking, vectorised: losses are scattered by sample id into an N-length
tensor, so there is no Python loop per sample and no second forward pass.

Each sample is seen by one rank per epoch, so an all-reduce (sum) of the N-length tensors gives
every rank every sample's loss. Memory: two float32 values per sample.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class LossTracker:
    def __init__(self, num_samples: int) -> None:
        self.total = torch.zeros(num_samples, dtype=torch.float32)
        self.count = torch.zeros(num_samples, dtype=torch.float32)

    def reset(self) -> None:
        self.total.zero_()
        self.count.zero_()

    def add(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Record ``losses[i]`` for sample ``ids[i]`` (repeats from padding average out)."""
        ids = ids.to("cpu", torch.int64)
        self.total.index_add_(0, ids, losses.detach().to("cpu", torch.float32))
        self.count.index_add_(0, ids, torch.ones(ids.shape[0]))

    def reduce(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> None:
        """Sum over ranks, in place (one collective of 2N floats)."""
        both = torch.stack([self.total, self.count]).to(device or "cpu")
        dist.all_reduce(both, group=group)
        self.total.copy_(both[0].cpu())
        self.count.copy_(both[1].cpu())

    def summed(
        self, group: dist.ProcessGroup | None = None, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`state_dict` summed over ranks, leaving this tracker as it is (collective)."""
        both = torch.stack([self.total, self.count]).to(device or "cpu")
        dist.all_reduce(both, group=group)
        return {"total": both[0].cpu(), "count": both[1].cpu()}

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mean loss)`` of the samples seen."""
        seen = torch.nonzero(self.count > 0).flatten()
        return seen, self.total[seen] / self.count[seen]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"total": self.total.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.total.copy_(state["total"])
        self.count.copy_(state["count"])
