"""Where a teacher model comes from: build it, load its weights, freeze it.

:class:`TeacherSource` builds a model (an instance or a factory) and loads a weights file; the
live and fused-head teacher backends (:mod:`lightning_kd.training.teachers`) build their
teacher through it. Other kinds of teacher are backends of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_kd.checkpoint.distributed_state import (
    is_distributed_checkpoint,
    read_distributed_state,
)

ModelOrFactory = Callable[[], nn.Module] | nn.Module


def build_model(model: ModelOrFactory, role: str) -> nn.Module:
    """``model`` itself, or what the zero-argument factory ``model`` builds.

    Raises:
        ValueError: when ``model`` is neither a module nor a factory of one.
    """
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise ValueError(f"the {role} factory must return an nn.Module, got {type(built)}.")
        return built
    raise ValueError(f"{role} must be an nn.Module or a callable returning one, got {model!r}.")


def freeze(model: nn.Module) -> None:
    """No gradients and eval mode (dropout off) for a frozen model."""
    model.requires_grad_(False)
    model.eval()


def read_state_dict(path: str, prefix: str = "") -> dict[str, Any]:
    """The state dict stored at ``path``, keys with ``prefix`` stripped: a ``state_dict`` file
    or a checkpoint dict with a ``state_dict`` entry (loaded with ``weights_only=True``), or a
    distributed checkpoint directory (``ModelParallelStrategy``'s; DCP consolidates its
    shards into full tensors).

    Raises:
        ValueError: for a file that holds no state dict, a torn distributed checkpoint, or a
            prefix that matches no key.
    """
    if Path(path).is_dir():
        return read_distributed_state(path, prefix, "teacher")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file it cannot read
        raise ValueError(
            f"teacher_checkpoint {path!r} is not a readable PyTorch checkpoint: {error}"
        ) from error
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(
            f"teacher_checkpoint {path!r} holds a {type(state).__name__}, not a state dict."
        )
    if prefix:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not stripped:
            raise ValueError(
                f"no key of teacher_checkpoint {path!r} starts with "
                f"teacher_checkpoint_prefix={prefix!r}; its keys start like {sorted(state)[:3]}."
            )
        state = stripped
    return dict(state)


class TeacherSource:
    """Builds the frozen teacher.

    Args:
        model: the teacher, or a zero-argument factory (built on first :meth:`build`).
        checkpoint: optional weights loaded into it (strictly) before parallelisation: a
            ``state_dict`` or Lightning checkpoint file, or a distributed checkpoint directory
            (DCP ``.metadata`` and shards, as ``ModelParallelStrategy`` saves).
        checkpoint_prefix: key prefix to strip from that file (e.g. ``"model."``).

    Raises:
        ValueError: when ``checkpoint`` is neither a file nor a distributed checkpoint.
    """

    def __init__(
        self, model: ModelOrFactory, checkpoint: str | None = None, checkpoint_prefix: str = ""
    ) -> None:
        if checkpoint is not None and not (
            Path(checkpoint).is_file() or is_distributed_checkpoint(checkpoint)
        ):
            raise ValueError(
                f"teacher_checkpoint {checkpoint!r} is neither a file nor a distributed "
                "checkpoint directory (with DCP's .metadata)."
            )
        self.model = model
        self.checkpoint = checkpoint
        self.checkpoint_prefix = checkpoint_prefix

    def build(self) -> nn.Module:
        """The teacher with its checkpoint loaded, frozen."""
        teacher = build_model(self.model, "teacher")
        if self.checkpoint is not None:
            teacher.load_state_dict(read_state_dict(self.checkpoint, self.checkpoint_prefix))
        freeze(teacher)
        return teacher

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records about the teacher's source."""
        return {
            "teacher_checkpoint": self.checkpoint,
            "teacher_checkpoint_prefix": self.checkpoint_prefix,
        }
