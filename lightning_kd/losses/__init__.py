"""Distillation losses in plain PyTorch (this package imports nothing from Lightning).

- :class:`KDLoss`: the public loss module (input checks, valid-token selection, dispatch).
- :mod:`~lightning_kd.losses.engine`: the chunked, memory-bounded pass with analytic backward.
- :mod:`~lightning_kd.losses.divergences`: one file per divergence, only its chunk math.
- :mod:`~lightning_kd.losses.vocab_softmax` / :mod:`~lightning_kd.losses.vocab_parallel`:
  softmax over a whole vocabulary row, or over one rank's vocabulary shard (tensor parallel).
- :mod:`~lightning_kd.losses.cross_entropy`: hard-label cross-entropy, also vocab-parallel.
"""

from lightning_kd.losses.cross_entropy import token_cross_entropy
from lightning_kd.losses.divergences import Divergence, ForwardKL, ReverseKL
from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.losses.vocab_parallel import find_vocab_tp_group

__all__ = [
    "Divergence",
    "ForwardKL",
    "KDLoss",
    "KDLossOutput",
    "ReverseKL",
    "find_vocab_tp_group",
    "token_cross_entropy",
]
