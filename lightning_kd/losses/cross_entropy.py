"""Hard-label cross-entropy summed over valid tokens, also on vocabulary-sharded logits.

``KDLoss`` computes the cross-entropy term of the loss (``kd_ratio < 1``) in its own chunked
pass (and ``DistillationModule`` uses that pass for its validation perplexities too); this
function is the stand-alone form, e.g. for ``CausalLMModule``'s label-only training. On plain
logits it is ``F.cross_entropy``. On vocab-sharded logits (DTensor ``Shard(-1)``, or local
shards with a group) it is computed here from the local shard, like KDLoss: the global
log-normaliser from :class:`~lightning_kd.losses.vocab_parallel.VocabParallelSoftmax`, the
label's logit from the rank that owns it (an all-reduce of per-token values), and an analytic
backward ``softmax(s) − onehot(label)`` on the local shard with no communication.
``loss_parallel()`` is not used: its backward must run inside the context, which Lightning's
training loop does not do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_kd.losses.vocab_parallel import VocabParallelSoftmax, resolve_vocab_parallel


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, vocab: VocabParallelSoftmax) -> Tensor:
        # logits: [n, V_local] valid rows only; labels: [n] global vocabulary ids.
        offset, _ = vocab.vocab_range(logits.shape[-1], logits.device)
        work = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        log_probs = vocab.log_softmax(logits, 1.0, out=work)
        local = labels - offset
        owned = (local >= 0) & (local < logits.shape[-1])
        picked = log_probs.gather(1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(1)).squeeze(1)
        target_log_prob = vocab.all_sum(torch.where(owned, picked, 0.0))
        ctx.save_for_backward(log_probs, local, owned)
        ctx.logits_dtype = logits.dtype
        return -target_log_prob.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        log_probs, local, owned = ctx.saved_tensors
        grad = log_probs.exp()  # softmax on the local shard
        rows = owned.nonzero().squeeze(1)
        grad[rows, local[rows]] -= 1.0
        return grad.mul_(grad_out).to(ctx.logits_dtype), None, None


def token_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, tp_group=None
) -> Tensor:
    """Sum over tokens with ``labels != ignore_index`` of ``−log softmax(logits)[label]``.

    Args:
        logits: [*, V] plain logits, a DTensor (vocab-sharded or not), or a local vocab shard
            when ``tp_group`` is given.
        labels: [*] integer labels (plain or replicated DTensor).
        ignore_index: label value to skip.
        tp_group: the vocabulary's process group for plain local shards.

    Returns:
        A plain fp32 0-dim tensor (the same on every tensor-parallel rank), differentiable
        with respect to ``logits``.
    """
    logits, _, labels, vocab = resolve_vocab_parallel(logits, logits, labels, tp_group)
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).to(flat.device)
    if not isinstance(vocab, VocabParallelSoftmax):
        return F.cross_entropy(
            flat.float(), flat_labels, ignore_index=ignore_index, reduction="sum"
        )
    rows = (flat_labels != ignore_index).nonzero().squeeze(1)
    return _VocabParallelCrossEntropy.apply(flat.index_select(0, rows), flat_labels[rows], vocab)
