"""The trained student's full weights, from a checkpoint on disk or from the live module.

- :func:`student_state_from_checkpoint`: a single-file Lightning checkpoint (its
  ``state_dict`` with ``student.*`` keys), or a distributed checkpoint directory written by
  ``ModelParallelStrategy`` (TP/FSDP2 shards), consolidated by DCP itself: a no-process-group
  ``torch.distributed.checkpoint.load`` of the student's keys only (not the optimizer state)
  into full-size plain tensors on this one process.
- :func:`gather_full_state`: the live (possibly DTensor, under TP/FSDP2) module's weights as
  full plain CPU tensors; every rank must call it (``full_tensor()`` is a collective).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

#: Where Lightning keeps the module's weights in a checkpoint (and DCP's key prefix for them).
STATE_DICT_KEY = "state_dict"


def _prefixed(state: dict[str, Tensor], prefix: str, source: Path) -> dict[str, Tensor]:
    found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not found:
        sample = ", ".join(sorted(state)[:5]) or "none"
        raise ValueError(
            f"{source} holds no student weights (no '{prefix}*' keys in its state_dict; "
            f"first keys: {sample})."
        )
    return found


def student_state_from_checkpoint(
    path: str | os.PathLike[str], prefix: str = "student."
) -> dict[str, Tensor]:
    """The full student state dict (keys without ``prefix``) of a Lightning checkpoint.

    Args:
        path: a single-file checkpoint, or a distributed checkpoint directory (DCP
            ``.metadata`` and shards; torn or inconsistent ones are refused, see
            :func:`~lightning_kd.parallel.atomic_checkpoint.verify_checkpoint`).
        prefix: the module attribute holding the model (``"student."`` for
            :class:`~lightning_kd.DistillationModule`, ``"model."`` for ``CausalLMModule``).

    Returns:
        Full-size plain CPU tensors, e.g. ``{"embed.weight": ..., ...}``.

    Raises:
        ValueError: nothing at ``path``, a file that is not a checkpoint, a torn distributed
            checkpoint, or a checkpoint without ``prefix`` weights.
    """
    source = Path(path)
    if not source.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist.")
    if source.is_dir():
        return _from_distributed(source, prefix)
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{source} is not a readable checkpoint file: {error}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(STATE_DICT_KEY), dict):
        raise ValueError(f"{source} holds no student weights (it has no 'state_dict' entry).")
    return _prefixed(checkpoint[STATE_DICT_KEY], prefix, source)


def _from_distributed(directory: Path, prefix: str) -> dict[str, Tensor]:
    """Consolidate the ``state_dict.<prefix>*`` tensors of a DCP directory with DCP's own
    planner (which maps every shard, TP or FSDP2, into the full tensors allocated here)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lightning_kd.parallel.atomic_checkpoint import verify_checkpoint

    if not (directory / ".metadata").is_file():
        raise ValueError(
            f"{directory} is a directory without DCP metadata (.metadata): not a distributed "
            "checkpoint."
        )
    verify_checkpoint(directory)
    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata().state_dict_metadata
    full_prefix = f"{STATE_DICT_KEY}.{prefix}"
    wanted = {
        key[len(STATE_DICT_KEY) + 1 :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith(full_prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not wanted:
        sample = ", ".join(sorted(metadata)[:5]) or "none"
        raise ValueError(
            f"{directory} holds no student weights (no '{full_prefix}*' tensors; first keys: "
            f"{sample})."
        )
    state = {STATE_DICT_KEY: wanted}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return _prefixed(state[STATE_DICT_KEY], prefix, directory)


def gather_full_state(model: nn.Module, keep: bool = True) -> dict[str, Tensor]:
    """``model``'s state dict as full plain CPU tensors (DTensor shards gathered).

    Every rank must call this: each DTensor's ``full_tensor()`` is a collective over its mesh.
    Ranks that will not write pass ``keep=False`` and get an empty dict (each gathered tensor
    is dropped at once, so they never hold more than one full tensor).

    Args:
        model: the live module (plain, TP, FSDP2 or both).
        keep: keep the gathered tensors (the writing rank).
    """
    state: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            state[name] = value.detach().to("cpu", copy=True)
    return state
