"""What a user wants to know about a student, on held-out text: cross-entropy and perplexity on
the labels, the divergence to the teacher per token, top-1 agreement with the teacher, and a few
greedy samples side by side (``lightning-kd evaluate``, see :mod:`lightning_kd.evaluate`).

- :mod:`~lightning_kd.evaluation.metrics`: the per-token sums (plain PyTorch).
- :mod:`~lightning_kd.evaluation.greedy`: a minimal greedy decoder for the samples.
- :mod:`~lightning_kd.evaluation.report`: the table and the JSON file.
- :mod:`~lightning_kd.evaluation.run`: models × held-out batches → results.
- :mod:`~lightning_kd.evaluation.own_samples`: the divergence to the teacher on completions the
  student samples itself (the on-policy demo's comparison).
"""

from lightning_kd.evaluation.greedy import greedy_generate
from lightning_kd.evaluation.metrics import TokenMetrics
from lightning_kd.evaluation.own_samples import divergence_on_own_samples
from lightning_kd.evaluation.report import format_table, write_report
from lightning_kd.evaluation.run import DEFAULT_PROMPTS, evaluate_models

__all__ = [
    "DEFAULT_PROMPTS",
    "TokenMetrics",
    "divergence_on_own_samples",
    "evaluate_models",
    "format_table",
    "greedy_generate",
    "write_report",
]
