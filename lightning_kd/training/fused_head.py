"""The fused-head path of ``DistillationModule(fused_head=True)``: no ``[N, V]`` logits.

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

from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.losses.linear_kd_loss import LinearKDLoss
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


def linear_loss_like(loss: KDLoss, kd_ratio: float | None = None) -> LinearKDLoss:
    """The fused form of ``loss``: a :class:`LinearKDLoss` with its options (an unchunked
    ``KDLoss`` becomes 1024 valid tokens per chunk), optionally another ``kd_ratio``."""
    linear = LinearKDLoss.from_kd_loss(loss)
    if kd_ratio is None:
        return linear
    return LinearKDLoss(
        linear.ignore_index, linear.temperature, linear.fp32_upcast, linear.tp_group,
        linear.chunk_size, divergence=linear.divergence, kd_ratio=kd_ratio,
    )  # fmt: skip


def fused_kd_loss(
    loss: KDLoss, student: FusedHeadOutput, teacher: Any, labels: Tensor
) -> KDLossOutput:
    """The distillation loss from both heads (``return_per_token=True``): the student's head
    gathered as a forward of its FSDP2 unit (its gradient is reduce-scattered), the frozen
    teacher's gathered around it.

    Raises:
        ValueError: when the teacher's output is not a :class:`FusedHeadOutput` too.
    """
    if not isinstance(teacher, FusedHeadOutput):
        raise ValueError(
            "with fused_head=True, run_student and run_teacher must both return a "
            f"FusedHeadOutput, got {type(teacher).__name__} for the teacher."
        )
    linear = linear_loss_like(loss)

    def fused(student_hidden: Tensor) -> KDLossOutput:
        # Read the weights here, inside the gathered forward: outside it they are shards.
        return linear(
            student_hidden, student.head.weight, teacher.hidden, teacher.head.weight, labels,
            student_bias=student.head.bias, teacher_bias=teacher.head.bias,
            return_per_token=True,
        )  # fmt: skip

    with gathered(teacher.owner):
        return call_as_forward(student.owner, fused, student.hidden)


def fused_cross_entropy(loss: KDLoss, output: FusedHeadOutput, labels: Tensor) -> Tensor:
    """A frozen model's mean cross-entropy on ``labels`` from its hidden states and head,
    with ``loss``'s settings (0-dim; no logits)."""
    linear = linear_loss_like(loss, kd_ratio=0.0)
    with gathered(output.owner):
        head = output.head
        return linear(output.hidden, head.weight, None, None, labels, student_bias=head.bias)
