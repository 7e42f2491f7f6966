"""Distillation losses in plain PyTorch (this package imports nothing from Lightning).

- :class:`KDLoss`: the public loss module (input checks, valid-token selection, dispatch).
- :class:`KDOptions`: the options the three losses share, one frozen value (``loss.options``);
  ``OtherLoss.from_options(loss, **changes)`` derives one loss from another's.
- :class:`LinearKDLoss`: ``KDLoss`` with the lm_heads fused in (hidden states and head weights
  in, no ``[N, V]`` logits; :mod:`~lightning_kd.losses.linear_engine` is its chunked pass).
- :class:`TopKKDLoss`: ``KDLoss`` against a teacher's top-k distribution plus a tail bucket,
  every divergence on the (k+1) buckets (teacher caches, served teachers;
  :mod:`~lightning_kd.losses.topk_buckets` is its math).
- :mod:`~lightning_kd.losses.engine`: the chunked, memory-bounded pass with analytic backward
  (the divergence and the hard-label cross-entropy term in one pass).
- :mod:`~lightning_kd.losses.divergences`: one file per divergence, only its chunk math:
  :class:`ForwardKL`, :class:`ReverseKL`, :class:`JSD`, :class:`TVD`, :class:`SkewKL`,
  :class:`SkewReverseKL`.
- :mod:`~lightning_kd.losses.vocab_softmax` / :mod:`~lightning_kd.losses.vocab_parallel`:
  softmax over a whole vocabulary row, or over one rank's vocabulary shard (tensor parallel).
- :mod:`~lightning_kd.losses.cross_entropy`: hard-label cross-entropy, also vocab-parallel.
- :class:`ULDLoss` / :class:`HybridKDLoss`: a teacher and a student with different tokenizers,
  on aligned spans (:class:`TokenSpans`, :class:`VocabMap`; the chunked, TP-aware pass is
  :mod:`~lightning_kd.losses.cross_tokenizer_engine`, its math :mod:`~lightning_kd.losses.uld`).
"""

from lightning_kd.losses.cross_entropy import token_cross_entropy
from lightning_kd.losses.cross_tokenizer_loss import (
    CrossTokenizerLoss,
    CrossTokenizerOutput,
    HybridKDLoss,
    ULDLoss,
)
from lightning_kd.losses.divergences import (
    DIVERGENCES,
    JSD,
    TVD,
    Divergence,
    ForwardKL,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    resolve_divergence,
)
from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.losses.linear_kd_loss import LinearKDLoss
from lightning_kd.losses.options import KDOptions
from lightning_kd.losses.token_spans import TokenSpans
from lightning_kd.losses.topk_kd_loss import TopKKDLoss
from lightning_kd.losses.vocab_map import VocabMap
from lightning_kd.losses.vocab_parallel import find_vocab_tp_group

__all__ = [
    "DIVERGENCES",
    "JSD",
    "TVD",
    "CrossTokenizerLoss",
    "CrossTokenizerOutput",
    "Divergence",
    "ForwardKL",
    "HybridKDLoss",
    "KDLoss",
    "KDLossOutput",
    "KDOptions",
    "LinearKDLoss",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "TokenSpans",
    "TopKKDLoss",
    "ULDLoss",
    "VocabMap",
    "find_vocab_tp_group",
    "resolve_divergence",
    "token_cross_entropy",
]
