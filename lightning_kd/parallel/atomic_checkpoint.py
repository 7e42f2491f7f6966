"""Moved to :mod:`lightning_kd.checkpoint` (0.3): the layout, inspection and resolution are in
``lightning_kd.checkpoint``, the strategy in ``lightning_kd.checkpoint.strategy``. This path
re-exports them for 0.2 code, with a DeprecationWarning, until the release named in
:data:`lightning_kd.compat.REMOVED_IN` (listed there)."""

import warnings

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
from lightning_kd.compat import REMOVED_IN

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

warnings.warn(
    "lightning_kd.parallel.atomic_checkpoint moved to lightning_kd.checkpoint (the strategy: "
    f"lightning_kd.checkpoint.strategy); the old path will be removed in {REMOVED_IN}.",
    DeprecationWarning,
    stacklevel=2,
)
