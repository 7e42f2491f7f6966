"""A quiet single-process CPU Trainer for in-process fits."""

from __future__ import annotations

import lightning as L


def cpu_trainer(**kwargs) -> L.Trainer:
    """``L.Trainer`` on one CPU, deterministic, without logger, checkpoints, progress bar or
    validation unless ``kwargs`` say otherwise."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
