"""Hugging Face causal LMs as teacher or student (the ``hf`` extra; local paths only)."""

from lightning_kd.models.hf.causal_lm import HFCausalLM, same_tokenizer
from lightning_kd.models.hf.loading import local_directory, require_transformers
from lightning_kd.models.hf.tp_plan import plan_from_config

__all__ = [
    "HFCausalLM",
    "local_directory",
    "plan_from_config",
    "require_transformers",
    "same_tokenizer",
]
