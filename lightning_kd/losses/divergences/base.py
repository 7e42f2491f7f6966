"""The divergence interface: one chunk of logit rows in, per-row values and gradient out.

A :class:`Divergence` turns one chunk of student and teacher logit rows into a per-row value and,
on request, the gradient of that value with respect to the temperature-scaled student logits
``z = s / T``. It writes the gradient into a buffer it is handed and uses at most one extra
workspace of the same shape, which is what keeps the chunked engine
(:mod:`lightning_kd.losses.engine`) bounded in memory. Softmaxes and row sums go through a
vocabulary-softmax object (:mod:`lightning_kd.losses.vocab_softmax`), so the same code serves a
full vocabulary row and a tensor-parallel vocabulary shard. Each divergence lives in its own
small file beside this one and holds only its chunk math.

Conventions: ``P = softmax(t / T)`` (teacher), ``Q = softmax(s / T)`` (student); terms with
zero probability contribute nothing, so vocabulary entries that are ``-inf`` in both logits
(padded or masked vocabulary) are harmless. Values are not multiplied by ``T**2``; the engine
does that.
"""

from __future__ import annotations

from torch import Tensor

from lightning_kd.losses.vocab_softmax import VocabSoftmax


def row_sum_of_products(products: Tensor, weight: Tensor) -> Tensor:
    """Row sums of ``products = weight * x`` (computed in place by the caller), where an entry
    with ``weight == 0`` counts as 0 even if ``x`` was ``±inf`` (0·log 0 = 0). Any other NaN,
    e.g. from NaN or +inf logits, propagates. Rows that came out NaN are fixed in place and
    summed again; finite inputs pay nothing extra. ``products``, ``weight``: [n, V]; returns
    [n]."""
    out = products.sum(-1)
    bad = out.isnan()
    if bad.any():
        idx = bad.nonzero().squeeze(1)
        fixed = products.index_select(0, idx)
        fixed.masked_fill_(weight.index_select(0, idx) == 0, 0.0)
        products.index_copy_(0, idx, fixed)
        out[idx] = fixed.sum(-1)
    return out


class Divergence:
    """Base class: one chunk of rows in, per-row values (and gradient) out.

    Subclasses implement :meth:`chunk`. Chunk arguments:
        student: [n, V] student logit rows (any floating dtype; not modified).
        teacher: [n, V] teacher logit rows (any floating dtype; not modified).
        temperature: softmax temperature ``T``.
        vocab: the vocabulary-softmax object (local or tensor-parallel).
        work: [n, V] scratch buffer in the compute dtype.
        grad: [n, V] buffer in the compute dtype; on return it holds ``d value / d z`` with
            ``z = student / T`` when ``need_grad`` is True (else it is scratch).
        need_grad: whether the gradient is wanted.

    Returns:
        [n] per-row values in the compute dtype, already summed over vocabulary shards.
    """

    def chunk(
        self,
        student: Tensor,
        teacher: Tensor,
        temperature: float,
        vocab: VocabSoftmax,
        work: Tensor,
        grad: Tensor,
        need_grad: bool,
    ) -> Tensor:
        raise NotImplementedError
