"""Models and the contract they follow (see :mod:`lightning_kd.models.contract`).

- :class:`TinyLlama`: a small Llama-style model for tests, demos and examples.
- :mod:`lightning_kd.models.hf`: Hugging Face causal LMs (``HFCausalLM``), loaded offline, with
  tensor-parallel plans derived from the config's own ``base_model_tp_plan``.
"""

from lightning_kd.models.contract import (
    CausalLM,
    SupportsBufferInit,
    SupportsFSDP,
    SupportsPackedSequences,
    SupportsTensorParallel,
    SupportsUntiedHead,
    SupportsVocabulary,
)
from lightning_kd.models.tiny_llama import TinyLlama

__all__ = [
    "CausalLM",
    "SupportsBufferInit",
    "SupportsFSDP",
    "SupportsPackedSequences",
    "SupportsTensorParallel",
    "SupportsUntiedHead",
    "SupportsVocabulary",
    "TinyLlama",
]
