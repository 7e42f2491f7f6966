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

from lightning_kd.checkpoint.distributed_state import STATE_DICT_KEY, read_distributed_state


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
            :func:`~lightning_kd.checkpoint.verify_checkpoint`).
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
    """DCP consolidates the ``state_dict.<prefix>*`` tensors (every shard, TP or FSDP2, mapped
    into full tensors allocated here)."""
    return read_distributed_state(directory, prefix, "student")


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
