"""TinyLlama → Hugging Face ``LlamaForCausalLM``: the config and the weight names.

TinyLlama computes exactly what HF Llama computes, so the export renames weights and copies
sizes; nothing is permuted. Checked against ``transformers.models.llama.modeling_llama``:

- RoPE: TinyLlama rotates the pairs (first half, second half) of each head
  (``x1, x2 = x.chunk(2)``; ``cat(x1·cos − x2·sin, x1·sin + x2·cos)``), which is HF's
  ``rotate_half`` layout, with the same frequencies ``θ^(−2i/d)``. (Meta's original
  checkpoints rotate interleaved pairs, which is why HF's ``convert_llama_weights_to_hf``
  permutes the q/k rows; TinyLlama's rows need no permutation.)
- RMSNorm in fp32, ``weight · normed.to(dtype)``, with the same epsilon in every norm
  (``rms_norm_eps``).
- SwiGLU ``w2(silu(w1 x) · w3 x)`` = HF's ``down(silu(gate x) · up x)``: w1 → gate_proj,
  w3 → up_proj, w2 → down_proj.
- Attention: SDPA with the default scale ``head_dim^−0.5``, ``head_dim = dim / n_heads``,
  grouped-query heads repeated as HF's ``repeat_kv`` does (each key/value head serves
  consecutive query heads); no biases anywhere (``attention_bias = mlp_bias = False``).

:func:`rope_theta_of` reads ``model.rope_theta`` and checks that it rebuilds the model's
rotary tables exactly (for a model without the attribute it recovers theta from the tables).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_kd.models.tiny_llama import TinyLlama, rope_tables

#: TinyLlama parameter name patterns → HF Llama names (``{i}``: the layer index).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def llama_name(name: str) -> str:
    """The HF Llama name of a TinyLlama state-dict key (``layers.0.mlp.w1.weight`` →
    ``model.layers.0.mlp.gate_proj.weight``).

    Raises:
        ValueError: for a key TinyLlama does not have.
    """
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER.fullmatch(name)
    if match is not None and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"{name!r} is not a TinyLlama weight; cannot map it to HF Llama.")


def llama_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """TinyLlama's full state dict under HF Llama's names (same tensors, nothing permuted)."""
    return {llama_name(name): tensor for name, tensor in state.items()}


def rope_theta_of(model: TinyLlama) -> float:
    """The rotary base ``θ`` that built ``model``'s RoPE tables.

    ``model.rope_theta`` when the model has it; otherwise recovered from the tables (the
    angle of frequency 1 at position 1 is ``θ^(−2/head_dim)``) and rounded to the fewest
    significant digits that rebuild both tables exactly.

    Raises:
        ValueError: tables too small to read ``θ`` from, or no ``θ`` that rebuilds them.
    """
    theta = getattr(model, "rope_theta", None)
    if theta is not None:
        return float(theta)
    cos, sin = model.rope_cos.detach().cpu(), model.rope_sin.detach().cpu()
    positions, half = cos.shape
    if positions < 2 or half < 2:
        raise ValueError(
            f"cannot read rope_theta from RoPE tables of shape {tuple(cos.shape)}: need at "
            "least 2 positions and a head size of at least 4."
        )
    head_dim = 2 * half
    angle = torch.atan2(sin[1, 1].double(), cos[1, 1].double()).item()
    estimate = angle ** (-head_dim / 2)
    for candidate in [float(f"{estimate:.{digits}g}") for digits in range(1, 10)] + [estimate]:
        want_cos, want_sin = rope_tables(head_dim, positions, candidate)
        if torch.equal(want_cos.to(cos.dtype), cos) and torch.equal(want_sin.to(sin.dtype), sin):
            return candidate
    raise ValueError(
        f"the RoPE tables of this TinyLlama are not those of any rope_theta near {estimate:.6g}"
        " (were they modified?); cannot export them as HF Llama's default RoPE."
    )


def llama_config(model: TinyLlama, state: Mapping[str, Tensor], tied: bool) -> dict[str, Any]:
    """The ``LlamaConfig`` fields of a TinyLlama whose full weights are ``state``.

    Sizes come from the full (gathered, possibly vocabulary-restricted) weights, not from the
    module, whose projections may be tensor-parallel shards.

    Args:
        model: the TinyLlama (for head counts, the norm epsilon and the RoPE tables).
        state: its full state dict (TinyLlama names, plain tensors).
        tied: whether the lm_head shares the embedding matrix.
    """
    vocab, dim = state["embed.weight"].shape
    n_layers = len(model.layers)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": int(dim),
        "intermediate_size": int(state["layers.0.mlp.w1.weight"].shape[0]),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(model.n_heads),
        "num_key_value_heads": int(model.n_kv_heads),
        "head_dim": int(dim) // int(model.n_heads),
        "hidden_act": "silu",
        "max_position_embeddings": int(model.rope_cos.shape[0]),
        "rms_norm_eps": float(model.norm.eps),
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta_of(model)},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tied,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
