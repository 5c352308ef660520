"""Training: the DDP loop, checkpoints, metrics files, and launching ranks."""
