"""One ordered parallelize pipeline: every model of a run goes through :func:`parallelize_model`.

The order matters, and it is read here in one place (as in torchtitan's ``parallelize_llama``):

1. **Tensor parallelism** (:func:`~lightning_kd.parallel.plans.apply_tensor_parallel`): untie
   any weight the plan would split from a module it does not split, then ``parallelize_module``
   over the TP mesh. First, because every later step wraps modules whose parameters must
   already be DTensors over the TP mesh.
2. **Head owner**: the caller's ``head_owner`` callback is asked, after TP (which may have
   untied the head), which module's FSDP2 unit must hold the output head's parameters; a
   submodule then becomes an FSDP2 unit of its own (the fused head of
   ``DistillationModule(fused_head=True)``).
3. **Activation checkpointing**, then **compile**, on each block of ``fsdp_units()``
   (:mod:`lightning_kd.parallel.block_wrappers`): after TP so that they wrap the sharded
   blocks, before FSDP2 so that FSDP2's hooks sit around the checkpointed (compiled) call.
4. **FSDP2** over the data-parallel mesh (:func:`~lightning_kd.parallel.fsdp.apply_fsdp`):
   blocks, the head owner, then the root; with ``offload`` the parameters live in host memory.
5. **Materialise** a model built on the meta device
   (:func:`~lightning_kd.parallel.meta_init.materialize`): only now are the local shards known,
   so only they are allocated and read; non-persistent buffers are recomputed through the model
   contract.

Every step is skipped when not asked for, so the same call serves one process (block options
only), TP alone, FSDP2 alone and both. Used by ``DistillationModule.configure_model`` (so by
the benchmarks that train one) and the tests; a model that is not a transformer needs only
what the steps it asks for need (a plan for TP, ``fsdp_units()`` for the block options).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_kd.parallel.block_wrappers import checkpoint_blocks, compile_blocks
from lightning_kd.parallel.fsdp import apply_fsdp
from lightning_kd.parallel.meta_init import WeightSource, materialize
from lightning_kd.parallel.plans import apply_tensor_parallel, resolve_tensor_parallel_plan

__all__ = ["parallelize_model"]

#: ``head_owner(model)`` -> the module whose FSDP2 unit holds the model's output head (the
#: model itself, or a submodule that becomes a unit of its own), or None for no special unit.
HeadOwner = Callable[[nn.Module], nn.Module | None]


def parallelize_model(
    model: nn.Module,
    *,
    tp_mesh: DeviceMesh | None = None,
    dp_mesh: DeviceMesh | None = None,
    plan: Mapping[str, ParallelStyle] | None = None,
    head_owner: HeadOwner | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    fsdp: bool = False,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload: bool = False,
    reshard_after_forward: bool = True,
    weights: WeightSource | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Parallelise ``model`` in place, in the order of the module docstring.

    Args:
        model: the model (built in full, or on the meta device when ``weights`` is given).
        tp_mesh: the 1-D tensor-parallel mesh; TP is applied when its size is above 1.
        dp_mesh: the 1-D data-parallel mesh FSDP2 shards over (needed with ``fsdp``).
        plan: the TP plan (``{module path or fnmatch pattern: ParallelStyle}``); default the
            model's own ``tensor_parallel_plan(tp_size)``. Unused without TP.
        head_owner: called with the model after TP; the module it returns, when it is a proper
            submodule, is sharded by FSDP2 as a unit of its own. Called with or without FSDP2.
        activation_checkpointing: recompute each block of ``fsdp_units()`` in backward.
        compile: ``torch.compile`` each block of ``fsdp_units()`` in place.
        fsdp: shard with FSDP2 ``fully_shard`` over ``dp_mesh`` (also when its size is 1, e.g.
            for ``offload``).
        mp_policy: FSDP2's precision policy (see
            :func:`~lightning_kd.parallel.fsdp.mixed_precision_policy`).
        offload: FSDP2's ``CPUOffloadPolicy`` (parameters in host memory); needs ``fsdp``.
        reshard_after_forward: free gathered parameters after each forward (FSDP2).
        weights: where a meta-built model's weights come from; None for a model built in full.
        device: where a meta-built model's local shards are allocated; default the meshes'
            device type (``"cpu"`` without a mesh). With ``offload``, always the host.

    Returns:
        ``model``, parallelised in place.

    Raises:
        ValueError: for ``fsdp`` without ``dp_mesh``, ``offload`` without ``fsdp``, TP on a
            model without a plan, block options on a model without ``fsdp_units()``, or a
            meta-built model that cannot be materialised (see ``materialize``).
    """
    if fsdp and dp_mesh is None:
        raise ValueError("fsdp=True shards over the data-parallel mesh; got dp_mesh=None.")
    if offload and not fsdp:
        raise ValueError("offload=True is FSDP2's CPUOffloadPolicy and needs fsdp=True.")
    if tp_mesh is not None and tp_mesh.size() > 1:
        apply_tp(model, tp_mesh, plan)
    owner = head_owner(model) if head_owner is not None else None
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        compile_blocks(model)
    if fsdp:
        extra_units = (owner,) if owner is not None and owner is not model else ()
        apply_fsdp(model, dp_mesh, reshard_after_forward=reshard_after_forward,
                   mp_policy=mp_policy, extra_units=extra_units, offload=offload)  # fmt: skip
    if weights is not None:
        target = "cpu" if offload else (device or _mesh_device(tp_mesh, dp_mesh))
        materialize(model, torch.device(target), weights)
    return model


def apply_tp(
    model: nn.Module, tp_mesh: DeviceMesh, plan: Mapping[str, ParallelStyle] | None = None
) -> nn.Module:
    """Step 1: tensor parallelism over ``tp_mesh`` with ``plan`` (default the model's own),
    tied weights the plan would split untied first."""
    plan = resolve_tensor_parallel_plan(model, tp_mesh.size(), plan)
    return apply_tensor_parallel(model, tp_mesh, plan)


def _mesh_device(*meshes: DeviceMesh | None) -> str:
    types = [mesh.device_type for mesh in meshes if mesh is not None]
    return types[0] if types else "cpu"
