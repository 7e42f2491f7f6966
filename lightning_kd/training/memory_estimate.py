"""A per-device memory estimate of a distillation run, printed before training starts.

:func:`estimate_memory` adds up, per device, in bytes:

- weights: each model's parameters in their storage dtype, divided by the TP size and, under
  FSDP2 (DP > 1), by the DP size, plus one gathered block (the largest ``fsdp_units()`` entry,
  in the compute dtype, divided by TP) while it runs. With ``teacher_offload`` the teacher's
  shards live in host memory and only the gathered block counts on the device.
- gradients: the student's trainable parameters in their storage dtype, sharded like the
  weights (a LoRA student: its adapters only; the frozen base has none).
- optimizer state: AdamW's two states per trainable parameter (``exp_avg``, ``exp_avg_sq``),
  in the parameter dtype (fp32 for ``32-true`` and the ``-mixed`` precisions), sharded likewise.
- logits / loss buffers: unfused, the student's and the teacher's logits and the student's
  logit gradient, ``N × V/TP`` each in the compute dtype (N = batch × sequence tokens per
  device), plus the loss's chunk workspace (:class:`~lightning_kd.KDLoss`: the student
  gradient plus O(chunk × V)), counted as 4 fp32 ``[chunk, V/TP]`` buffers (chunk = N when
  ``chunk_size=0``). Fused head: the chunk workspace only (no ``[N, V]`` tensor exists).
- activations: a stated per-layer formula: a transformer block (attention + SwiGLU MLP) keeps
  about ``16·d`` elements per token for backward (norm inputs, q/k/v, attention output, the
  MLP's gate, up and product, residuals), in the compute dtype and divided by TP, for each of
  the student's L blocks; with activation checkpointing, only each block's input (``d`` per
  token) plus one block's ``16·d`` during recomputation. The teacher (no grad) holds one
  block's ``16·d`` transiently. Both add the embedding output and final hidden state
  (``2·d`` per token).

Not counted: the allocator's caching and fragmentation, the CUDA context / framework
runtime, communication buffers, dataloader memory. Measured on CPU (growth of the peak resident
memory of a fresh process over a 2-step fit, fp32, ``tests/scripts/memory_run.py``): a 7.1M
parameter TinyLlama student (d=256, 4 blocks) and a 19.9M teacher (d=512, 4 blocks), V=8192,
8 × 128 tokens, chunk 256: estimated 414 MiB, measured 430–462 MiB (estimate/measured
0.90–0.96). The test accepts a factor 2 either way; other sizes and GPUs are not measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor, nn

from lightning_kd.checks import check_int
from lightning_kd.models.contract import fsdp_units, lm_head_width
from lightning_kd.parallel.mesh import DP_DIM, tensor_parallel_size

_PARAM_BYTES = {"32-true": 4, "32": 4, "64-true": 8, "64": 8, "bf16-true": 2, "bf16": 2,
                "16-true": 2, "16": 2, "bf16-mixed": 4, "16-mixed": 4}  # fmt: skip
_COMPUTE_BYTES = {**_PARAM_BYTES, "bf16-mixed": 2, "16-mixed": 2}
ACTIVATION_ELEMENTS_PER_LAYER = 16  # saved elements per token and hidden unit, per block
LOSS_WORKSPACE_BUFFERS = 4  # fp32 [chunk, V/TP] buffers of the chunked loss


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs to know of one model.

    Attributes:
        params: total parameter count (full, unsharded).
        n_layers: number of transformer blocks (``fsdp_units()``).
        hidden: model width d.
        largest_block: parameters of the largest block (gathered whole under FSDP2).
        trainable: parameters that train (gradients and optimizer state); None: all of them.
            A LoRA student trains its adapters only.
    """

    params: int
    n_layers: int
    hidden: int
    largest_block: int
    trainable: int | None = None


def model_size(model: nn.Module) -> ModelSize:
    """The :class:`ModelSize` of ``model`` (works on DTensor-sharded models: ``numel`` of a
    DTensor is its global size); the width is the first embedding's dimension.

    Raises:
        ValueError: when the model has no ``nn.Embedding`` to read its width from.
    """
    width = next((m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if width is None:
        raise ValueError(f"{type(model).__name__} has no nn.Embedding: cannot tell its width.")
    blocks = fsdp_units(model)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSize(params, max(len(blocks), 1), width, largest, trainable)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device estimate, in bytes, of each part (see the module docstring)."""

    student_weights: int
    teacher_weights: int
    gradients: int
    optimizer_state: int
    logits_and_loss: int
    activations: int
    teacher_host: int = 0

    @property
    def total(self) -> int:
        """Device bytes: every part but ``teacher_host``."""
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "teacher_host")

    def table(self) -> str:
        """A small text table in MiB, one row per part, then the total."""
        rows = [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)]
        rows = [r for r in rows if r[0] != "teacher host" or r[1]]
        lines = ["Memory estimate per device (MiB):"]
        lines += [f"  {name:<18}{value / 2**20:>12.1f}" for name, value in rows]
        lines.append(f"  {'total (device)':<18}{self.total / 2**20:>12.1f}")
        return "\n".join(lines)


def estimate_memory(
    student: ModelSize,
    teacher: ModelSize | None,
    *,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    tp_size: int = 1,
    dp_size: int = 1,
    precision: str | int = "32-true",
    chunk_size: int = 0,
    fused_head: bool = False,
    activation_checkpointing: bool = False,
    teacher_offload: bool = False,
) -> MemoryEstimate:
    """Estimate one device's memory for a training step (see the module docstring).

    Args:
        student: the student's sizes (:func:`model_size`).
        teacher: the teacher's, or None (trained from a teacher cache).
        batch_size: micro-batch size per device.
        seq_len: tokens per sequence.
        vocab_size: lm_head width V.
        tp_size: tensor-parallel size.
        dp_size: data-parallel size (FSDP2 shards over it when > 1).
        precision: the trainer's precision (``"32-true"``, ``"bf16-mixed"``, ...).
        chunk_size: the loss's ``chunk_size`` (0: all tokens at once).
        fused_head: whether the loss is computed from hidden states (no logits).
        activation_checkpointing: whether the student's blocks are checkpointed.
        teacher_offload: whether the teacher's shards live in host memory.

    Returns:
        The per-device :class:`MemoryEstimate`.

    Raises:
        ValueError: for a non-positive size or an unknown precision.
    """
    sizes = {"batch_size": batch_size, "seq_len": seq_len, "vocab_size": vocab_size,
             "tp_size": tp_size, "dp_size": dp_size}  # fmt: skip
    for name, value in sizes.items():
        check_int(name, value, 1)
    check_int("chunk_size", chunk_size, 0)
    precision = str(precision)
    if precision not in _PARAM_BYTES:
        raise ValueError(
            f"unknown precision {precision!r}; expected one of {sorted(_PARAM_BYTES)}."
        )
    pbytes, cbytes = _PARAM_BYTES[precision], _COMPUTE_BYTES[precision]
    shards = tp_size * (dp_size if dp_size > 1 else 1)

    def weights(size: ModelSize) -> int:
        gathered = size.largest_block * cbytes // tp_size if dp_size > 1 else 0
        return size.params * pbytes // shards + gathered

    tokens = batch_size * seq_len
    local_vocab = -(-vocab_size // tp_size)
    chunk = min(chunk_size or tokens, tokens)
    loss = LOSS_WORKSPACE_BUFFERS * chunk * local_vocab * 4
    if not fused_head:
        loss += (3 if teacher is not None else 2) * tokens * local_vocab * cbytes
    layer = ACTIVATION_ELEMENTS_PER_LAYER * tokens * student.hidden * cbytes // tp_size
    ends = 2 * tokens * student.hidden * cbytes
    if activation_checkpointing:
        activations = student.n_layers * tokens * student.hidden * cbytes + layer + ends
    else:
        activations = student.n_layers * layer + ends
    teacher_weights = teacher_host = 0
    if teacher is not None:
        activations += (ACTIVATION_ELEMENTS_PER_LAYER * cbytes // tp_size + 2 * cbytes) * (
            tokens * teacher.hidden
        )
        teacher_weights = weights(teacher)
        if teacher_offload:
            teacher_host = teacher.params * pbytes // shards
            teacher_weights = teacher.largest_block * cbytes // tp_size
    trained = student.params if student.trainable is None else student.trainable
    student_shard = trained * pbytes // shards  # a frozen base has no gradient or Adam state
    return MemoryEstimate(
        student_weights=weights(student),
        teacher_weights=teacher_weights,
        gradients=student_shard,
        optimizer_state=2 * student_shard,
        logits_and_loss=loss,
        activations=activations,
        teacher_host=teacher_host,
    )


def estimate_run_memory(module: Any, batch: Mapping[str, Any]) -> MemoryEstimate | None:
    """The estimate for a ``DistillationModule`` attached to a trainer, from its first batch
    (``input_ids`` [B, S] gives the micro-batch), its mesh, precision and loss settings; None
    when the batch or the models do not tell the sizes (no ``input_ids``, no embedding) or the
    precision is one the estimate does not know: the report must never stop a run."""
    input_ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        return None
    try:
        return _estimate(module, input_ids)
    except ValueError:
        return None


def _estimate(module: Any, input_ids: Tensor) -> MemoryEstimate:
    student = model_size(module.student)
    teacher = None if module.teacher is None else model_size(module.teacher)
    mesh = module.device_mesh
    vocab = lm_head_width(module.student) or next(
        m.num_embeddings for m in module.student.modules() if isinstance(m, nn.Embedding)
    )
    return estimate_memory(
        student,
        teacher,
        batch_size=int(input_ids.shape[0]),
        seq_len=int(input_ids.shape[1]),
        vocab_size=vocab,
        tp_size=tensor_parallel_size(mesh),
        dp_size=mesh[DP_DIM].size() if mesh is not None else 1,
        precision=module.trainer.precision,
        chunk_size=module.loss.chunk_size,
        fused_head=module.fused_head,
        activation_checkpointing=module.activation_checkpointing,
        teacher_offload=module.teacher_offload,
    )
