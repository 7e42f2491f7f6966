"""A small Llama-style causal language model with its tensor-parallel plan.

It serves the tests and the demo without any download: RMSNorm, rotary position embeddings,
grouped-query attention, a SwiGLU MLP, and a tied or untied lm_head. The constructor's typed
arguments are its config, so a YAML ``class_path: lightning_kd.TinyLlama`` with ``init_args``
builds one. :meth:`TinyLlama.tensor_parallel_plan` is the explicit Megatron-style plan
(attention and MLP projections column/row-parallel, lm_head column-parallel with
vocabulary-sharded DTensor output) that :class:`~lightning_kd.DistillationModule` applies.

Inputs: ``input_ids`` [B, S] int64 and optionally ``position_ids`` [B, S] int64 for packed
sequences (several documents per row, isolated from each other: see
:class:`~lightning_kd.models.contract.SupportsPackedSequences`). Output: logits [B, S, V] (a
DTensor sharded on V under TP).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from lightning_kd.models.contract import check_position_ids, packed_causal_mask
from lightning_kd.models.init_from_teacher import copy_from_teacher, load_state_file, select_layers
from lightning_kd.models.lora import LoraOptions, apply_lora, lora_tensor_parallel_plan

#: The layers a LoRA student adapts by default: every projection of the blocks.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

#: A TinyLlama block key (``layers.<i>.``), for counting a teacher file's blocks.
_TEACHER_BLOCK = re.compile(r"^layers\.(\d+)\.")


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no bias), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin ``[max_seq_len, head_dim / 2]`` (fp32) of the default RoPE with base
    ``theta`` (float64 angles, then fp32): the tables TinyLlama rotates with."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, S, D]; cos/sin: [S, D/2] (positions 0..S-1) or [B, 1, S, D/2] (per-token
    positions of packed sequences), fp32. Rotates pairs (first half, second half)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention. Head counts are inferred from the projections'
    output widths, so the same code runs on a tensor-parallel shard with fewer local heads.

    ``mask`` (optional): a boolean ``[B, 1, S, S]`` mask, True where a query may attend to a
    key (block-diagonal causal for packed sequences); it broadcasts over the (local) heads.
    Without it attention is plainly causal (SDPA's ``is_causal`` fast path)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, n_kv_heads)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    """A Llama-style decoder-only language model.

    Args:
        vocab_size: vocabulary size V (teacher and student must share it).
        dim: model width.
        n_layers: number of transformer blocks.
        n_heads: attention heads; must divide ``dim``.
        n_kv_heads: key/value heads (grouped-query attention); must divide ``n_heads``.
        hidden_dim: SwiGLU hidden width.
        max_seq_len: longest sequence the rotary tables cover.
        rope_theta: rotary base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share the embedding matrix with the lm_head (not with TP > 1).
        init_std: standard deviation of the normal weight init.
        init_from: a teacher's weights file (a ``torch.save`` state dict or a Lightning
            checkpoint) to initialise from, the DistilBERT/Minitron recipe: the teacher's
            embeddings, final norm, lm_head and the blocks ``init_layers`` (see
            :mod:`lightning_kd.models.init_from_teacher`). The teacher must have this model's
            width, heads and vocabulary. None: random init.
        init_from_prefix: key prefix of the student-shaped weights in ``init_from`` (e.g.
            ``"model."`` for the checkpoints ``configs/teacher.yaml`` writes).
        init_layers: the teacher blocks to copy: a stride ``k`` (every k-th from the first)
            or a list; ``len`` must equal ``n_layers``. None: the first ``n_layers`` blocks.
        lora: train LoRA adapters instead of the model (``peft``, see
            :mod:`lightning_kd.models.lora`): ``{rank, alpha, dropout, target_modules}``
            (default targets: every projection of the blocks). Applied after ``init_from``;
            every other parameter is frozen. None: the whole model trains.

    Raises:
        ValueError: for inconsistent sizes, or an ``init_from`` the student cannot take.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        hidden_dim: int = 176,
        max_seq_len: int = 512,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        tie_embeddings: bool = False,
        init_std: float = 0.02,
        init_from: str | None = None,
        init_from_prefix: str = "",
        init_layers: int | list[int] | None = None,
        lora: LoraOptions | None = None,
    ) -> None:
        super().__init__()
        if min(vocab_size, dim, n_layers, n_heads, n_kv_heads, hidden_dim, max_seq_len) < 1:
            raise ValueError("TinyLlama sizes must all be positive integers.")
        if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
            raise ValueError(
                f"TinyLlama needs n_heads | dim, n_kv_heads | n_heads and an even head size, got "
                f"dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads}."
            )
        self.vocab_size, self.n_heads, self.n_kv_heads = vocab_size, n_heads, n_kv_heads
        self.tie_embeddings = tie_embeddings
        self.rope_theta = float(rope_theta)
        self.norm_eps = float(norm_eps)
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, hidden_dim, norm_eps) for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rope_tables(dim // n_heads, max_seq_len, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, head_dim / 2]
        self.register_buffer("rope_sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=init_std)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if init_from is not None:
            self._init_from_teacher(init_from, init_from_prefix, init_layers)
        elif init_layers is not None:
            raise ValueError("init_layers needs init_from (the teacher's weights file).")
        self.lora = LoraOptions.of(lora)
        if self.lora is not None:
            apply_lora(self, self.lora, LORA_TARGETS, protected=(self.lm_head,))

    def _init_from_teacher(self, path: str, prefix: str, layers: int | list[int] | None) -> None:
        """Copy the teacher's weights in ``path`` (see ``init_from``)."""
        state = load_state_file(path, prefix)
        if layers is None:
            chosen = list(range(len(self.layers)))
        else:
            blocks = {int(m.group(1)) for key in state if (m := _TEACHER_BLOCK.match(key))}
            chosen = select_layers(1 + max(blocks, default=-1), layers)
        if len(chosen) != len(self.layers):
            raise ValueError(
                f"init_layers picks {len(chosen)} teacher blocks {chosen}, but the student has "
                f"n_layers={len(self.layers)}; they must be equal."
            )
        copy_from_teacher(self, state, chosen)

    def forward(
        self, input_ids: Tensor, output_hidden: bool = False, position_ids: Tensor | None = None
    ) -> Tensor | dict[str, Tensor]:
        """input_ids: [B, S] int64 -> logits [B, S, V] (vocab-sharded DTensor under TP).

        Args:
            input_ids: [B, S] int64 token ids.
            output_hidden: also return the final normalised hidden states: the result is then
                ``{"logits": ..., "hidden": [B, S, dim]}`` (hidden replicated under TP), e.g.
                for hidden-state losses.
            position_ids: optional [B, S] integer positions of packed sequences: each document
                starts at 0 and counts up by one; a token attends only to earlier tokens of its
                own document (block-diagonal causal mask) and is rotated at its own position.
                Positions must be below ``max_seq_len``; the row itself may be longer.
                None: one sequence per row at positions 0..S-1 (needs S <= ``max_seq_len``).

        Raises:
            ValueError: for a sequence or positions beyond ``max_seq_len``, or malformed
                ``position_ids`` (see :func:`~lightning_kd.models.contract.check_position_ids`).
        """
        hidden = self._final_hidden(input_ids, position_ids)
        logits = self.lm_head(hidden)
        return {"logits": logits, "hidden": hidden} if output_hidden else logits

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """input_ids: [B, S] int64 -> the final normalised hidden states [B, S, dim], what
        ``lm_head`` turns into logits (replicated under TP). ``position_ids`` [B, S] as in
        :meth:`forward` (packed sequences, documents isolated)."""
        # forward does not call this method: FSDP2 may register it as a forward of its own.
        return self._final_hidden(input_ids, position_ids)

    def _final_hidden(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        max_len = self.rope_cos.shape[0]
        mask: Tensor | None = None
        if position_ids is None:
            seq = input_ids.shape[1]
            if seq > max_len:
                raise ValueError(f"sequence length {seq} exceeds max_seq_len {max_len}")
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:
            check_position_ids(position_ids, input_ids, max_position=max_len)
            # [B, S, D/2] tables gathered by position, [B, 1, S, D/2] to broadcast over heads.
            cos = self.rope_cos[position_ids].unsqueeze(1)
            sin = self.rope_sin[position_ids].unsqueeze(1)
            mask = packed_causal_mask(position_ids)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def output_head(self) -> nn.Linear:
        """The lm_head: logits = ``hidden_states(ids) @ lm_head.weight.T`` (no bias)."""
        return self.lm_head

    def tensor_parallel_plan(self, tp_size: int) -> dict[str, ParallelStyle]:
        """The TP plan for ``parallelize_module``: column-parallel q/k/v and MLP up-projections,
        row-parallel output projections, and a column-parallel lm_head whose output stays a
        DTensor sharded on the vocabulary (``use_local_output=False``) for KDLoss.

        Raises:
            ValueError: when ``tp_size`` does not divide the head counts or the embeddings are
                tied (a sharded lm_head cannot share the replicated embedding).
        """
        if self.n_kv_heads % tp_size or self.n_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} must divide n_heads={self.n_heads} and "
                f"n_kv_heads={self.n_kv_heads}."
            )
        if self.tie_embeddings and tp_size > 1:
            raise ValueError("tie_embeddings=True is not supported with tensor parallelism.")
        plan: dict[str, ParallelStyle] = {}
        for i in range(len(self.layers)):
            for name in ("attn.wq", "attn.wk", "attn.wv", "mlp.w1", "mlp.w3"):
                plan[f"layers.{i}.{name}"] = ColwiseParallel()
            for name in ("attn.wo", "mlp.w2"):
                plan[f"layers.{i}.{name}"] = RowwiseParallel()
        plan["lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        return lora_tensor_parallel_plan(self, plan)  # LoRA layers: base and adapter split

    def tokenizer_vocab(self) -> None:
        """TinyLlama carries no tokenizer (the data module owns it)."""
        return None

    def restrict_vocab(self, size: int) -> None:
        """Keep the first ``size`` rows of the embedding and the lm_head (drop padding rows).

        Raises:
            ValueError: when ``size`` is not in [1, vocab_size].
        """
        if not 1 <= size <= self.vocab_size:
            raise ValueError(f"cannot restrict vocab {self.vocab_size} to {size}.")
        if size == self.vocab_size:
            return
        embed = nn.Embedding(size, self.embed.embedding_dim)
        embed.weight = nn.Parameter(self.embed.weight.detach()[:size].clone())
        self.embed = embed
        if self.tie_embeddings:
            self.lm_head = nn.Linear(self.embed.embedding_dim, size, bias=False)
            self.lm_head.weight = self.embed.weight
        else:
            head = nn.Linear(self.lm_head.in_features, size, bias=False)
            head.weight = nn.Parameter(self.lm_head.weight.detach()[:size].clone())
            self.lm_head = head
        self.vocab_size = size

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules to wrap with FSDP2 ``fully_shard`` before the root (one per block)."""
        return list(self.layers)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the RoPE tables ``rope_cos`` / ``rope_sin`` [max_seq_len, head_dim / 2]
        (fp32) in place, e.g. after ``to_empty`` left them uninitialised (sharded loading)."""
        head_dim = self.embed.embedding_dim // self.n_heads
        cos, sin = rope_tables(head_dim, self.rope_cos.shape[0], self.rope_theta)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
