"""Checkpoints: written atomically, the newest K kept, loaded without running pickled code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, so ``torch.load(...,
weights_only=True)`` reads it; nothing in it can execute on load.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from reshuffle.errors import ReshuffleError

FORMAT = "reshuffle-checkpoint"
_NAME = re.compile(r"^epoch-(\d{4,})-step-(\d{7,})\.pt$")


class CheckpointError(ReshuffleError, RuntimeError):
    """A checkpoint is missing, unreadable, or from another run."""


class Checkpoints:
    """The checkpoint directory of a run."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = directory
        self.keep = keep

    def paths(self) -> list[Path]:
        """Checkpoints in order of (epoch, step)."""
        if not self.directory.is_dir():
            return []
        found = [(m, p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for m, p in sorted(found, key=lambda item: (int(item[0].group(1)), int(item[0].group(2))))]

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, state: dict[str, Any], epoch: int, step: int) -> Path:
        """Write ``state`` as ``epoch-EEEE-step-SSSSSSS.pt`` (the position training resumes at)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"epoch-{epoch:04d}-step-{step:07d}.pt"
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        descriptor = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any failure to read is a bad checkpoint, said plainly
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({error}); delete it to use an older one"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a reshuffle checkpoint")
        return state
