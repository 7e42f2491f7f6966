"""FSDP2 mechanics of the fused-head teacher (:mod:`lightning_kd.training.teachers.fused`).

Each model runs up to its final hidden states (:class:`~lightning_kd.models.contract.
SupportsFusedHead`), and :class:`~lightning_kd.losses.LinearKDLoss` reads both heads' weights,
computing the logits chunk by chunk inside its loop. The difficulty is FSDP2 (its hooks
gather parameters only around forwards): between forwards a sharded module's parameters are
DTensor shards over the data-parallel mesh, so reading ``lm_head.weight`` outside a forward
sees a shard. Hence:

- ``hidden_states`` is registered as an FSDP2 forward method of each model
  (``register_fsdp_forward_method``): the root's own parameters (embedding, final norm) are
  gathered around it, as around ``forward``.
- The parameters behind each head live in one FSDP2 unit, the head's *owner*: the head itself,
  sharded as its own unit, or the root model when the head's weight is tied to a parameter
  outside it. The student's loss runs inside an FSDP2-registered method of that owner, so its
  weight is gathered for the loss and the weight gradient (returned by the loss's backward)
  goes through FSDP2's reduce-scatter like any forward's.
- The frozen teacher's owner is gathered with ``unshard()`` / ``reshard()`` around the loss: it
  needs no gradient, so no backward hooks either.

Without FSDP2 (one process, DDP, tensor parallelism alone) nothing is registered and the calls
are plain calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from lightning_kd.models.contract import SupportsFusedHead

#: The name of the method added to a head's owner to run the loss as one of its forwards.
FUSED_METHOD = "lightning_kd_fused_call"


class FusedHeadOutput(NamedTuple):
    """What ``run_student`` / ``run_teacher`` return with ``fused_head=True``.

    Attributes:
        hidden: [B, S, d] final hidden states (what the head reads).
        head: the head module (``weight`` [V, d], optional ``bias`` [V]).
        owner: the module whose FSDP2 unit holds the head's parameters (the head, or the
            model when the head is tied to a parameter outside it).
    """

    hidden: Tensor
    head: nn.Module
    owner: nn.Module


def fused_head_of(model: nn.Module, role: str) -> nn.Module:
    """The model's head for the fused path.

    Raises:
        ValueError: when the model does not implement ``hidden_states`` / ``output_head``, or
            its head has no 2-D ``weight``.
    """
    if not isinstance(model, SupportsFusedHead):
        raise ValueError(
            f"fused_head=True needs the {role} ({type(model).__name__}) to implement "
            "hidden_states(input_ids) and output_head() (see lightning_kd.models.contract."
            "SupportsFusedHead; TinyLlama and HFCausalLM do). Use fused_head=False."
        )
    head = model.output_head()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(
            f"the {role}'s output_head() must be a linear layer with a [V, d] weight, got "
            f"{type(head).__name__}."
        )
    return head


def head_is_tied(model: nn.Module, head: nn.Module) -> bool:
    """Whether the head's weight is also a parameter of a module outside the head (e.g. the
    input embedding): then it cannot be an FSDP2 unit of its own."""
    inside = {id(m) for m in head.modules()}
    weight = head.weight
    return any(
        p is weight
        for m in model.modules()
        if id(m) not in inside
        for p in m.parameters(recurse=False)
    )


def register_fused_methods(model: nn.Module, owner: nn.Module) -> None:
    """After ``fully_shard``: make ``model.hidden_states`` and the owner's fused call FSDP2
    forwards (no-ops on modules FSDP2 does not manage)."""
    register_fsdp_forward_method(model, "hidden_states")
    if not hasattr(owner, FUSED_METHOD):
        setattr(owner, FUSED_METHOD, functools.partial(_call, owner))
        register_fsdp_forward_method(owner, FUSED_METHOD)


def _call(owner: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def call_as_forward(owner: nn.Module, fn: Callable[..., Any], *tensors: Tensor) -> Any:
    """``fn(*tensors)`` run as a forward of ``owner``: under FSDP2 its parameters are gathered
    for the call and the gradients reaching them are reduce-scattered in backward. The tensors
    go through the call's arguments so that FSDP2 sees the inputs it must hook."""
    method = getattr(owner, FUSED_METHOD, None)
    return fn(*tensors) if method is None else method(fn, *tensors)


@contextmanager
def gathered(owner: nn.Module) -> Iterator[None]:
    """Gather an FSDP2 unit's parameters for the block (for a frozen model: no gradient)."""
    if not isinstance(owner, FSDPModule):
        yield
        return
    owner.unshard()
    try:
        yield
    finally:
        owner.reshard()
