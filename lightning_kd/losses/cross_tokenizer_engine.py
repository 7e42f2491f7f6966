"""The chunked pass of the cross-tokenizer losses, bounded in memory, single process or TP.

:func:`cross_tokenizer_pass` walks the aligned spans in chunks of at most ``chunk_size`` rows
per side, inside one custom ``torch.autograd.Function``. For each chunk it fetches the rows its
spans touch, computes each span's value and the gradient of that value with respect to those
student rows, and writes the gradient into one buffer shaped like the student logits; nothing of
a chunk survives the chunk. Two kinds of span:

- *exact* (hybrid loss only): one row on both sides, predicting tokens with the same string. The
  chosen :class:`~lightning_kd.losses.divergences.Divergence` runs on the shared tokens' logits
  (both sides' softmaxes taken over the shared tokens only), exactly as ``KDLoss`` runs it; its
  value is ``T² · D``.
- *ULD*: every other span. ``uld_weight ·`` :func:`~lightning_kd.losses.uld.sorted_l1` of the
  span-merged vectors, differentiated by autograd on the chunk's rows alone.

Tensor parallel (vocabulary-sharded logits): ULD needs each row's whole distribution sorted, and
no per-shard sort composes into a global one without moving the values. Each chunk's rows are
therefore all-gathered over the TP group (``chunk × V`` per side and rank, ``(tp − 1) / tp`` of it
received), the chunk's math runs replicated on every rank, and each rank keeps its own
vocabulary slice of the gradient. Per rank this costs the gathered chunk (``chunk × V`` per side
instead of ``chunk × V / tp``) on top of the ``[N, V / tp]`` gradient; the values are the same
on every rank, so nothing else is reduced.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_kd.losses.divergences import Divergence
from lightning_kd.losses.token_spans import TokenSpans, span_rows
from lightning_kd.losses.uld import chained_log_factor, sorted_l1
from lightning_kd.losses.vocab_map import VocabMap
from lightning_kd.losses.vocab_softmax import LocalVocabSoftmax


class XTokSpec(NamedTuple):
    """What one pass computes besides the tensors.

    Attributes:
        divergence: the exact spans' divergence, or None (ULD everywhere).
        vocab_map: the shared tokens (needed with a divergence).
        temperature: softmax temperature ``T`` of both parts.
        uld_weight: weight of a ULD span's value.
        normaliser: the denominator of the loss.
        chunk_size: rows per side per chunk (0: all at once).
        compute_dtype: dtype of the math.
        group: the TP group the vocabulary is sharded over, or None.
    """

    divergence: Divergence | None
    vocab_map: VocabMap | None
    temperature: float
    uld_weight: float
    normaliser: float
    chunk_size: int
    compute_dtype: torch.dtype
    group: dist.ProcessGroup | None


class _Gatherer:
    """Rows of a (possibly vocabulary-sharded) [N, V_local] tensor as whole-vocabulary rows."""

    def __init__(self, x2d: Tensor, group: dist.ProcessGroup | None, dtype: torch.dtype) -> None:
        self.x2d, self.group, self.dtype = x2d, group, dtype
        local = x2d.shape[-1]
        if group is None:
            self.sizes, self.offset = [local], 0
        else:
            sizes = torch.zeros(dist.get_world_size(group), dtype=torch.int64)
            sizes[dist.get_rank(group)] = local
            dist.all_reduce(sizes, group=group)
            self.sizes = [int(s) for s in sizes]
            self.offset = sum(self.sizes[: dist.get_rank(group)])
        self.local = local

    @property
    def vocab_size(self) -> int:
        return sum(self.sizes)

    def rows(self, index: Tensor) -> Tensor:
        """[m, V] whole rows ``index`` in the compute dtype (one all-gather under TP)."""
        local = self.x2d.index_select(0, index).to(self.dtype)
        if self.group is None:
            return local
        # Uneven shards travel padded to the widest (gloo gathers equal sizes only).
        width = max(self.sizes)
        if local.shape[-1] < width:
            local = torch.nn.functional.pad(local, (0, width - local.shape[-1]))
        parts = [local.new_empty((local.shape[0], width)) for _ in self.sizes]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, self.sizes, strict=True)], dim=-1)

    def local_slice(self, full: Tensor) -> Tensor:
        return full[:, self.offset : self.offset + self.local]


def _plan_chunks(spans: TokenSpans, chunk_size: int) -> list[tuple[int, int]]:
    """``[k0, k1)`` span ranges with at most ``chunk_size`` rows per side (at least one span)."""
    k = spans.num_spans
    if chunk_size <= 0 or k == 0:
        return [(0, k)] if k else []
    s_cum = torch.cumsum(spans.student_len.cpu(), 0).tolist()
    t_cum = torch.cumsum(spans.teacher_len.cpu(), 0).tolist()
    chunks, k0, s_base, t_base = [], 0, 0, 0
    for i in range(k):
        if i > k0 and (s_cum[i] - s_base > chunk_size or t_cum[i] - t_base > chunk_size):
            chunks.append((k0, i))
            k0, s_base, t_base = i, s_cum[i - 1], t_cum[i - 1]
    chunks.append((k0, k))
    return chunks


def exact_spans(
    spans: TokenSpans, student_labels: Tensor, teacher_labels: Tensor, vocab_map: VocabMap | None
) -> Tensor:
    """[K] bool: one row on both sides, and the predicted tokens have the same string."""
    if vocab_map is None:
        return torch.zeros(spans.num_spans, dtype=torch.bool, device=spans.student_start.device)
    _, _, t2s = vocab_map.on(student_labels.device)
    single = (spans.student_len == 1) & (spans.teacher_len == 1)
    s_tok = student_labels[spans.student_start]
    t_tok = teacher_labels[spans.teacher_start]
    return single & (t2s[t_tok] == s_tok)


def _exact_chunk(
    spec: XTokSpec, s_rows: Tensor, t_rows: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """``T² · D`` over the shared tokens per row and its gradient w.r.t. the whole student rows."""
    vm = spec.vocab_map
    s_ids, t_ids, _ = vm.on(s_rows.device)
    s_shared = s_rows if vm.is_identity else s_rows.index_select(1, s_ids)
    t_shared = t_rows if vm.is_identity else t_rows.index_select(1, t_ids)
    div = spec.divergence
    bufs = [torch.empty_like(s_shared) for _ in range(1 + div.extra_workspaces)]
    grad = torch.empty_like(s_shared)
    extra = {"extra": tuple(bufs[1:])} if len(bufs) > 1 else {}
    t = spec.temperature
    values = div.chunk(
        s_shared, t_shared, t, LocalVocabSoftmax(), bufs[0], grad, need_grad, **extra
    )
    if not need_grad:
        return values * (t * t), None
    grad.mul_(t)  # d(T² D)/ds = T · dD/dz
    if vm.is_identity:
        return values * (t * t), grad
    full = torch.zeros_like(s_rows)
    full.index_copy_(1, s_ids, grad)
    return values * (t * t), full


def _uld_chunk(
    spec: XTokSpec,
    student: _Gatherer,
    teacher: _Gatherer,
    spans: TokenSpans,
    s_labels: Tensor,
    t_labels: Tensor,
    need_grad: bool,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """ULD values of the spans and ``(rows, gradient rows)`` of the student rows they touch."""
    k, t = spans.num_spans, spec.temperature
    s_chain, s_owner = span_rows(spans.student_start, spans.student_len)
    t_chain, t_owner = span_rows(spans.teacher_start, spans.teacher_len)
    with torch.no_grad():
        t_first = teacher.rows(spans.teacher_start)
        t_factor = chained_log_factor(teacher.rows(t_chain), t_labels[t_chain], t_owner, k, t)
    with torch.set_grad_enabled(need_grad):
        s_first = student.rows(spans.student_start).detach().requires_grad_(need_grad)
        s_chain_rows = student.rows(s_chain).detach().requires_grad_(need_grad)
        s_factor = chained_log_factor(s_chain_rows, s_labels[s_chain], s_owner, k, t)
        values = sorted_l1(s_first, s_factor, t_first, t_factor, t) * spec.uld_weight
        total = values.sum()
    if not need_grad:
        return values, []
    g_first, g_chain = torch.autograd.grad(
        total, [s_first, s_chain_rows], allow_unused=True, materialize_grads=True
    )
    return values.detach(), [(spans.student_start, g_first), (s_chain, g_chain)]


def _select(spans: TokenSpans, mask: Tensor) -> TokenSpans:
    return TokenSpans(*(f[mask] for f in spans))


class _CrossTokenizerPass(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        s_labels: Tensor,
        t_labels: Tensor,
        spans: TokenSpans,
        exact: Tensor,
        spec: XTokSpec,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        dtype, device = spec.compute_dtype, student.device
        s2d, t2d = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        s_gather = _Gatherer(s2d, spec.group, dtype)
        t_gather = _Gatherer(t2d, spec.group, dtype)
        grad = torch.zeros(s2d.shape, dtype=student.dtype, device=device) if need_grad else None
        per_span = torch.zeros(spans.num_spans, dtype=dtype, device=device)
        for k0, k1 in _plan_chunks(spans, spec.chunk_size):
            chunk = TokenSpans(*(f[k0:k1] for f in spans))
            ex = exact[k0:k1]
            if bool(ex.any()):
                rows = chunk.student_start[ex]
                values, g = _exact_chunk(
                    spec, s_gather.rows(rows), t_gather.rows(chunk.teacher_start[ex]), need_grad
                )
                per_span[k0:k1][ex] = values
                if g is not None:
                    grad.index_copy_(0, rows, s_gather.local_slice(g).to(grad.dtype))
                del g
            if not bool(ex.all()):
                rest = _select(chunk, ~ex)
                values, grads = _uld_chunk(
                    spec, s_gather, t_gather, rest, s_labels, t_labels, need_grad
                )
                per_span[k0:k1][~ex] = values
                for rows, g in grads:
                    if rows.numel():
                        grad.index_copy_(0, rows, s_gather.local_slice(g).to(grad.dtype))
                del grads
        loss = per_span.sum(dtype=torch.float64).div(spec.normaliser).to(dtype)
        ctx.mark_non_differentiable(per_span)
        ctx.grad = grad
        ctx.scale = 1.0 / spec.normaliser
        ctx.shape = student.shape
        return loss, per_span

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "the cross-tokenizer loss's backward was called but its forward ran without "
                "gradient tracking, or backward was called twice on the same loss."
            )
        grad.mul_(float(grad_loss) * ctx.scale)
        return (grad.view(ctx.shape),) + (None,) * 7


def cross_tokenizer_pass(
    student: Tensor,
    teacher: Tensor,
    student_labels: Tensor,
    teacher_labels: Tensor,
    spans: TokenSpans,
    exact: Tensor,
    spec: XTokSpec,
) -> tuple[Tensor, Tensor]:
    """``(loss, per_span)``: ``Σ span values / normaliser`` (connected to ``student``) and the
    detached [K] values.

    Args:
        student: [*, V_s(/tp)] student logits (a local vocabulary shard under TP).
        teacher: [*, V_t(/tp)] teacher logits; constant.
        student_labels: [N_s] flattened tokens the student rows predict.
        teacher_labels: [N_t] the teacher's.
        spans: the aligned spans (rows of the flattened logits).
        exact: [K] bool, the spans computed with the exact divergence.
        spec: what to compute.
    """
    need_grad = student.requires_grad and torch.is_grad_enabled()
    loss, per_span = _CrossTokenizerPass.apply(
        student, teacher.detach(), student_labels, teacher_labels, spans, exact, spec, need_grad
    )
    return loss, per_span
