"""Model weights from a distributed checkpoint directory, read by PyTorch's DCP.

``ModelParallelStrategy`` saves a checkpoint as a directory: DCP's ``.metadata`` and one shard
file per rank, the module's weights under ``state_dict.<attribute>.<name>`` (e.g.
``state_dict.model.embed.weight`` for ``CausalLMModule``, ``state_dict.student.*`` for
``DistillationModule``). DCP itself maps those shards, whatever TP/FSDP2 layout wrote them,
onto the tensors it is asked to fill:

- :func:`read_distributed_state`: full-size plain tensors on one process (no process group),
  e.g. to export a student or to load a teacher in full;
- :func:`load_distributed_state`: straight into a parallelised model's local shards
  (DTensors), every rank reading only its slices (a collective: every rank calls it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_kd.checkpoint.layout import MARKER_FILENAME, METADATA_FILENAME
from lightning_kd.checkpoint.resolve import verify_checkpoint

__all__ = [
    "STATE_DICT_KEY",
    "is_distributed_checkpoint",
    "load_distributed_state",
    "read_distributed_state",
    "stored_tensors",
]

#: Where Lightning keeps the module's weights in a checkpoint (and DCP's key prefix for them).
STATE_DICT_KEY = "state_dict"


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory with DCP metadata (``.metadata``)."""
    return (Path(path) / ".metadata").is_file()


def stored_tensors(directory: str | Path, prefix: str, role: str) -> dict[str, Any]:
    """DCP's metadata (``TensorStorageMetadata``: global ``size``, ``properties.dtype``) of
    the ``state_dict.<prefix>*`` tensors, keyed without that prefix.

    A directory that Lightning wrote (it has ``meta.pt`` or a completion marker) is verified
    first: a torn one is refused, see
    :func:`~lightning_kd.checkpoint.verify_checkpoint`. A bare ``dcp.save``
    directory (weights only, e.g. torchtitan's) has no loop state to check; DCP writes its
    ``.metadata`` last, so its presence means the weights are all there.

    Raises:
        ValueError: ``directory`` is not a DCP directory, is torn, or holds no such tensor.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    if not is_distributed_checkpoint(directory):
        raise ValueError(
            f"{directory} is a directory without DCP metadata (.metadata): not a distributed "
            "checkpoint."
        )
    if (directory / METADATA_FILENAME).exists() or (directory / MARKER_FILENAME).exists():
        verify_checkpoint(directory)
    metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    full_prefix = f"{STATE_DICT_KEY}.{prefix}"
    stored = {
        key[len(full_prefix) :]: meta
        for key, meta in metadata.items()
        if key.startswith(full_prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not stored:
        sample = ", ".join(sorted(metadata)[:5]) or "none"
        raise ValueError(
            f"{directory} holds no {role} weights (no '{full_prefix}*' tensors; first keys: "
            f"{sample})."
        )
    return stored


def read_distributed_state(
    directory: str | Path, prefix: str, role: str = "model"
) -> dict[str, Tensor]:
    """Consolidate the ``state_dict.<prefix>*`` tensors of a DCP directory on this process.

    Args:
        directory: the checkpoint directory.
        prefix: the module attribute's prefix, e.g. ``"student."`` or ``"model."``.
        role: what the weights are, for messages (``"student"``, ``"teacher"``).

    Returns:
        Full-size plain CPU tensors keyed without ``prefix`` (not the optimizer state).

    Raises:
        ValueError: as :func:`stored_tensors`.
    """
    import torch.distributed.checkpoint as dcp

    stored = stored_tensors(directory, prefix, role)
    wanted = {
        prefix + name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in stored.items()
    }
    dcp.load({STATE_DICT_KEY: wanted}, storage_reader=dcp.FileSystemReader(str(directory)),
             no_dist=True)  # fmt: skip
    return {name[len(prefix) :]: tensor for name, tensor in wanted.items()}


def load_distributed_state(
    targets: Mapping[str, Tensor], directory: str | Path, prefix: str
) -> None:
    """Fill ``targets`` (local shards: DTensors, or plain tensors of the stored global shape)
    from the ``state_dict.<prefix>*`` tensors of a DCP directory; each rank reads only the
    slices it holds. A collective when a process group is up: every rank calls it with the
    same keys.

    Check the keys and shapes first (:func:`stored_tensors`): DCP reports a missing key or a
    shape mismatch as its own ``CheckpointException`` under a process group.
    """
    import torch.distributed.checkpoint as dcp

    state = {STATE_DICT_KEY: {prefix + name: target for name, target in targets.items()}}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)))
