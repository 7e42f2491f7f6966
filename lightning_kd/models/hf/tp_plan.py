"""Tensor-parallel plans derived from a Hugging Face config's own ``base_model_tp_plan``.

transformers configs say, per family, which modules of the base model are split and how:
``{"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise", ...}``,
paths relative to the base model with fnmatch wildcards over the layer index. The style names
are transformers' own (``transformers.distributed.tensor_parallel``); :func:`plan_from_config`
translates each into the DTensor ``ParallelStyle`` that does the same thing, prefixes the
paths so that ``parallelize_module`` can apply them to our wrapper, and adds what our loss
needs and the config does not say:

- the lm_head as ``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)``:
  logits ``[B, S, V]`` as a vocabulary-sharded DTensor, never transformers' own lm_head style
  (a gathered output defeats the vocab-parallel loss; a plain local one makes it wrong);
- per-head norms (Qwen3's ``q_norm``/``k_norm``) behind a column-parallel projection, even
  where the config forgets them.

Style names without a faithful DTensor counterpart here are refused with a ValueError that
names them (see ``_REFUSED``) rather than mapped approximately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
)

from lightning_kd.models.contract import plan_key_matches


def _per_head_norm() -> ParallelStyle:
    # Per-head norms (Qwen3's q_norm/k_norm: one [head_dim] weight shared by all heads) sit
    # behind a column-parallel projection and see only the local heads on each rank, so their
    # weight gradient is a partial sum. Marking the input [B, S, local_heads, head_dim] as
    # sharded on the head dimension makes DTensor all-reduce the weight gradient over the TP
    # group; without it the replicas drift apart. The forward is unchanged (plain output).
    return SequenceParallel(sequence_dim=2, use_local_output=True)


#: transformers style name -> the DTensor style that does what transformers' layer of that
#: name does (same weight placements, same input and output layouts).
_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    # weight/bias Shard(0); replicated input, output kept sharded on the last dim (local).
    "colwise": ColwiseParallel,
    # as colwise, but the output is all-gathered back to a replicated tensor.
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    # weight Shard(1), bias replicated; input sharded on the last dim, output all-reduced.
    "rowwise": RowwiseParallel,
    # as rowwise, but the input arrives replicated and each rank takes its slice of it.
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    # replicated weight whose gradient is summed over the TP group: per-head norms only
    # (checked in _check_per_head_norm).
    "replicated_with_grad_allreduce": _per_head_norm,
}

#: Styles whose module output is replicated on every rank: leaving such a module unsharded
#: computes the same values (it only costs memory).
_REPLICATED_OUTPUT = frozenset(
    {"colwise_rep", "colwise_gather_output", "rowwise_rep", "rowwise_split_input",
     "embedding_rowwise", "embedding_colwise", "replicate"}
)  # fmt: skip

#: Styles refused, with the reason.
_REFUSED = {
    "packed_colwise": "fused weights need a strided shard (_StridedShard) of each packed part",
    "packed_rowwise": "fused weights need a strided shard (_StridedShard) of each packed part",
    "moe_tp_experts": "mixture-of-experts layers are not supported",
    "moe_identity_expert": "mixture-of-experts layers are not supported",
    "mla_kv_a_proj": "MLA's split kv_a projection needs a custom backward all-reduce",
    "local_params": "it relies on parameter-level sharding entries, which are not supported",
    "all_reduce": "it sums partial outputs of MoE shared experts, which are not supported",
    "sequence_parallel": (
        "it needs sequence-sharded activations, which no other style produces: a replicated "
        "activation marked as a shard would multiply the weight gradient by the TP size"
    ),
}

#: Norm name -> the projection whose per-head output it normalises.
_NORM_PROJECTIONS = {"q_norm": "q_proj", "k_norm": "k_proj", "v_norm": "v_proj"}


def plan_from_config(
    hf_model: nn.Module, tp_size: int, prefix: str = "model"
) -> dict[str, ParallelStyle]:
    """The TP plan of a transformers causal LM, from its config's ``base_model_tp_plan``.

    The model's input embeddings (and any ``nn.Embedding`` the config shards) stay
    replicated: every transformers embedding style ends in a replicated output, so a full
    table computes the same values, and vocabulary-sharded lookups are not verified here
    against our vocabulary restriction (``restrict_vocab``) or ``padding_idx``. The cost is
    memory only; the input ids ``[B, S]`` are the same on all TP ranks either way.

    Args:
        hf_model: a transformers ``*ForCausalLM`` (``base_model`` and ``lm_head`` inside).
        tp_size: size of the tensor-parallel group.
        prefix: path of ``hf_model`` inside the module the plan is applied to (``"model"``
            for :class:`~lightning_kd.models.hf.HFCausalLM`; ``""`` for the bare model).

    Returns:
        ``{module path or fnmatch pattern: ParallelStyle}`` for ``parallelize_module``: the
        config's entries under the base model's path, per-head norms the config leaves out,
        and the lm_head with vocabulary-sharded DTensor logits ``[B, S, V]``.

    Raises:
        ValueError: the config has no (or an empty) ``base_model_tp_plan``; ``tp_size`` does
            not divide the attention or key/value head counts; a style has no faithful DTensor
            counterpart here; an entry names a parameter rather than a module; a norm
            behind a column-parallel projection does not have one ``[head_dim]`` weight.
    """
    config = hf_model.config
    model_type = getattr(config, "model_type", None) or type(hf_model).__name__
    hf_plan: dict[str, str] = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not hf_plan:
        raise ValueError(
            f"no tensor-parallel plan for model_type {model_type!r}: its transformers config "
            "carries no base_model_tp_plan. Pass student_tp_plan/teacher_tp_plan to "
            "DistillationModule, or run it without tensor parallelism."
        )
    _check_head_counts(config, tp_size)
    base = hf_model.base_model
    modules = dict(base.named_modules())
    root = _join(prefix, _path_of(hf_model, base))

    # Which base-model module each entry reaches, and with which transformers style.
    covered: dict[str, str] = {}
    entries: list[tuple[str, str, list[str]]] = []
    for pattern, style in hf_plan.items():
        matched = _expand(pattern, modules)
        if not matched:
            if _expand(pattern, dict(base.named_parameters())):
                raise ValueError(
                    f"{model_type}: base_model_tp_plan entry {pattern!r} ({style!r}) names a "
                    "parameter; parameter-level entries are not supported."
                )
            continue  # a module this variant of the family does not build (HF skips it too)
        if style in _REFUSED or (style not in _STYLES and style not in _REPLICATED_OUTPUT):
            reason = _REFUSED.get(style, "it is not a style lightning_kd knows")
            raise ValueError(
                f"{model_type}: cannot map tensor-parallel style {style!r} (on {pattern!r}) to a "
                f"DTensor ParallelStyle: {reason}. Pass student_tp_plan/teacher_tp_plan to "
                "DistillationModule, or run it without tensor parallelism."
            )
        for name in matched:
            if name in covered:
                raise ValueError(f"{model_type}: base_model_tp_plan covers {name!r} twice.")
            covered[name] = style
        entries.append((pattern, style, matched))

    plan: dict[str, ParallelStyle] = {}
    for pattern, style, matched in entries:
        if any(isinstance(modules[name], nn.Embedding) for name in matched):
            if style not in _REPLICATED_OUTPUT:
                raise ValueError(
                    f"{model_type}: style {style!r} on the embedding {pattern!r} leaves its "
                    "output sharded; only replicated-output embedding styles are supported."
                )
            continue  # replicated: see the docstring
        if style not in _STYLES:  # "replicate", or an embedding style on a non-embedding
            if style.startswith("embedding"):
                raise ValueError(f"{model_type}: {style!r} on {pattern!r}, not an nn.Embedding.")
            continue  # "replicate": the full parameters stay on every rank, as in transformers
        if style == "replicated_with_grad_allreduce":
            for name in matched:
                _check_per_head_norm(name, modules, covered, config, model_type, listed=True)
        plan[_join(root, pattern)] = _STYLES[style]()

    # Per-head norms the config leaves out (e.g. glm4_moe's): their gradients still need it.
    for name in modules:
        if name not in covered and _check_per_head_norm(name, modules, covered, config, model_type):
            plan[_join(root, name)] = _per_head_norm()

    head = hf_model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{model_type}: the output embedding is {type(head).__name__}, not a Linear."
        )
    plan[_join(prefix, _path_of(hf_model, head))] = ColwiseParallel(
        output_layouts=Shard(-1), use_local_output=False
    )
    return plan


def _check_head_counts(config: Any, tp_size: int) -> None:
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        return
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp_size or kv_heads % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide num_attention_heads={heads} and "
            f"num_key_value_heads={kv_heads}."
        )


def _check_per_head_norm(
    name: str,
    modules: dict[str, nn.Module],
    covered: dict[str, str],
    config: Any,
    model_type: str,
    listed: bool = False,
) -> bool:
    """Whether ``name`` is a per-head norm with a weight whose gradient must be all-reduced.

    A ``q_norm``/``k_norm``/``v_norm`` behind a ``colwise`` sibling projection sees only the
    local heads. One ``[head_dim]`` weight (shared by all heads) is handled; a parameterless
    norm needs nothing; any other weight shape cannot be mapped. ``listed``: the config names
    the norm ``replicated_with_grad_allreduce``, which must then be such a norm.

    Raises:
        ValueError: the norm cannot be mapped (see above).
    """
    parent, _, leaf = name.rpartition(".")
    projection = _NORM_PROJECTIONS.get(leaf)
    head_sharded = projection is not None and covered.get(_join(parent, projection)) == "colwise"
    if not head_sharded:
        if listed:
            raise ValueError(
                f"{model_type}: 'replicated_with_grad_allreduce' on {name!r} is supported only "
                "for q_norm/k_norm/v_norm behind a 'colwise' q_proj/k_proj/v_proj."
            )
        return False
    head_dim = getattr(modules[parent], "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim is None:
        head_dim = config.hidden_size // config.num_attention_heads
    params = list(modules[name].parameters(recurse=False))
    if all(p.ndim == 1 and p.shape[0] == head_dim for p in params):
        return bool(params)
    shapes = [tuple(p.shape) for p in params]
    raise ValueError(
        f"{model_type}: {name!r} normalises the output of the column-parallel {projection!r} "
        f"with weights of shape {shapes}; only one [head_dim={head_dim}] weight per norm can "
        "be tensor-parallel. Pass student_tp_plan/teacher_tp_plan to DistillationModule."
    )


def _expand(pattern: str, named: dict[str, Any]) -> list[str]:
    """Names matching ``pattern`` atom by atom, as ``parallelize_module`` resolves plan keys."""
    return [name for name in named if name and plan_key_matches(name, pattern)]


def _path_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}.")


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)
