"""The chunked engine: a divergence (and the hard-label CE) over selected rows, bounded in memory.

:func:`distill_over_rows` runs a :class:`~lightning_kd.losses.divergences.Divergence` over
the rows (tokens) marked in a ``valid`` mask, in windows of at most ``chunk_size`` rows,
inside one custom ``torch.autograd.Function``; when asked, the student's hard-label
cross-entropy (temperature 1) is computed in the same window from the same student rows, and
``loss = kd_ratio · T² · divergence + (1 − kd_ratio) · CE`` (summed, over the normaliser). The
forward pass writes the analytic gradient of each chunk straight into one gradient buffer
shaped like the student logits, so nothing of a chunk survives the chunk: peak memory is the
gradient itself plus one ``[chunk, V]`` workspace in the compute dtype (the cross-entropy
reuses it); the divergences that need more (the mixture of JSD and the skew divergences) get
cache-sized ``[r, V]`` blocks of rows for them (:data:`BLOCK_ELEMENTS`). The backward pass
only scales that buffer by the incoming gradient. ``chunk_size=0`` runs all rows as one chunk
(the fastest path, same math).

A window is read as a view of the logits when they are 2-D viewable and the window's valid rows
are dense (the few ignored rows inside are computed and discarded, which is cheaper than a
copy); otherwise its valid rows are gathered, one window at a time, so non-contiguous inputs
such as ``logits[:, :-1]`` are never copied whole.
"""

from __future__ import annotations

import math
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


# With kd_ratio < 1 the buffer holds dD/dz + f · (CE gradient), f = (1 − kd) / (kd T); past
# this f, it holds (dD/dz) / f + (CE gradient) instead (one more pass; no overflow in fp16).
_MAX_CE_FACTOR = 64.0

# A window whose valid rows fill at least this share of their span is processed as a view
# (ignored rows computed and then discarded); sparser windows gather their valid rows instead.
_MIN_DENSITY = 0.75


#: Rows of the divergences' extra workspaces (a mixture distribution, a ratio): about this many
#: elements each, 4 MiB in fp32, so that they stay cache-sized instead of chunk-sized.
BLOCK_ELEMENTS = 1 << 19


def block_rows(width: int, limit: int, elements: int | None = None) -> int:
    """Rows of ``width`` columns that fit in ``elements`` (default :data:`BLOCK_ELEMENTS`),
    between 1 and ``limit``."""
    budget = BLOCK_ELEMENTS if elements is None else elements
    return max(1, min(limit, budget // max(width, 1)))


def workspaces(
    divergence: Divergence | None, rows: int, width: int, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """The scratch buffers :func:`chunk_math` takes for chunks of at most ``rows`` rows: one
    ``[rows, width]`` and the divergence's ``extra_workspaces`` of :func:`block_rows` rows."""
    extra = divergence.extra_workspaces if divergence is not None else 0
    small = block_rows(width, rows)
    return [torch.empty((rows, width), dtype=dtype, device=device)] + [
        torch.empty((small, width), dtype=dtype, device=device) for _ in range(extra)
    ]


def chunk_views(bufs: list[Tensor], m: int) -> list[Tensor]:
    """:func:`workspaces` cut to a chunk of ``m`` rows."""
    return [b[:m] for b in bufs]


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


class PassSpec(NamedTuple):
    """What one pass computes, besides the tensors.

    Attributes:
        divergence: the per-chunk math, or None for the cross-entropy alone.
        temperature: softmax temperature ``T`` of the divergence (> 0); CE uses 1.
        normaliser: the denominator (number of valid tokens, or ``num_batch_labels``).
        chunk_size: rows per chunk; 0 processes all rows at once.
        compute_dtype: dtype of the softmaxes and buffers (fp32 for upcast).
        kd_ratio: weight of the divergence in the loss; ``1 − kd_ratio`` weighs the CE.
        with_ce: compute the per-token cross-entropy (needs ``targets``).
        label_offset: vocabulary id of the first local column (tensor-parallel shards).
        vocab_size: size of the whole vocabulary; CE of a label outside it is NaN.
    """

    divergence: Divergence | None
    temperature: float
    normaliser: float
    chunk_size: int
    compute_dtype: torch.dtype
    kd_ratio: float = 1.0
    with_ce: bool = False
    label_offset: int = 0
    vocab_size: int = 0


class PassOutput(NamedTuple):
    """What :func:`distill_over_rows` returns.

    Attributes:
        loss: 0-dim, ``(kd_ratio · T² Σ div + (1 − kd_ratio) Σ ce) / normaliser`` in the
            compute dtype, connected to the student.
        per_token_div: [n] detached ``T² · divergence`` of the valid rows in row order (empty
            when the divergence was not computed).
        per_token_ce: [n] detached cross-entropy of the valid rows (empty when not computed).
        div_loss: 0-dim detached ``T² Σ div / normaliser``.
        ce_loss: 0-dim detached ``Σ ce / normaliser``.
    """

    loss: Tensor
    per_token_div: Tensor
    per_token_ce: Tensor
    div_loss: Tensor
    ce_loss: Tensor


def _cross_entropy_rows(
    student: Tensor,
    labels: Tensor,
    vocab: VocabSoftmax,
    buf: Tensor,
    spec: PassSpec,
    grad: Tensor | None,
    factor: float,
    accumulate: bool,
) -> Tensor:
    """``−log softmax(student)[label]`` per row (temperature 1), [m], all collectives O(m).

    With ``grad``, adds ``factor · (softmax(student) − onehot(label))`` to it (``accumulate``)
    or writes ``softmax − onehot`` (``factor`` 1) into it. ``buf`` [m, V_local] is scratch."""
    local_size = student.shape[-1]
    log_probs = vocab.log_softmax(student, 1.0, out=buf)
    local = labels - spec.label_offset
    owned = (local >= 0) & (local < local_size)
    index = local.clamp(0, local_size - 1).unsqueeze(1)
    picked = torch.where(owned, log_probs.gather(1, index).squeeze(1), 0.0)
    ce = vocab.all_sum(picked).neg_()
    in_range = (labels >= 0) & (labels < spec.vocab_size)
    ce = torch.where(in_range, ce, math.nan)
    if grad is not None:
        if accumulate:
            grad.add_(log_probs.exp_(), alpha=factor)
        else:
            torch.exp(log_probs, out=grad)
        rows = owned.nonzero().squeeze(1)
        hit = torch.full(rows.shape, -factor, dtype=grad.dtype, device=grad.device)
        grad.index_put_((rows, local[rows]), hit, accumulate=True)
    return ce


class GradMix(NamedTuple):
    """How one chunk's gradient buffer mixes the divergence and the CE gradients.

    Who writes the gradient: the divergence (kd_ratio > 0), then the CE adds its share scaled
    relative to it (kd_ratio < 1); or the CE alone (kd_ratio == 0). The buffer holds
    d(loss)/d(student logits) up to the one factor ``grad_scale`` applied at the end, and stays
    O(1) in magnitude (fp16 range) whatever the mix.

    Attributes:
        div_grad: the divergence writes its gradient ``dD/dz`` (times ``div_factor``).
        ce_grad: the CE adds ``ce_factor · (softmax − onehot)`` (or writes it, without
            ``div_grad``).
        div_factor: scale of the divergence's gradient in the buffer.
        ce_factor: scale of the CE gradient in the buffer.
        grad_scale: d(loss)/d(logits) = ``grad_scale`` · buffer.
    """

    div_grad: bool
    ce_grad: bool
    div_factor: float
    ce_factor: float
    grad_scale: float

    @classmethod
    def of(cls, spec: PassSpec, need_grad: bool) -> GradMix:
        kd, temperature = spec.kd_ratio, spec.temperature
        div_grad = need_grad and spec.divergence is not None and kd > 0
        ce_grad = need_grad and spec.with_ce and kd < 1
        div_factor = 1.0
        if div_grad:
            ce_factor = (1.0 - kd) / (kd * temperature)
            grad_scale = kd * temperature / spec.normaliser  # d(T² D)/ds = T dD/dz
            if ce_factor > _MAX_CE_FACTOR:  # CE dominates: keep the buffer O(1) (fp16 range)
                div_factor, ce_factor = 1.0 / ce_factor, 1.0
                grad_scale = (1.0 - kd) / spec.normaliser
        else:
            ce_factor, grad_scale = 1.0, 1.0 / spec.normaliser
        return cls(div_grad, ce_grad, div_factor, ce_factor, grad_scale)


def chunk_math(
    student: Tensor,
    teacher: Tensor | None,
    targets: Tensor | None,
    vocab: VocabSoftmax,
    spec: PassSpec,
    mix: GradMix,
    bufs: list[Tensor],
    out: Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    """One chunk of rows: the divergence and/or the CE values, and the mixed gradient in ``out``.

    Args:
        student: [m, V_local] student logit rows (not modified).
        teacher: [m, V_local] teacher logit rows (not modified); unused without a divergence.
        targets: [m] labels of the rows (needed when ``spec.with_ce``).
        vocab: the vocabulary-softmax object.
        spec: what to compute.
        mix: the gradient mix (see :class:`GradMix`).
        bufs: scratch buffers in the compute dtype: one [m, V_local], then
            ``divergence.extra_workspaces`` of [r, V_local] with ``1 <= r <= m`` (see
            :func:`workspaces`).
        out: [m, V_local] buffer in the compute dtype; holds the gradient buffer on return when
            ``mix.div_grad or mix.ce_grad`` (else scratch).

    Returns:
        ``(values, ce)``: the [m] divergence values (None when not computed) and the [m] CE
        (None when not computed).
    """
    values = ce = None
    if spec.divergence is not None:
        extra = {"extra": tuple(bufs[1:])} if len(bufs) > 1 else {}
        values = spec.divergence.chunk(
            student, teacher, spec.temperature, vocab, bufs[0], out, mix.div_grad, **extra
        )
        if mix.div_grad and mix.div_factor != 1.0:
            out.mul_(mix.div_factor)
    if spec.with_ce:
        ce = _cross_entropy_rows(
            student, targets, vocab, bufs[0], spec, out if mix.ce_grad else None,
            mix.ce_factor, accumulate=mix.div_grad,
        )  # fmt: skip
    return values, ce


def reduce_terms(per_div: Tensor, per_ce: Tensor, spec: PassSpec) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, div_loss, ce_loss)`` from the per-row values (summed in fp64, returned in the
    compute dtype); multiplies ``per_div`` by ``T²`` in place."""
    t2, norm, kd = spec.temperature * spec.temperature, spec.normaliser, spec.kd_ratio
    dtype = spec.compute_dtype
    div_sum = per_div.sum(dtype=torch.float64)
    ce_sum = per_ce.sum(dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=per_div.device)
    if spec.divergence is not None and kd > 0:
        total = div_sum.mul(kd * t2 / norm)
    if spec.with_ce and kd < 1:
        total = total + ce_sum.mul((1.0 - kd) / norm)
    loss = total.to(dtype)
    div_loss = div_sum.mul(t2 / norm).to(dtype)
    ce_loss = ce_sum.div(norm).to(dtype)
    per_div.mul_(t2)
    return loss, div_loss, ce_loss


class _DistillOverRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        valid: Tensor,
        targets: Tensor | None,
        spec: PassSpec,
        vocab: VocabSoftmax,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        device, vsize = student.device, student.shape[-1]
        divergence, dtype = spec.divergence, spec.compute_dtype
        student2d, teacher2d = _as_rows(student), _as_rows(teacher)
        valid_cpu = valid.reshape(-1).cpu()
        windows = _plan_windows(valid_cpu, spec.chunk_size)
        viewable = student2d is not None and teacher2d is not None
        n = int(valid_cpu.sum())
        per_div = torch.empty(n if divergence is not None else 0, dtype=dtype, device=device)
        per_ce = torch.empty(n if spec.with_ce else 0, dtype=dtype, device=device)

        mix = GradMix.of(spec, need_grad)

        grad = grad2d = None
        if need_grad:
            grad = torch.empty(student.shape, dtype=student.dtype, device=device)
            grad2d = grad.view(-1, vsize)
            covered = torch.zeros_like(valid_cpu)
        widest = max((w.stop - w.start for w in windows), default=0)
        work = workspaces(divergence, widest, vsize, dtype, device)
        # The gradient is written in place into its own buffer for dense windows of viewable
        # logits in the compute dtype; everything else goes through a scratch buffer.
        slot_ok = grad is not None and grad.dtype == dtype and viewable
        needs_scratch = not slot_ok or not all(w.dense for w in windows)
        scratch = torch.empty_like(work[0]) if needs_scratch else None

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
            bufs = chunk_views(work, m)
            row_targets = targets[rows] if spec.with_ce else None
            values, ce = chunk_math(s, t, row_targets, vocab, spec, mix, bufs, out)
            if window.dense and not bool(window.valid.all()):
                keep = window.valid.to(device)
                values = values[keep] if values is not None else None
                ce = ce[keep] if ce is not None else None
                if need_grad:
                    out.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)
            count = int(window.valid.sum())
            if values is not None:
                per_div[offset : offset + count] = values
            if ce is not None:
                per_ce[offset : offset + count] = ce
            offset += count
            if need_grad:
                if window.dense:
                    covered[window.start : window.stop] = True
                    if not in_place:
                        grad2d[window.start : window.stop].copy_(out)
                else:
                    covered[window.start : window.stop] |= window.valid
                    grad2d.index_copy_(0, rows, out.to(grad2d.dtype))
            del s, t, out, bufs
        del work, scratch
        if need_grad and not bool(covered.all()):
            grad2d.index_fill_(0, (~covered).nonzero().squeeze(1).to(device), 0.0)

        loss, div_loss, ce_loss = reduce_terms(per_div, per_ce, spec)
        ctx.mark_non_differentiable(per_div, per_ce, div_loss, ce_loss)
        ctx.grad = grad
        ctx.grad_scale = mix.grad_scale
        return loss, per_div, per_ce, div_loss, ce_loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        grad, ctx.grad = ctx.grad, None  # drop ctx's reference so autograd can take the buffer
        if grad is None:
            raise RuntimeError(
                "KDLoss backward called but the forward ran without gradient tracking, or "
                "backward was called twice on the same loss."
            )
        # A Python float keeps the factor exact (a 0-dim tensor would be rounded to the grad's
        # dtype: bf16 bias, and fp16 overflow for GradScaler's 65536).
        grad.mul_(float(grad_loss) * ctx.grad_scale)
        return (grad,) + (None,) * 6


def distill_over_rows(
    student: Tensor,
    teacher: Tensor,
    valid: Tensor,
    vocab: VocabSoftmax,
    spec: PassSpec,
    targets: Tensor | None = None,
) -> PassOutput:
    """The divergence (and optionally the hard-label CE) over the valid rows, with an
    analytic, chunked backward.

    Args:
        student: [*, V] student logits (any strides); the only input that receives a gradient.
        teacher: [*, V] teacher logits, same shape; treated as a constant.
        valid: [*] bool, True for the rows (tokens) to include.
        vocab: the vocabulary-softmax object (local, or a tensor-parallel shard).
        spec: what to compute (see :class:`PassSpec`).
        targets: [N] integer labels of the flattened rows, on the logits' device; needed when
            ``spec.with_ce`` (only the valid rows' labels are read).

    Returns:
        A :class:`PassOutput`.
    """
    if spec.with_ce and targets is None:
        raise ValueError("targets are needed for the cross-entropy term.")
    if spec.divergence is None and not (spec.with_ce and spec.kd_ratio == 0.0):
        raise ValueError("without a divergence, only the cross-entropy with kd_ratio=0 is defined.")
    need_grad = student.requires_grad and torch.is_grad_enabled()
    spec = spec._replace(
        temperature=float(spec.temperature),
        normaliser=float(spec.normaliser),
        chunk_size=int(spec.chunk_size),
        kd_ratio=float(spec.kd_ratio),
    )
    return PassOutput(
        *_DistillOverRows.apply(student, teacher.detach(), valid, targets, spec, vocab, need_grad)
    )
