"""Cached forwards: the logits of the next token, reusing the keys and values of earlier ones.

A :class:`Decoder` runs ``step(ids [B, q], positions [B, q], key_mask [B, L + q])`` where L
tokens are already in its cache, and returns the logits of the last of the q tokens [B, V]
(fp32, replicated: a vocabulary-sharded DTensor is gathered, so every TP rank sees the same).
Left padding is handled by ``key_mask`` (False on padding keys) and ``positions`` (each row's
own count of real tokens).

:class:`TinyLlamaDecoder` calls the model's own submodules (embedding, norms, projections,
MLPs, lm_head) in the order of :meth:`TinyLlama.forward`, so tensor-parallel hooks on the
projections still fire, and keeps keys and values in preallocated buffers. It bypasses the
blocks' ``forward`` (so FSDP2 hooks on the blocks do not fire: see
:func:`~lightning_kd.rollout.generate.gathered_parameters`). :class:`HFDecoder` runs the
Hugging Face model with a ``DynamicCache``.
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_kd.models.hf import HFCausalLM
from lightning_kd.models.tiny_llama import TinyLlama


class Decoder(Protocol):
    """A model's forward with a KV cache (one decoder per generation)."""

    #: Whether each step runs the model's hooked forward (then FSDP2 may gather per step).
    hooked: bool

    def step(self, ids: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        """ids, positions [B, q] int64; key_mask [B, L + q] bool -> next-token logits [B, V]."""
        ...


def full_logits(logits: Tensor) -> Tensor:
    """Plain fp32 logits (a vocabulary-sharded DTensor gathered)."""
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return logits.float()


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotation of ``TinyLlama`` (pairs: first half, second half), in fp32.
    x [B, H, q, D]; cos/sin [B, 1, q, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class TinyLlamaDecoder:
    """A KV-cached forward of a :class:`~lightning_kd.TinyLlama` for ``capacity`` tokens.

    Raises:
        ValueError: when ``capacity`` exceeds the model's ``max_seq_len``.
    """

    hooked = False

    def __init__(self, model: TinyLlama, capacity: int) -> None:
        max_len = model.rope_cos.shape[0]
        if capacity > max_len:
            raise ValueError(
                f"prompt + max_new_tokens = {capacity} tokens exceed the model's max_seq_len "
                f"{max_len}: lower max_new_tokens or the data's seq_len."
            )
        self.model, self.capacity, self.length = model, capacity, 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def step(self, ids: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        model, start = self.model, self.length
        end = start + ids.shape[1]
        cos = model.rope_cos[positions].unsqueeze(1)
        sin = model.rope_sin[positions].unsqueeze(1)
        # Query i (at start + i) sees non-padding keys up to itself, and always itself (so a
        # padding query has a key and stays finite; its output is never used).
        causal = torch.ones(end - start, end, dtype=torch.bool, device=ids.device).tril(start)
        self_key = torch.zeros_like(causal)
        self_key[:, start:].fill_diagonal_(True)
        mask = (causal & key_mask[:, None, None, :end]) | self_key
        x = model.embed(ids)
        for i, layer in enumerate(model.layers):
            x = x + self._attention(i, layer.attn, layer.attn_norm(x), cos, sin, mask, start)
            x = x + layer.mlp(layer.mlp_norm(x))
        self.length = end
        return full_logits(model.lm_head(model.norm(x[:, -1:])))[:, -1]

    def _attention(
        self, i: int, attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
        start: int,
    ) -> Tensor:  # fmt: skip
        bsz, seq, _ = x.shape
        d = attn.head_dim
        q = attn.wq(x).view(bsz, seq, -1, d).transpose(1, 2)
        k = attn.wk(x).view(bsz, seq, -1, d).transpose(1, 2)
        v = attn.wv(x).view(bsz, seq, -1, d).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if len(self.keys) <= i:  # first step: buffers sized by the local (TP-shard) heads
            shape = (bsz, k.shape[1], self.capacity, d)
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        end = start + seq
        self.keys[i][:, :, start:end] = k
        self.values[i][:, :, start:end] = v
        k, v = self.keys[i][:, :, :end], self.values[i][:, :, :end]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class HFDecoder:
    """A KV-cached forward of an :class:`~lightning_kd.models.hf.HFCausalLM` (transformers'
    ``DynamicCache``; only the last position goes through the lm_head)."""

    hooked = True

    def __init__(self, model: HFCausalLM) -> None:
        from transformers import DynamicCache

        self.model = model.model
        # The cache is updated in place; transformers renamed the argument past_key_values to
        # cache (5.2x).
        parameters = inspect.signature(self.model.forward).parameters
        name = "cache" if "cache" in parameters else "past_key_values"
        self.cache_kwargs = {name: DynamicCache(config=self.model.config)}

    def step(self, ids: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        out = self.model(
            input_ids=ids, attention_mask=key_mask.long(), position_ids=positions,
            use_cache=True, logits_to_keep=1, **self.cache_kwargs,
        )  # fmt: skip
        return full_logits(out.logits)[:, -1]


def decoder_for(model: nn.Module, capacity: int) -> Decoder:
    """The cached forward of ``model`` for up to ``capacity`` tokens per row.

    Raises:
        ValueError: for a model that is neither a ``TinyLlama`` nor an ``HFCausalLM``, or a
            capacity beyond a TinyLlama's ``max_seq_len``.
    """
    if isinstance(model, TinyLlama):
        return TinyLlamaDecoder(model, capacity)
    if isinstance(model, HFCausalLM):
        return HFDecoder(model)
    raise ValueError(
        f"in-process generation supports TinyLlama and HFCausalLM, got {type(model).__name__}."
    )


__all__ = ["Decoder", "HFDecoder", "TinyLlamaDecoder", "decoder_for", "full_logits"]
