"""The fused pass: lm_head matmuls, divergence and CE per chunk, no ``[N, V]`` tensor.

:func:`linear_distill_over_rows` is :func:`~lightning_kd.losses.engine.distill_over_rows` with
the lm_head folded in: it takes the last hidden states and the head weights (and biases)
instead of logits, and for each chunk of at most ``chunk_size`` valid tokens computes the
chunk's student and teacher logits (``hidden[rows] @ weight.T + bias``), runs the same chunk
math as ``KDLoss`` (:func:`~lightning_kd.losses.engine.chunk_math`: the divergence and the
hard-label CE mixed in one gradient buffer ``G = d(loss)/d(logits)`` of the chunk), and turns
``G`` into the gradients of the student's inputs right away::

    grad_hidden[rows] = G @ W        grad_W += Gᵀ @ hidden[rows]        grad_b += Σ_rows G

so no tensor larger than ``chunk × V`` ever exists. Only one exists: the chunk's student
logits are one matmul into a ``[chunk, V]`` buffer, which becomes ``G`` in place, block by
block of rows. The teacher's logits are computed in blocks of rows
(:data:`TEACHER_BLOCK_ELEMENTS`, large enough for an efficient matmul) and the chunk math in
cache-sized blocks (:data:`~lightning_kd.losses.engine.BLOCK_ELEMENTS`), each block's gradient
written over the student rows it has consumed. Peak memory is that buffer, the teacher's
block, a few cache-sized workspaces and the gradients shaped like the inputs (the weight's
``[V, d]``, the hidden states' ``[n, d]``).
Everything is computed inside one ``torch.autograd.Function`` during the forward pass; the
backward pass only scales the stored gradients by the incoming gradient.

Chunks hold valid tokens only (ignored tokens are skipped, never computed). Under tensor
parallelism each rank holds a vocabulary slice of the weights: its chunk logits are
``[m, V_local]``, the softmaxes go through
:class:`~lightning_kd.losses.vocab_parallel.VocabParallelSoftmax` exactly as in ``KDLoss``
(O(tokens) all-reduces), the weight and bias gradients are the rank's slice and need no
communication, and the hidden-state gradient, a sum over the vocabulary, is all-reduced over
the group once at the end of the forward pass (``n_valid × d`` values in fp32, or fp64).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_kd.losses.engine import (
    GradMix,
    PassOutput,
    PassSpec,
    block_rows,
    chunk_math,
    chunk_views,
    reduce_terms,
    workspaces,
)
from lightning_kd.losses.vocab_softmax import VocabSoftmax


class Head(NamedTuple):
    """One model's last hidden states and (local slice of the) output head.

    Attributes:
        hidden: [*, d] hidden states (replicated over tensor-parallel ranks).
        weight: [V_local, d] head weight (this rank's vocabulary rows).
        bias: [V_local] head bias, or None.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


def matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of a head's logits: the autocast dtype when autocast is on for the device and
    both tensors are autocast-eligible (what ``F.linear`` does), else the promoted dtype."""
    device = hidden.device.type
    eligible = (torch.float32, torch.float16, torch.bfloat16)
    if torch.is_autocast_enabled(device) and hidden.dtype in eligible and weight.dtype in eligible:
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _rows(x2d: Tensor, rows_cpu: Tensor) -> Tensor:
    """Rows ``rows_cpu`` (sorted) of ``x2d``: a view when they are consecutive."""
    first, last = int(rows_cpu[0]), int(rows_cpu[-1])
    if last - first + 1 == rows_cpu.numel():
        return x2d[first : last + 1]
    return x2d.index_select(0, rows_cpu.to(x2d.device))


def _logits(hidden_rows: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``out = hidden_rows @ weight.T (+ bias)`` in ``out``'s dtype (the matmul dtype)."""
    hidden_rows = hidden_rows.to(out.dtype)
    if bias is None:
        return torch.mm(hidden_rows, weight.t(), out=out)
    return torch.addmm(bias, hidden_rows, weight.t(), out=out)


#: Rows of the teacher's logits computed at once: about this many elements (16 MiB in fp32).
#: Large enough for an efficient matmul, a fraction of a chunk's [chunk, V].
TEACHER_BLOCK_ELEMENTS = 1 << 22


def _block_sizes(
    vsize: int,
    widest: int,
    vocab: VocabSoftmax,
    tp_group: dist.ProcessGroup | None,
    device: torch.device,
) -> tuple[int, int]:
    """``(teacher block rows, chunk-math block rows)``, the latter at most the former. Under
    tensor parallelism both come from the largest shard's width, so that every rank cuts the
    same blocks and issues the same collectives (uneven shards differ by a row or so)."""
    width = vsize
    if tp_group is not None and widest > 0:
        total = vocab.vocab_range(vsize, device)[1]
        size = dist.get_world_size(tp_group)
        width = -(-total // size)
    t_rows = block_rows(width, max(widest, 1), TEACHER_BLOCK_ELEMENTS)
    return t_rows, block_rows(width, t_rows)


class _LinearDistillOverRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        s_hidden: Tensor,
        s_weight: Tensor,
        s_bias: Tensor | None,
        t_hidden: Tensor | None,
        t_weight: Tensor | None,
        t_bias: Tensor | None,
        valid: Tensor,
        targets: Tensor | None,
        spec: PassSpec,
        vocab: VocabSoftmax,
        needs: tuple[bool, bool, bool],
        mm_dtypes: tuple[torch.dtype, torch.dtype | None],
        tp_group: dist.ProcessGroup | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        device, dtype = s_hidden.device, spec.compute_dtype
        divergence = spec.divergence
        need_h, need_w, need_b = needs
        mix = GradMix.of(spec, any(needs))
        need_grad = mix.div_grad or mix.ce_grad
        vsize, d_s = s_weight.shape

        idx = valid.reshape(-1).cpu().nonzero().squeeze(1)
        n = idx.numel()
        step = spec.chunk_size or max(n, 1)
        widest = min(step, n)
        per_div = torch.empty(n if divergence is not None else 0, dtype=dtype, device=device)
        per_ce = torch.empty(n if spec.with_ce else 0, dtype=dtype, device=device)

        # Per-call matmul operands (a cast copy of a weight only when its dtype differs from
        # its logits' dtype, e.g. under autocast).
        s_mm, t_mm = mm_dtypes
        s_w = s_weight.to(s_mm)
        s_b = s_bias.to(s_mm) if s_bias is not None else None
        s_h2d = s_hidden.reshape(-1, d_s)
        t_w = t_b = t_h2d = None
        if divergence is not None:
            t_w, t_h2d = t_weight.to(t_mm), t_hidden.reshape(-1, t_hidden.shape[-1])
            t_b = t_bias.to(t_mm) if t_bias is not None else None

        # Buffers: the chunk's student logits [chunk, V] (one matmul per chunk), overwritten
        # block by block with the gradient G when the dtypes allow (else G has its own buffer);
        # the teacher's logits in blocks of rows; the chunk math in cache-sized blocks.
        t_rows, rows = _block_sizes(vsize, widest, vocab, tp_group, device)
        s_buf = torch.empty((widest, vsize), dtype=s_mm, device=device)
        g_buf = None
        if need_grad:
            g_buf = s_buf if s_mm == dtype else torch.empty_like(s_buf, dtype=dtype)
        t_buf = None
        if divergence is not None:
            t_buf = torch.empty((t_rows, vsize), dtype=t_mm, device=device)
        work = workspaces(divergence, rows, vsize, dtype, device)
        g_blk = torch.empty((rows, vsize), dtype=dtype, device=device)

        # Gradients: the hidden states' in the compute dtype for the valid rows only (compact,
        # row order; all-reduced under TP), the weight's and bias's accumulated over chunks.
        grad_h = torch.empty((n, d_s), dtype=dtype, device=device) if need_h else None
        # Sums over every token: kept in fp32 at least (in fp16 they would overflow, in bf16
        # lose precision as N grows); only [V, d_s] and [V].
        acc = torch.promote_types(dtype, torch.float32)
        grad_w = torch.zeros((vsize, d_s), dtype=acc, device=device) if need_w else None
        grad_b = torch.zeros((vsize,), dtype=acc, device=device) if need_b else None

        for start in range(0, n, step):
            chunk = idx[start : start + step]
            m = chunk.numel()
            hs = _rows(s_h2d, chunk)
            s = _logits(hs, s_w, s_b, s_buf[:m])
            ht = _rows(t_h2d, chunk) if divergence is not None else None
            chunk_targets = targets[chunk.to(device)] if spec.with_ce else None
            for t_start in range(0, m, t_rows):
                t_stop = min(t_start + t_rows, m)
                t = None
                if divergence is not None:
                    t = _logits(ht[t_start:t_stop], t_w, t_b, t_buf[: t_stop - t_start])
                for b in range(t_start, t_stop, rows):
                    e = min(b + rows, t_stop)
                    k = e - b
                    values, ce = chunk_math(
                        s[b:e],
                        t[b - t_start : e - t_start] if t is not None else None,
                        chunk_targets[b:e] if chunk_targets is not None else None,
                        vocab, spec, mix, chunk_views(work, k), g_blk[:k],
                    )  # fmt: skip
                    if values is not None:
                        per_div[start + b : start + e] = values
                    if ce is not None:
                        per_ce[start + b : start + e] = ce
                    if need_grad:  # G = d(loss)/d(logits) up to mix.grad_scale
                        g_buf[b:e].copy_(g_blk[:k])  # these student rows are done
                del t
            if need_grad:
                g = g_buf[:m]
                if need_h:
                    if s_mm == dtype:
                        torch.mm(g, s_w, out=grad_h[start : start + m])
                    else:  # the student's logits are dead: their buffer takes G's cast
                        grad_h[start : start + m] = torch.mm(s_buf[:m].copy_(g), s_w)
                if need_w:
                    grad_w.addmm_(g.t().to(acc), hs.to(acc))
                if need_b:
                    grad_b.add_(g.sum(0, dtype=acc))
                del g
            del hs, ht, s, values, ce
        del work, g_blk, g_buf, s_buf, t_buf, s_w, s_b, t_w, t_b

        if grad_h is not None and tp_group is not None and n > 0:
            # The only communication of the gradient: each rank holds G @ W over its own
            # vocabulary slice; the hidden states' gradient is the sum over the slices.
            wire = grad_h if dtype in (torch.float32, torch.float64) else grad_h.float()
            dist.all_reduce(wire, group=tp_group)
            if wire is not grad_h:
                grad_h.copy_(wire)
            del wire

        loss, div_loss, ce_loss = reduce_terms(per_div, per_ce, spec)
        ctx.mark_non_differentiable(per_div, per_ce, div_loss, ce_loss)
        # Stored O(1) in magnitude (the fp16 range, like KDLoss's buffer): the hidden rows'
        # gradient as is, the weight's and bias's (fp32 sums over tokens) divided by the
        # normaliser before they are cast to the weight's dtype.
        norm = spec.normaliser
        ctx.scales = (mix.grad_scale, mix.grad_scale * norm, mix.grad_scale * norm)
        grads = [None, None, None]
        if need_grad and need_h:
            if n == s_h2d.shape[0] and grad_h.dtype == s_hidden.dtype:  # every row valid
                grads[0] = grad_h.view(s_hidden.shape)
            else:
                full = torch.zeros(s_hidden.shape, dtype=s_hidden.dtype, device=device)
                full.view(-1, d_s).index_copy_(0, idx.to(device), grad_h.to(full.dtype))
                grads[0] = full
        del grad_h
        for i, (acc, like) in enumerate(((grad_w, s_weight), (grad_b, s_bias)), start=1):
            if need_grad and acc is not None:
                grads[i] = acc.mul_(1.0 / norm).to(like.dtype)
        ctx.grads = tuple(grads)
        ctx.need_grad = need_grad
        return loss, per_div, per_ce, div_loss, ce_loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None  # drop ctx's references so autograd takes them
        if grads is None or not ctx.need_grad:
            raise RuntimeError(
                "LinearKDLoss backward called but the forward ran without gradient tracking, "
                "or backward was called twice on the same loss."
            )
        factor = float(grad_loss)  # a Python float keeps the scale exact (see engine.py)
        out = []
        for grad, scale in zip(grads, ctx.scales, strict=True):
            out.append(grad.mul_(factor * scale) if grad is not None else None)
        return (*out,) + (None,) * 10


def linear_distill_over_rows(
    student: Head,
    teacher: Head | None,
    valid: Tensor,
    vocab: VocabSoftmax,
    spec: PassSpec,
    targets: Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> PassOutput:
    """The divergence (and optionally the hard-label CE) of ``hidden @ weight.T + bias`` over
    the valid rows, chunk by chunk, with the gradients of the student's hidden states, weight
    and bias computed during the forward pass.

    Args:
        student: the student's hidden states [*, d_s], weight [V_local, d_s] and bias
            [V_local] (plain tensors; this rank's vocabulary slice under TP). They receive
            gradients.
        teacher: the teacher's, [*, d_t] and [V_local, d_t]; used detached (no gradient). May
            be None when ``spec.divergence`` is None (the CE alone).
        valid: [*] bool, True for the rows (tokens) to include.
        vocab: the vocabulary-softmax object (local, or a tensor-parallel shard).
        spec: what to compute (see :class:`~lightning_kd.losses.engine.PassSpec`).
        targets: [N] integer labels of the flattened rows on the hidden states' device; needed
            when ``spec.with_ce``.
        tp_group: the group over which the vocabulary is sharded, or None for one process: the
            hidden-state gradient is all-reduced over it.

    Returns:
        A :class:`~lightning_kd.losses.engine.PassOutput` (loss in the compute dtype).
    """
    if spec.with_ce and targets is None:
        raise ValueError("targets are needed for the cross-entropy term.")
    if spec.divergence is None and not (spec.with_ce and spec.kd_ratio == 0.0):
        raise ValueError("without a divergence, only the cross-entropy with kd_ratio=0 is defined.")
    if spec.divergence is not None and teacher is None:
        raise ValueError("the teacher's hidden states and head are needed for the divergence.")
    grad_on = torch.is_grad_enabled()
    s_bias = student.bias
    needs = (
        grad_on and student.hidden.requires_grad,
        grad_on and student.weight.requires_grad,
        grad_on and s_bias is not None and s_bias.requires_grad,
    )
    spec = spec._replace(
        temperature=float(spec.temperature),
        normaliser=float(spec.normaliser),
        chunk_size=int(spec.chunk_size),
        kd_ratio=float(spec.kd_ratio),
    )
    t_hidden = t_weight = t_bias = None
    if teacher is not None and spec.divergence is not None:
        t_hidden, t_weight = teacher.hidden.detach(), teacher.weight.detach()
        t_bias = teacher.bias.detach() if teacher.bias is not None else None
    mm_dtypes = (
        matmul_dtype(student.hidden, student.weight),
        matmul_dtype(t_hidden, t_weight) if t_hidden is not None else None,
    )
    # The logits' dtypes are fixed above (autocast's, if it is on); inside, every op runs in
    # the dtypes chosen here.
    with torch.autocast(student.hidden.device.type, enabled=False):
        result = _LinearDistillOverRows.apply(
            student.hidden, student.weight, s_bias, t_hidden, t_weight, t_bias,
            valid, targets, spec, vocab, needs, mm_dtypes, tp_group,
        )  # fmt: skip
    return PassOutput(*result)
