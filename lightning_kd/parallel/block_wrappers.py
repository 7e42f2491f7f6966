"""Per-block training options: activation checkpointing and ``torch.compile``.

Both act on the blocks a model lists in ``fsdp_units()`` (its transformer blocks) and both keep
the state-dict keys unchanged, so a checkpoint saved with either option loads without it:

- :func:`checkpoint_blocks` replaces each block's ``forward`` (an instance attribute, no
  wrapper module, so no ``_checkpoint_wrapped_module.`` prefix) with one that runs the original
  under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: only the block's
  input is kept for backward and the block is recomputed during backward. Under no-grad
  (validation, the teacher) the block runs directly.
- :func:`compile_blocks` calls ``block.compile()`` (``torch.compile`` in place: the module
  keeps its parameters and keys; the compiled call replaces ``__call__``).

Order, as in torchtitan: tensor parallelism, then activation checkpointing, then compile, then
FSDP2 (:func:`~lightning_kd.parallel.pipeline.parallelize_model` holds it). FSDP2's hooks then
sit around the checkpointed call: parameters are gathered before the forward and again
(pre-backward hook) before the recomputation in backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_kd.models.contract import fsdp_units

_COMPILED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_COMPILER_OK: bool | None = None


class CheckpointedForward:
    """A block's ``forward`` run under non-reentrant activation checkpointing when grad is on.

    Args:
        forward: the block's original (bound) forward.
    """

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module) -> int:
    """Apply activation checkpointing to each of ``model.fsdp_units()`` (idempotent).

    Args:
        model: a model with ``fsdp_units()`` (TinyLlama, HFCausalLM).

    Returns:
        The number of blocks checkpointed by this call (0 when already done).

    Raises:
        ValueError: when the model lists no blocks (nothing to checkpoint).
    """
    blocks = _blocks(model, "activation_checkpointing")
    done = 0
    for block in blocks:
        if not isinstance(block.forward, CheckpointedForward):
            block.forward = CheckpointedForward(block.forward)
            done += 1
    return done


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each of ``model.fsdp_units()`` in place (idempotent).

    Args:
        model: a model with ``fsdp_units()``.

    Returns:
        The number of blocks compiled by this call (0 when already done).

    Raises:
        ValueError: when the model lists no blocks, or when this platform cannot compile (no
            working C++ compiler for inductor on CPU, see :func:`check_compiler`).
    """
    blocks = _blocks(model, "compile")
    check_compiler()
    done = 0
    for block in blocks:
        if block not in _COMPILED:
            block.compile()
            _COMPILED.add(block)
            done += 1
    return done


def compiler_available() -> bool:
    """Whether ``torch.compile`` works here (tried once on a tiny function, then cached)."""
    global _COMPILER_OK
    if _COMPILER_OK is None:
        try:
            fn = torch.compile(lambda x: torch.sin(x) * 2 + 1)
            _COMPILER_OK = bool(torch.allclose(fn(torch.ones(3)), torch.ones(3).sin() * 2 + 1))
        except Exception:  # any compiler failure means "not available"
            _COMPILER_OK = False
    return _COMPILER_OK


def check_compiler() -> None:
    """Raise a clear error when ``torch.compile`` does not work on this platform.

    Raises:
        ValueError: when a tiny ``torch.compile`` fails (e.g. inductor finds no C++ compiler).
    """
    if not compiler_available():
        raise ValueError(
            "compile=True needs a working torch.compile, and a tiny test compile failed on "
            "this platform (on CPU, inductor needs a C++ compiler such as g++ on PATH). "
            "Install one or set compile=False."
        )


def _blocks(model: nn.Module, option: str) -> list[nn.Module]:
    blocks = fsdp_units(model)
    if not blocks:
        raise ValueError(
            f"{option}=True acts on the model's transformer blocks, but "
            f"{type(model).__name__} lists none (implement fsdp_units(), see "
            "lightning_kd.models.contract.SupportsFSDP)."
        )
    return blocks
