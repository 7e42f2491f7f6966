"""FSDP2 (``fully_shard``) over the data-parallel mesh, with a precision policy from the trainer.

Without a ``MixedPrecisionPolicy`` FSDP2 all-gathers parameters in their storage dtype, so a
``bf16-mixed`` run would move fp32 weights and compute under autocast on them. The policy here
gathers bf16 (or fp16) parameters and, for trainable models, reduce-scatters gradients in fp32
(sums of many low-precision gradients lose bits).

``offload=True`` (for the frozen teacher, ``DistillationModule(teacher_offload=True)``) adds
FSDP2's ``CPUOffloadPolicy``: the sharded parameters live in host memory (pinned on CUDA) and
each unit's shard is copied to the device and all-gathered just before its forward, then freed.
Cost: a host-to-device copy of the whole model's weights (its local shard on each rank) per
forward, on top of the usual all-gather; device memory holds about one unit's weights at a time.
:func:`place_offloaded` puts such a model's parameters back in host memory after Lightning
moved the module to its device.

FSDP2 comes after tensor parallelism and the block options, before materialisation: see
:func:`~lightning_kd.parallel.pipeline.parallelize_model`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from lightning_kd.models.contract import fsdp_units

_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_KNOWN = {"32-true", "32", "64-true", "64", "bf16-true", "16-true", "bf16", "16", *_MIXED}


def mixed_precision_policy(precision: str | int, trainable: bool) -> MixedPrecisionPolicy | None:
    """The FSDP2 policy for Lightning's ``precision`` setting.

    Args:
        precision: the trainer's precision (``"bf16-mixed"``, ``"32-true"``, ...).
        trainable: whether the model trains (its gradients are then reduced in fp32).

    Returns:
        For ``bf16-mixed`` / ``16-mixed``: parameters gathered in bf16 / fp16, gradients
        reduced in fp32 when ``trainable``. For the ``-true`` precisions: None (parameters
        already have the dtype to gather in).

    Raises:
        ValueError: for a precision Lightning's ModelParallelStrategy does not support.
    """
    precision = str(precision)
    if precision not in _KNOWN:
        raise ValueError(
            f"unsupported precision {precision!r} for FSDP2; expected one of {sorted(_KNOWN)}."
        )
    dtype = _MIXED.get(precision)
    if dtype is None:
        return None
    return MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32 if trainable else None
    )


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    extra_units: tuple[nn.Module, ...] = (),
    offload: bool = False,
) -> nn.Module:
    """FSDP2 ``fully_shard`` of the model's ``fsdp_units()`` (if any) and ``extra_units``, then
    of the root.

    Args:
        model: the model to shard in place.
        dp_mesh: the 1-D data-parallel mesh.
        reshard_after_forward: free gathered parameters after each forward (True for a
            no-grad teacher, or its weights would stay gathered).
        mp_policy: the precision policy (see :func:`mixed_precision_policy`).
        extra_units: more submodules to shard as their own units (e.g. the lm_head of a fused
            head, gathered on its own when the loss needs it).
        offload: keep the parameters in host memory (``CPUOffloadPolicy``; pinned when the
            mesh is on CUDA) and stream each unit to the device for its forward. Meant for a
            frozen model: an offloaded trainable model would also run its optimizer on CPU.
    """
    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dp_mesh.device_type == "cuda")
    for unit in (*fsdp_units(model), *extra_units):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def place_offloaded(model: nn.Module, device: torch.device) -> None:
    """Parameters in host memory, buffers on ``device``: where an FSDP2 ``CPUOffloadPolicy``
    model's tensors belong.

    Lightning's ``ModelParallelStrategy`` moves the whole LightningModule to its device after
    ``configure_model`` (``model_to_device``), offloaded teacher included; FSDP2 then refuses
    it at its first forward ("FSDP parameters should be materialized on CPU when enabling CPU
    offloading"). Call this after that move and before the model's first forward. Buffers
    (RoPE tables, rotary ``inv_freq``) are not FSDP2's: they stay on the compute device. A
    no-op when everything already sits where it belongs (e.g. runs on CPU). Not yet run on a
    GPU (no CUDA machine in this project's CI): the move back is checked only by reading
    FSDP2's source.
    """
    moved_from = {p.device.type for p in model.parameters()} - {"cpu"}
    if moved_from:
        model.to("cpu")  # parameters (DTensor shards) keep their identity: FSDP2 holds them
        if "cuda" in moved_from:
            torch.cuda.empty_cache()  # the cached blocks the move left behind
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device != device:
                setattr(module, name, buffer.to(device))  # stays registered (persistence kept)
