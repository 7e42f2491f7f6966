"""Tensor-parallel plans: which plan applies, tied weights, applying it, and checking its output.

A model takes part in TP through a plan dict (``{"submodule.path": ParallelStyle}``, fnmatch
wildcards allowed), given explicitly or from its own ``tensor_parallel_plan(tp_size)``; asking
for TP without a plan is an error rather than a silent full replica. Two silent failure modes
are closed here, whatever the plan's source:

- a tied lm_head (one Parameter shared with the input embedding) would be sharded on one side
  and replicated on the other: the model unties it (``untie_lm_head``) or the plan is refused;
- an lm_head that hands each rank a plain ``[B, S, V/tp]`` slice (``ColwiseParallel()`` with
  its default ``use_local_output=True``) makes the loss treat a slice as the whole vocabulary:
  :func:`check_vocab_parallel_logits` refuses such logits at the loss boundary.

The model-family knowledge (which modules a family splits, how a plan key names a module) lives
in :mod:`lightning_kd.models`; this module applies plans generically and imports the models'
contract, never a model family. :func:`~lightning_kd.parallel.pipeline.parallelize_model` calls
:func:`apply_tensor_parallel` as the first step of its order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from lightning_kd.models.contract import (
    SupportsTensorParallel,
    SupportsUntiedHead,
    lm_head_width,
    plan_key_matches,
)
from lightning_kd.models.lora import lora_tensor_parallel_plan

__all__ = [
    "apply_tensor_parallel",
    "check_vocab_parallel_logits",
    "plan_key_matches",
    "resolve_tensor_parallel_plan",
    "untie_planned_weights",
]


def resolve_tensor_parallel_plan(
    model: nn.Module, tp_size: int, plan: Mapping[str, ParallelStyle] | None = None
) -> dict[str, ParallelStyle]:
    """The TP plan to apply: ``plan`` if given, else ``model.tensor_parallel_plan(tp_size)``.

    Raises:
        ValueError: when neither exists, naming the model's class.
    """
    if plan is not None:
        return dict(plan)
    if not isinstance(model, SupportsTensorParallel):
        raise ValueError(
            f"{type(model).__name__} has no tensor-parallel plan: tensor_parallel_size > 1 needs "
            "a `tensor_parallel_plan(tp_size)` method on the model, a plan passed to "
            "DistillationModule, or an override of DistillationModule.tensor_parallel_plan."
        )
    return dict(model.tensor_parallel_plan(tp_size))


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor under several names (e.g. a tied lm_head)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _planned(param_name: str, plan: Mapping[str, ParallelStyle]) -> bool:
    module_path = param_name.rpartition(".")[0]
    return any(plan_key_matches(module_path, pattern) for pattern in plan)


def untie_planned_weights(model: nn.Module, plan: Mapping[str, ParallelStyle]) -> None:
    """Make sure no parameter the plan shards is shared with a module it does not shard.

    Raises:
        ValueError: when such a tie exists and the model has no ``untie_lm_head()``.
    """
    for group in _tied_parameters(model):
        if not any(_planned(name, plan) for name in group):
            continue
        if isinstance(model, SupportsUntiedHead):
            model.untie_lm_head()
            if not any(set(group) <= set(g) for g in _tied_parameters(model)):
                continue
        raise ValueError(
            f"{type(model).__name__} shares one weight between {', '.join(group)} and the "
            "tensor-parallel plan shards one of them: the tie would be split silently. Untie "
            "the weights (e.g. tie_embeddings=False) or give the model an untie_lm_head()."
        )


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, plan: Mapping[str, ParallelStyle]
) -> nn.Module:
    """Untie what the plan would split, then ``parallelize_module`` over the 1-D ``tp_mesh``
    (weights from rank 0's initialisation). Keys naming LoRA layers go to their base layer and
    adapters (:func:`~lightning_kd.models.lora.lora_tensor_parallel_plan`)."""
    plan = lora_tensor_parallel_plan(model, plan)
    untie_planned_weights(model, plan)
    return parallelize_module(model, tp_mesh, dict(plan))


def check_vocab_parallel_logits(
    logits: Tensor, model: nn.Module, role: str, tp_size: int, tp_group: dist.ProcessGroup | None
) -> None:
    """Refuse logits that would make the loss silently wrong under tensor parallelism.

    Under TP a plain tensor narrower than the model's lm_head is one rank's vocabulary slice:
    without a ``tp_group`` the loss would normalise it as if it were the whole vocabulary.
    DTensors (the loss reads their placements), full-width plain tensors and runs without TP
    pass.

    Raises:
        ValueError: naming the model and the fix (a vocabulary-sharded DTensor output).
    """
    if tp_size <= 1 or tp_group is not None or isinstance(logits, DTensor):
        return
    width = lm_head_width(model)
    if width is not None and logits.shape[-1] == width:
        return
    raise ValueError(
        f"the {role} ({type(model).__name__}) returns plain-tensor logits of width "
        f"{logits.shape[-1]} under tensor_parallel_size={tp_size}"
        + ("" if width is None else f" (its lm_head has {width} rows)")
        + ": each rank would treat its vocabulary slice as the whole vocabulary and compute a "
        "wrong loss. Make the lm_head's plan entry ColwiseParallel(output_layouts=Shard(-1), "
        "use_local_output=False) so that it returns a vocabulary-sharded DTensor, or pass "
        "tp_group to the loss."
    )
