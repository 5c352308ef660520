"""The learning rate as a pure function of the global step (nothing to save but the step).

``lr = train.lr * (batch_size * world_size) / train.reference_batch`` (the linear scaling rule),
reached by a linear warm-up over ``train.warmup_epochs``, then ``constant``, ``cosine`` (to zero
at the last step) or ``step`` (times ``step_gamma`` at each of ``step_epochs``).
"""

from __future__ import annotations

import math

from reshuffle.config import TrainConfig


def peak_lr(config: TrainConfig, world_size: int) -> float:
    return config.lr * config.batch_size * world_size / config.reference_batch


def lr_at(step: int, steps_per_epoch: int, config: TrainConfig, world_size: int) -> float:
    """The learning rate of global step ``step`` (0-based)."""
    epoch = (step + 1) / steps_per_epoch  # progress at the end of this step, in epochs
    peak = peak_lr(config, world_size)
    if config.warmup_epochs > 0 and epoch <= config.warmup_epochs:
        return peak * epoch / config.warmup_epochs
    if config.schedule == "constant":
        return peak
    if config.schedule == "step":
        return peak * config.step_gamma ** sum(1 for boundary in config.step_epochs if epoch > boundary)
    span = max(config.epochs - config.warmup_epochs, 1e-9)
    progress = min(1.0, max(0.0, (epoch - config.warmup_epochs) / span))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
