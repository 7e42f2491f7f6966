"""The model contract: what a teacher or student offers to ``DistillationModule``.

One required capability and a few optional ones, each a ``runtime_checkable`` Protocol so that
the training and parallel code asks ``isinstance(model, SupportsX)`` in one place instead of
scattering ``getattr`` probes:

- :class:`CausalLM` (required): ``model(input_ids [B, S] int64)`` returns logits ``[B, S, V]``
  (under tensor parallelism a DTensor sharded on V), or a mapping / object with ``logits``.
- :class:`SupportsTensorParallel`: ``tensor_parallel_plan(tp_size)`` returns a
  ``{module path: ParallelStyle}`` plan whose lm_head keeps a vocabulary-sharded DTensor output.
- :class:`SupportsFSDP`: ``fsdp_units()`` lists the blocks FSDP2 shards before the root.
- :class:`SupportsVocabulary`: ``vocab_size`` (lm_head width), ``tokenizer_vocab()`` (token → id
  map or None) and ``restrict_vocab(size)`` (drop padded rows), for vocabulary reconciliation.
- :class:`SupportsUntiedHead`: ``untie_lm_head()`` gives a tied lm_head its own weight, which
  tensor parallelism needs (a vocab-sharded head cannot share a replicated embedding).
- :class:`SupportsFusedHead`: ``hidden_states(input_ids)`` stops before the lm_head and
  ``output_head()`` returns that head, for ``DistillationModule(fused_head=True)``, which
  computes the loss from hidden states and head weights without building the logits.

:class:`~lightning_kd.models.hf.HFCausalLM` implements all of them; :class:`~lightning_kd.TinyLlama`
all but :class:`SupportsUntiedHead` (a tied TinyLlama is refused under tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle


@runtime_checkable
class CausalLM(Protocol):
    """Required: ``input_ids`` [B, S] int64 in, logits [B, S, V] (or ``{"logits": ...}``) out."""

    def __call__(self, input_ids: Tensor) -> Any: ...


@runtime_checkable
class SupportsTensorParallel(Protocol):
    """A model that knows its own tensor-parallel plan."""

    def tensor_parallel_plan(self, tp_size: int) -> Mapping[str, ParallelStyle]: ...


@runtime_checkable
class SupportsFSDP(Protocol):
    """A model that names the blocks FSDP2 wraps one by one (before the root)."""

    def fsdp_units(self) -> list[nn.Module]: ...


@runtime_checkable
class SupportsVocabulary(Protocol):
    """A model whose lm_head width and tokenizer are known, and whose padding rows can go."""

    @property
    def vocab_size(self) -> int: ...

    def tokenizer_vocab(self) -> Mapping[str, int] | None: ...

    def restrict_vocab(self, size: int) -> None: ...


@runtime_checkable
class SupportsUntiedHead(Protocol):
    """A model whose tied lm_head can be given its own weight (needed before TP shards it)."""

    def untie_lm_head(self) -> None: ...


@runtime_checkable
class SupportsFusedHead(Protocol):
    """A model whose logits are exactly ``output_head()(hidden_states(input_ids))``.

    ``hidden_states(input_ids [B, S])`` returns the final hidden states ``[B, S, d]`` the head
    reads (after the final norm; replicated under tensor parallelism, a plain tensor or a
    Replicate DTensor). ``output_head()`` returns the head module, a linear map with ``weight``
    ``[V, d]`` (vocabulary-sharded ``Shard(0)`` under tensor parallelism) and an optional
    ``bias`` ``[V]``: the logits are ``hidden @ weight.T + bias`` with nothing after (no
    soft-capping or scaling; a model that post-processes its logits must not claim this).
    Under FSDP2, ``hidden_states`` is registered as a forward method of the model, so the
    model's own ``forward`` must not call it (share a private helper instead).
    """

    def hidden_states(self, input_ids: Tensor) -> Tensor: ...

    def output_head(self) -> nn.Module: ...


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The model's FSDP2 units, or none (the root alone is wrapped)."""
    return list(model.fsdp_units()) if isinstance(model, SupportsFSDP) else []


def lm_head_width(model: nn.Module) -> int | None:
    """Width V of the model's lm_head when it declares one (``vocab_size``), else None."""
    width = getattr(model, "vocab_size", None)
    return width if isinstance(width, int) else None


def tokenizer_vocab(model: nn.Module) -> Mapping[str, int] | None:
    """The token → id map of the tokenizer the model carries, or None."""
    return model.tokenizer_vocab() if isinstance(model, SupportsVocabulary) else None
