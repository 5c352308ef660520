"""Progress on rank 0: a bar on a terminal, plain lines otherwise (logs, Slurm output)."""

from __future__ import annotations

import logging
import sys

import torch
from tqdm import tqdm

log = logging.getLogger("reshuffle")
BAR_EVERY = 25  # steps between the bar's loss read-backs


class Progress:
    def __init__(self, mode: str, every_steps: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar_mode = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.every_steps = every_steps
        self._bar: tqdm | None = None
        self._epoch = 0
        self._total = 0

    def start(self, epoch: int, total: int, done: int = 0) -> None:
        self._epoch, self._total = epoch, total
        if self.enabled and self.bar_mode:
            self._bar = tqdm(
                total=total, initial=done, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True
            )

    def step(self, step: int, loss: torch.Tensor | float) -> None:
        """``loss`` may live on the GPU: it is read back (a wait for the device) only on the steps
        that show it, every ``every_steps`` (the bar: every ``BAR_EVERY``)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if (step + 1) % BAR_EVERY == 0:
                self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        elif self.every_steps and (step + 1) % self.every_steps == 0:
            log.info("epoch %d step %d/%d loss %.4f", self._epoch, step + 1, self._total, float(loss))

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
