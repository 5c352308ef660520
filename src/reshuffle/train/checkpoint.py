"""Checkpoints: written atomically, the newest K kept, loaded without running pickled code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, so ``torch.load(...,
weights_only=True)`` reads it; nothing in it can execute on load.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from reshuffle.errors import ReshuffleError
from reshuffle.store.format import write_atomic

FORMAT = "reshuffle-checkpoint"
_NAME = re.compile(r"^epoch-(\d{4,})-step-(\d{7,})\.pt$")


class CheckpointError(ReshuffleError, RuntimeError):
    """A checkpoint is missing, unreadable, or from another run."""


class Checkpoints:
    """The checkpoint directory of a run."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = directory
        self.keep = keep
        self.writes = True  # whether this process writes them (see train.state.checkpoints_of)

    def paths(self) -> list[Path]:
        """Checkpoints in order of (epoch, step)."""
        if not self.directory.is_dir():
            return []
        found = [(m, p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for m, p in sorted(found, key=lambda item: (int(item[0].group(1)), int(item[0].group(2))))]

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    @staticmethod
    def name(epoch: int, step: int) -> str:
        return f"epoch-{epoch:04d}-step-{step:07d}.pt"

    @staticmethod
    def position(path: Path) -> tuple[int, int]:
        """``(epoch, step)`` a checkpoint's name says training resumes at."""
        match = _NAME.match(path.name)
        if match is None:
            raise CheckpointError(f"{path} is not named like a checkpoint (epoch-EEEE-step-SSSSSSS.pt)")
        return int(match.group(1)), int(match.group(2))

    def save(self, state: dict[str, Any], epoch: int, step: int) -> Path:
        """Write ``state`` as ``epoch-EEEE-step-SSSSSSS.pt`` (the position training resumes at)."""
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, **state}, buffer)
        return self.write_bytes(buffer.getvalue(), self.name(epoch, step))

    def write_bytes(self, payload: bytes, name: str) -> Path:
        """A checkpoint's bytes as ``name``, atomically (a copy received from another rank)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        write_atomic(path, payload)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        return Checkpoints.load_bytes(path, path)

    @staticmethod
    def load_bytes(source: bytes | Path, path: Path) -> dict[str, Any]:
        """A checkpoint from its file or its bytes (``path`` names it in errors)."""
        try:
            state = torch.load(
                io.BytesIO(source) if isinstance(source, bytes) else source,
                map_location="cpu",
                weights_only=True,
            )
        except Exception as error:  # any failure to read is a bad checkpoint, said plainly
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({error}); delete it to use an older one"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a reshuffle checkpoint")
        return state
