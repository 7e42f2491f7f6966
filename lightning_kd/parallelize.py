"""Apply tensor parallelism and FSDP2 to a teacher or a student on a device mesh.

Used by :meth:`DistillationModule.configure_model`. A model takes part in TP through a plan
dict (``{"submodule.path": ParallelStyle}``), either given explicitly or from its own
``tensor_parallel_plan(tp_size)`` method; a model without one runs on a single device or with
data parallelism only, and asking for TP without a plan is an error rather than a silent full
replica. FSDP2 wraps the model's ``fsdp_units()`` (e.g. its transformer blocks) and then the
root.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module


def tensor_parallel_plan(
    model: nn.Module, tp_size: int, plan: Mapping[str, ParallelStyle] | None = None
) -> Mapping[str, ParallelStyle]:
    """The TP plan to apply: ``plan`` if given, else ``model.tensor_parallel_plan(tp_size)``.

    Raises:
        ValueError: when neither exists, naming the model's class.
    """
    if plan is not None:
        return plan
    method = getattr(model, "tensor_parallel_plan", None)
    if method is None:
        raise ValueError(
            f"{type(model).__name__} has no tensor-parallel plan: tensor_parallel_size > 1 needs "
            "a `tensor_parallel_plan(tp_size)` method on the model, a plan passed to "
            "DistillationModule, or an override of DistillationModule.tensor_parallel_plan."
        )
    return method(tp_size)


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, plan: Mapping[str, ParallelStyle]
) -> nn.Module:
    """``parallelize_module`` with ``plan`` over the 1-D ``tp_mesh`` (weights from rank 0)."""
    return parallelize_module(model, tp_mesh, dict(plan))


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """FSDP2 ``fully_shard`` of ``model.fsdp_units()`` (if any), then of the root."""
    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    units = getattr(model, "fsdp_units", None)
    for unit in units() if units is not None else ():
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model
