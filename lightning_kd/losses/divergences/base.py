"""The divergence interface: one chunk of logit rows in, per-row values and gradient out.

A :class:`Divergence` turns one chunk of student and teacher logit rows into a per-row value and,
on request, the gradient of that value with respect to the temperature-scaled student logits
``z = s / T``. It writes the gradient into a buffer it is handed and uses only the workspaces it
declares (``work``, plus ``extra_workspaces`` more of the same shape), which is what keeps the
chunked engine (:mod:`lightning_kd.losses.engine`) bounded in memory. Softmaxes and row sums go
through a vocabulary-softmax object (:mod:`lightning_kd.losses.vocab_softmax`), so the same code
serves a full vocabulary row and a tensor-parallel vocabulary shard. Each divergence lives in
its own small file beside this one and holds only its chunk math.

Conventions: ``P = softmax(t / T)`` (teacher), ``Q = softmax(s / T)`` (student); terms with
zero probability contribute nothing, so vocabulary entries that are ``-inf`` in both logits
(padded or masked vocabulary) are harmless. Values are not multiplied by ``T**2``; the engine
does that.

For a value ``D(Q)`` the gradient with respect to ``z`` is ``Q ⊙ (g − Σ_v Q_v g_v)`` with
``g = ∂D/∂Q``; each divergence's docstring gives its closed form.
"""

from __future__ import annotations

from torch import Tensor

from lightning_kd.checks import check_unit_interval
from lightning_kd.losses.vocab_softmax import VocabSoftmax


def row_sum_of_products(products: Tensor, weight: Tensor) -> Tensor:
    """Row sums of ``products = weight * x`` (computed in place by the caller), where an entry
    with ``weight == 0`` counts as 0 even if ``x`` was ``±inf`` or NaN (0·log 0 = 0). Any other
    NaN, e.g. from NaN or +inf logits, propagates. Rows that came out NaN are fixed in place and
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


def row_blocks(n: int, rows: int) -> list[slice]:
    """``[0, n)`` split into consecutive slices of at most ``rows`` (>= 1) rows."""
    return [slice(start, min(start + rows, n)) for start in range(0, n, max(rows, 1))]


def unit_interval(name: str, value: float) -> float:
    """``value`` as a float if it is a real number in [0, 1]; ``ValueError`` naming ``name``
    otherwise (also for bools and NaN)."""
    return check_unit_interval(name, value)


class Divergence:
    """Base class: one chunk of rows in, per-row values (and gradient) out.

    Subclasses set :attr:`name` (the string ``KDLoss(divergence=...)`` accepts), take their
    parameters as typed ``__init__`` arguments stored under the same attribute names (so they
    can be built from YAML and compare by value), and implement :meth:`chunk`.

    Chunk arguments:
        student: [n, V] student logit rows (any floating dtype; not modified).
        teacher: [n, V] teacher logit rows (any floating dtype; not modified).
        temperature: softmax temperature ``T``.
        vocab: the vocabulary-softmax object (local or tensor-parallel).
        work: [n, V] scratch buffer in the compute dtype.
        grad: [n, V] buffer in the compute dtype; on return it holds ``d value / d z`` with
            ``z = student / T`` when ``need_grad`` is True (else it is scratch).
        need_grad: whether the gradient is wanted.
        extra: ``extra_workspaces`` more [r, V] scratch buffers with ``1 <= r <= n`` rows;
            passed only when that is > 0. A divergence that needs them works through its rows
            ``r`` at a time (:func:`row_blocks`), so that, e.g., a mixture distribution never
            takes a buffer as large as the chunk.

    Returns:
        [n] per-row values in the compute dtype, already summed over vocabulary shards.
    """

    #: The name ``KDLoss(divergence=...)`` accepts for this divergence with default parameters.
    name: str = ""
    #: How many [r, V] scratch buffers :meth:`chunk` needs besides ``work`` and ``grad`` (``r``
    #: rows, at most the chunk's: the engine sizes them to a cache-sized block of rows).
    extra_workspaces: int = 0

    def chunk(
        self,
        student: Tensor,
        teacher: Tensor,
        temperature: float,
        vocab: VocabSoftmax,
        work: Tensor,
        grad: Tensor,
        need_grad: bool,
        extra: tuple[Tensor, ...] = (),
    ) -> Tensor:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """A short human-readable name for logs and plots, e.g. ``"JSD(β=0.5)"`` (default:
        the repr)."""
        return repr(self)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))
