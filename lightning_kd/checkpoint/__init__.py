"""Checkpoints as their own component: the on-disk layout and its completion marker
(``layout``), inspecting one checkpoint (``inspect``), choosing the newest complete one and
refusing a torn one (``resolve``), one live run per folder (``lock``), reading model weights
from a DCP directory (``distributed_state``) and the Lightning strategy that writes checkpoints
atomically (``strategy``).

This package imports no Lightning, except :mod:`lightning_kd.checkpoint.strategy`, which is
therefore not imported here: use
``lightning_kd.checkpoint.strategy.AtomicModelParallelStrategy``.
"""

from lightning_kd.checkpoint.distributed_state import (
    STATE_DICT_KEY,
    is_distributed_checkpoint,
    load_distributed_state,
    read_distributed_state,
    stored_tensors,
)
from lightning_kd.checkpoint.inspect import (
    CheckpointInfo,
    TornCheckpointWarning,
    UnverifiedCheckpointWarning,
    inspect_checkpoint,
)
from lightning_kd.checkpoint.layout import (
    ASIDE_SUFFIX,
    DCP_METADATA_FILENAME,
    MARKER_FILENAME,
    METADATA_FILENAME,
    STAGING_SUFFIX,
    aside_path,
    staging_path,
)
from lightning_kd.checkpoint.lock import LOCK_FILENAME, FolderLock, StaleLockWarning
from lightning_kd.checkpoint.resolve import resolve_last_checkpoint, verify_checkpoint

__all__ = [
    "ASIDE_SUFFIX",
    "DCP_METADATA_FILENAME",
    "LOCK_FILENAME",
    "MARKER_FILENAME",
    "METADATA_FILENAME",
    "STAGING_SUFFIX",
    "STATE_DICT_KEY",
    "CheckpointInfo",
    "FolderLock",
    "StaleLockWarning",
    "TornCheckpointWarning",
    "UnverifiedCheckpointWarning",
    "aside_path",
    "inspect_checkpoint",
    "is_distributed_checkpoint",
    "load_distributed_state",
    "read_distributed_state",
    "resolve_last_checkpoint",
    "staging_path",
    "stored_tensors",
    "verify_checkpoint",
]
