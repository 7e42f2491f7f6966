"""Moved to :mod:`lightning_kd.checkpoint` (0.3): the layout, inspection and resolution are in
``lightning_kd.checkpoint``, the strategy in ``lightning_kd.checkpoint.strategy``. This path
re-exports them for 0.2 code."""

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
    MARKER_FORMAT,
    MARKER_VERSION,
    METADATA_FILENAME,
    STAGING_SUFFIX,
    Kind,
    aside_path,
    staging_path,
)
from lightning_kd.checkpoint.resolve import resolve_last_checkpoint, verify_checkpoint
from lightning_kd.checkpoint.strategy import AtomicModelParallelStrategy

__all__ = [
    "ASIDE_SUFFIX",
    "DCP_METADATA_FILENAME",
    "MARKER_FILENAME",
    "MARKER_FORMAT",
    "MARKER_VERSION",
    "METADATA_FILENAME",
    "STAGING_SUFFIX",
    "AtomicModelParallelStrategy",
    "CheckpointInfo",
    "Kind",
    "TornCheckpointWarning",
    "UnverifiedCheckpointWarning",
    "aside_path",
    "inspect_checkpoint",
    "resolve_last_checkpoint",
    "staging_path",
    "verify_checkpoint",
]
