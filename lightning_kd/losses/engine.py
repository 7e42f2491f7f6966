"""The chunked engine: a divergence over selected rows of ``[*, V]`` logits, bounded in memory.

:func:`divergence_over_rows` runs a :class:`~lightning_kd.losses.divergences.Divergence` over
the rows (tokens) marked in a ``valid`` mask, in windows of at most ``chunk_size`` rows,
inside one custom ``torch.autograd.Function``. The forward pass writes the analytic gradient of
each chunk straight into one gradient buffer shaped like the student logits, so nothing of a
chunk survives the chunk: peak memory is the gradient itself plus one or two ``[chunk, V]``
buffers in the compute dtype. The backward pass only scales that buffer by the incoming
gradient. ``chunk_size=0`` runs all rows as one chunk (the fastest path, same math).

A window is read as a view of the logits when they are 2-D viewable and the window's valid rows
are dense (the few ignored rows inside are computed and discarded, which is cheaper than a
copy); otherwise its valid rows are gathered, one window at a time, so non-contiguous inputs
such as ``logits[:, :-1]`` are never copied whole.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_kd.losses.divergences import Divergence
from lightning_kd.losses.vocab_softmax import VocabSoftmax


def _as_rows(x: Tensor) -> Tensor | None:
    """``x`` viewed as [N, V] without a copy, or None if its strides do not allow it."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


# A window whose valid rows fill at least this share of their span is processed as a view
# (ignored rows computed and then discarded); sparser windows gather their valid rows instead.
_MIN_DENSITY = 0.75


class _Window(NamedTuple):
    """Rows ``[start, stop)`` of the flattened leading dims, processed as one chunk."""

    start: int
    stop: int
    valid: Tensor  # [stop - start] bool, on CPU
    dense: bool  # process every row of the span (ignored ones discarded) vs only valid rows


def _plan_windows(valid: Tensor, chunk_size: int) -> list[_Window]:
    """Split the row space into windows of at most ``chunk_size`` rows that hold valid rows.

    Each window is trimmed to its first..last valid row. A dense window processes its whole
    span, a sparse one only its valid rows. The plan depends on ``valid`` alone, never on memory
    layout, so every tensor-parallel rank issues the same collectives with the same sizes.
    """
    total = valid.numel()
    step = chunk_size or max(total, 1)
    windows = []
    for begin in range(0, total, step):
        hits = valid[begin : begin + step].nonzero().squeeze(1)
        if hits.numel() == 0:
            continue
        start, stop = begin + int(hits[0]), begin + int(hits[-1]) + 1
        dense = hits.numel() >= _MIN_DENSITY * (stop - start)
        windows.append(_Window(start, stop, valid[start:stop], dense))
    return windows


def _take(x: Tensor, x2d: Tensor | None, window: _Window, rows: Tensor) -> Tensor:
    """Rows ``rows`` of ``x`` as [m, V]: a view when they are a dense span of a 2-D-viewable
    tensor, else a gathered copy."""
    if window.dense and x2d is not None:
        return x2d[window.start : window.stop]
    if x2d is not None:
        return x2d.index_select(0, rows)
    return x[torch.unravel_index(rows, x.shape[:-1])]


class _DivergenceOverRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        valid: Tensor,
        divergence: Divergence,
        vocab: VocabSoftmax,
        temperature: float,
        normaliser: float,
        chunk_size: int,
        compute_dtype: torch.dtype,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        device, vsize = student.device, student.shape[-1]
        student2d, teacher2d = _as_rows(student), _as_rows(teacher)
        valid_cpu = valid.reshape(-1).cpu()
        windows = _plan_windows(valid_cpu, chunk_size)
        viewable = student2d is not None and teacher2d is not None
        n = int(valid_cpu.sum())
        per_token = torch.empty(n, dtype=compute_dtype, device=device)

        grad = grad2d = None
        if need_grad:
            grad = torch.empty(student.shape, dtype=student.dtype, device=device)
            grad2d = grad.view(-1, vsize)
            covered = torch.zeros_like(valid_cpu)
        widest = max((w.stop - w.start for w in windows), default=0)
        work = torch.empty((widest, vsize), dtype=compute_dtype, device=device)
        # The gradient is written in place into its own buffer for dense windows of viewable
        # logits in the compute dtype; everything else goes through a scratch buffer.
        slot_ok = grad is not None and grad.dtype == compute_dtype and viewable
        needs_scratch = not slot_ok or not all(w.dense for w in windows)
        scratch = torch.empty_like(work) if needs_scratch else None

        offset = 0
        for window in windows:
            if window.dense:
                rows = torch.arange(window.start, window.stop, device=device)
            else:
                rows = (window.valid.nonzero().squeeze(1) + window.start).to(device)
            s = _take(student, student2d, window, rows)
            t = _take(teacher, teacher2d, window, rows)
            m = s.shape[0]
            in_place = slot_ok and window.dense
            out = grad2d[window.start : window.stop] if in_place else scratch[:m]
            values = divergence.chunk(s, t, temperature, vocab, work[:m], out, need_grad)
            if window.dense and not bool(window.valid.all()):
                keep = window.valid.to(device)
                values = values[keep]
                if need_grad:
                    out.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)
            per_token[offset : offset + values.numel()] = values
            offset += values.numel()
            if need_grad:
                if window.dense:
                    covered[window.start : window.stop] = True
                    if not in_place:
                        grad2d[window.start : window.stop].copy_(out)
                else:
                    covered[window.start : window.stop] |= window.valid
                    grad2d.index_copy_(0, rows, out.to(grad2d.dtype))
            del s, t, out
        del work, scratch
        if need_grad and not bool(covered.all()):
            grad2d.index_fill_(0, (~covered).nonzero().squeeze(1).to(device), 0.0)

        t2 = temperature * temperature
        loss = per_token.sum(dtype=torch.float64).mul(t2 / normaliser).to(compute_dtype)
        per_token.mul_(t2)
        ctx.mark_non_differentiable(per_token)
        ctx.grad = grad
        ctx.grad_scale = temperature / normaliser  # d(T² KL)/ds = T (Q − P) / normaliser
        return loss, per_token

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, _grad_per_token: Tensor) -> tuple[Tensor | None, ...]:
        grad, ctx.grad = ctx.grad, None  # drop ctx's reference so autograd can take the buffer
        if grad is None:
            raise RuntimeError(
                "KDLoss backward called but the forward ran without gradient tracking, or "
                "backward was called twice on the same loss."
            )
        # A Python float keeps the factor exact (a 0-dim tensor would be rounded to the grad's
        # dtype: bf16 bias, and fp16 overflow for GradScaler's 65536).
        grad.mul_(float(grad_loss) * ctx.grad_scale)
        return (grad,) + (None,) * 9


def divergence_over_rows(
    student: Tensor,
    teacher: Tensor,
    valid: Tensor,
    divergence: Divergence,
    vocab: VocabSoftmax,
    *,
    temperature: float,
    normaliser: float,
    chunk_size: int,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``T² · Σ_rows divergence / normaliser`` with an analytic, chunked backward.

    Args:
        student: [*, V] student logits (any strides); the only input that receives a gradient.
        teacher: [*, V] teacher logits, same shape; treated as a constant.
        valid: [*] bool, True for the rows (tokens) to include.
        divergence: the per-chunk math (e.g. :class:`~lightning_kd.losses.divergences.ForwardKL`).
        vocab: the vocabulary-softmax object (local, or a tensor-parallel shard).
        temperature: softmax temperature ``T`` (> 0).
        normaliser: the denominator (number of valid tokens, or ``num_batch_labels``).
        chunk_size: rows per chunk; 0 processes all rows at once.
        compute_dtype: dtype of the softmaxes and buffers (fp32 for upcast).

    Returns:
        ``(loss, per_token)``: a 0-dim tensor in ``compute_dtype`` connected to ``student``, and
        the detached [n] values of the valid rows in row order, multiplied by ``T²`` (same units
        as the loss).
    """
    need_grad = student.requires_grad and torch.is_grad_enabled()
    return _DivergenceOverRows.apply(
        student,
        teacher.detach(),
        valid,
        divergence,
        vocab,
        float(temperature),
        float(normaliser),
        int(chunk_size),
        compute_dtype,
        need_grad,
    )
