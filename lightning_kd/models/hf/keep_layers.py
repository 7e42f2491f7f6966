"""A shallower Hugging Face model from a deeper one: keep a chosen subset of decoder blocks.

With :class:`~lightning_kd.models.hf.HFCausalLM`'s ``keep_layers`` and the teacher's
``pretrained_path``, the student starts as the teacher's embeddings, final norm, lm_head and the
chosen blocks (see :mod:`lightning_kd.models.init_from_teacher` for the recipe and the stride /
list conventions). The blocks are the loaded modules themselves (no copy); the config's depth
and per-layer fields follow, so ``save_pretrained`` writes a valid model of the smaller depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_kd.models.init_from_teacher import select_layers

#: Config fields holding one entry per decoder layer (Qwen2/3, Gemma, Mistral sliding windows).
_PER_LAYER_FIELDS = ("layer_types",)


def keep_layers(model: Any, layers: int | Sequence[int]) -> list[int]:
    """Keep only the chosen decoder blocks of an HF causal LM (in place).

    Args:
        model: a transformers ``*ForCausalLM`` whose base model holds ``layers`` (Llama-style).
        layers: a stride ``k`` (every k-th block from the first) or a strictly increasing list of
            block indices (see :func:`~lightning_kd.models.init_from_teacher.select_layers`).

    Returns:
        The kept block indices of the original model.

    Raises:
        ValueError: a model without ``base_model.layers``, or invalid ``layers``.
    """
    base = model.base_model
    blocks = getattr(base, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"keep_layers needs a model whose base model has a `layers` ModuleList "
            f"(Llama-style); {type(model).__name__} has none."
        )
    chosen = select_layers(len(blocks), layers)
    base.layers = nn.ModuleList(blocks[i] for i in chosen)
    for j, block in enumerate(base.layers):  # the KV-cache slot of each block
        for module in (block, getattr(block, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = j
    config = model.config
    config.num_hidden_layers = len(chosen)
    for field in _PER_LAYER_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, list | tuple) and len(values) == len(blocks):
            setattr(config, field, [values[i] for i in chosen])
    return chosen
