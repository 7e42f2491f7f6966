"""Moved to :mod:`lightning_kd.checkpoint.distributed_state` (0.3); this path re-exports it
for 0.2 code."""

from lightning_kd.checkpoint.distributed_state import (
    STATE_DICT_KEY,
    is_distributed_checkpoint,
    load_distributed_state,
    read_distributed_state,
    stored_tensors,
)

__all__ = [
    "STATE_DICT_KEY",
    "is_distributed_checkpoint",
    "load_distributed_state",
    "read_distributed_state",
    "stored_tensors",
]
