"""The model contract: what a teacher or student offers to ``DistillationModule``.

One required capability and a few optional ones, each a ``runtime_checkable`` Protocol so that
the training and parallel code asks ``isinstance(model, SupportsX)`` in one place instead of
scattering ``getattr`` probes:

- :class:`CausalLM` (required): ``model(input_ids [B, S] int64)`` returns logits ``[B, S, V]``
  (under tensor parallelism a DTensor sharded on V), or a mapping / object with ``logits``.
- :class:`SupportsTensorParallel`: ``tensor_parallel_plan(tp_size)`` returns a
  ``{module path: ParallelStyle}`` plan whose lm_head keeps a vocabulary-sharded DTensor output
  (keys may hold fnmatch wildcards between dots, see :func:`plan_key_matches`).
- :class:`SupportsFSDP`: ``fsdp_units()`` lists the blocks FSDP2 shards before the root.
- :class:`SupportsVocabulary`: ``vocab_size`` (lm_head width), ``tokenizer_vocab()`` (token → id
  map or None) and ``restrict_vocab(size)`` (drop padded rows), for vocabulary reconciliation.
- :class:`SupportsUntiedHead`: ``untie_lm_head()`` gives a tied lm_head its own weight, which
  tensor parallelism needs (a vocab-sharded head cannot share a replicated embedding).
- :class:`SupportsFusedHead`: ``hidden_states(input_ids)`` stops before the lm_head and
  ``output_head()`` returns that head, for ``DistillationModule(fused_head=True)``, which
  computes the loss from hidden states and head weights without building the logits.
- :class:`SupportsPackedSequences`: ``forward`` and ``hidden_states`` take ``position_ids``
  [B, S] and keep the documents packed in one row apart (no attention across documents), for
  batches that carry ``position_ids``.
- :class:`SupportsBufferInit`: ``init_non_persistent_buffers()`` recomputes the buffers that
  are not in the state dict (RoPE tables, rotary ``inv_freq``) in place, which a model built on
  the meta device needs after ``to_empty`` (sharded loading,
  :func:`~lightning_kd.parallel.meta_init.materialize`).

:class:`~lightning_kd.models.hf.HFCausalLM` implements all of them; :class:`~lightning_kd.TinyLlama`
all but :class:`SupportsUntiedHead` (a tied TinyLlama is refused under tensor parallelism).

This package depends on torch only: the parallel layer (:mod:`lightning_kd.parallel`) imports
the contract, never the other way round.

Packed batches: ``position_ids`` [B, S] int64 restart at 0 at the first token of every document
and count up by one within it; the trailing padding of a row is a document of its own. A
document starts where ``position_ids == 0`` (or at the row start). :func:`check_position_ids`
checks that form, :func:`document_ids` numbers the documents and :func:`packed_causal_mask`
builds the block-diagonal causal attention mask.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
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


def plan_key_matches(module_path: str, pattern: str) -> bool:
    """Whether the plan key ``pattern`` names ``module_path``, matched between dots atom by atom
    as ``parallelize_module`` does (a ``*`` never crosses a dot)."""
    parts, atoms = module_path.split("."), pattern.split(".")
    return len(parts) == len(atoms) and all(map(fnmatch.fnmatchcase, parts, atoms))


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


@runtime_checkable
class SupportsPackedSequences(Protocol):
    """A model that runs packed sequences with the documents isolated from each other.

    ``forward(input_ids, output_hidden=False, position_ids=None)`` and
    ``hidden_states(input_ids, position_ids=None)`` take ``position_ids`` [B, S] int64 (see the
    module docstring for the form): every token is embedded at its own position (RoPE or
    whatever the model uses) and attends only to earlier tokens of its own document, so each
    document's outputs equal those of the document run alone from position 0.
    ``position_ids=None`` means one sequence per row at positions ``0..S-1``.

    ``isinstance`` checks only that the methods exist; :func:`accepts_position_ids` also
    checks that the method the caller needs has a ``position_ids`` parameter.
    """

    def forward(
        self, input_ids: Tensor, output_hidden: bool = False, position_ids: Tensor | None = None
    ) -> Any: ...

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class SupportsBufferInit(Protocol):
    """A model that can recompute its non-persistent buffers in place.

    ``init_non_persistent_buffers()`` refills every non-persistent buffer of the model and its
    submodules (those ``state_dict`` leaves out, e.g. RoPE cos/sin tables or rotary
    ``inv_freq``) with the values its constructor would give them, on the device and in the
    dtype they already have. It reads no parameter and touches none. Needed after
    ``to_empty()`` (a model built on the meta device, then materialised), which leaves those
    buffers uninitialised.
    """

    def init_non_persistent_buffers(self) -> None: ...


def non_persistent_buffers(module: nn.Module) -> list[str]:
    """Names of ``module``'s own (not its submodules') non-persistent buffers that are set."""
    persistent = {key for key in module.state_dict(keep_vars=True) if "." not in key}
    return [
        n for n, b in module.named_buffers(recurse=False) if n not in persistent and b is not None
    ]


def accepts_position_ids(model: nn.Module, method: str = "forward") -> bool:
    """Whether ``model.<method>`` (``"forward"`` or ``"hidden_states"``) declares a
    ``position_ids`` parameter (a bare ``**kwargs`` does not count: it may drop it silently)."""
    fn = getattr(model, method, None)
    if fn is None:
        return False
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in parameters


def document_ids(position_ids: Tensor) -> Tensor:
    """position_ids [B, S] -> [B, S] int64 document index within each row: it goes up by one
    at every ``position_ids == 0`` (tokens before a row's first 0 form document 0)."""
    return torch.cumsum(position_ids == 0, dim=1)


def packed_causal_mask(position_ids: Tensor) -> Tensor:
    """position_ids [B, S] -> boolean attention mask [B, 1, S, S] (True: may attend): query t
    sees key u iff ``u <= t`` and both are in the same document. The head dimension is 1 so
    that it broadcasts over any number of (tensor-parallel local) heads, as
    ``F.scaled_dot_product_attention(attn_mask=...)`` expects."""
    doc = document_ids(position_ids)
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)


def check_position_ids(
    position_ids: Tensor, input_ids: Tensor, max_position: int | None = None
) -> None:
    """Check packed-sequence ``position_ids`` against ``input_ids`` [B, S].

    Requires an integer tensor of ``input_ids``'s shape, non-negative, counting up by one
    within every document (each value is 0, starting a document, or the previous value plus
    one), and below ``max_position`` when given. One host synchronisation.

    Raises:
        ValueError: naming the first violation.
    """
    if not isinstance(position_ids, Tensor):
        raise ValueError(f"position_ids must be a tensor, got {type(position_ids).__name__}.")
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"position_ids must be int64 (or int32), got {position_ids.dtype}.")
    if position_ids.shape != input_ids.shape or position_ids.ndim != 2:
        raise ValueError(
            f"position_ids must have input_ids' shape [B, S] = {tuple(input_ids.shape)}, got "
            f"{tuple(position_ids.shape)}."
        )
    if position_ids.numel() == 0:
        return
    prev, cur = position_ids[:, :-1], position_ids[:, 1:]
    broken = (cur != 0) & (cur != prev + 1)
    flags = [(position_ids < 0).any(), broken.any()]
    if max_position is not None:
        flags.append((position_ids >= max_position).any())
    negative, discontinuous, *beyond = torch.stack(flags).tolist()
    if negative:
        raise ValueError("position_ids must be non-negative.")
    if discontinuous:
        row, col = (int(i) for i in broken.nonzero()[0])
        raise ValueError(
            "position_ids must restart at 0 at each document and count up by one within it; "
            f"row {row} goes from {int(prev[row, col])} to {int(cur[row, col])} at column "
            f"{col + 1}."
        )
    if any(beyond):
        raise ValueError(
            f"position_ids reach {int(position_ids.max())}, beyond the model's max_seq_len "
            f"{max_position} (positions must be < {max_position})."
        )


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


def packing_kwargs(
    model: nn.Module, role: str, method: str, batch: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``{"position_ids": ...}`` to pass to ``model.<method>`` for a packed batch (one with
    ``position_ids``), else ``{}``; ``role`` names the model in the error.

    Raises:
        ValueError: when the batch is packed and ``model.<method>`` takes no ``position_ids``:
            its documents would attend to each other silently.
    """
    position_ids = batch.get("position_ids")
    if position_ids is None:
        return {}
    if not accepts_position_ids(model, method):
        raise ValueError(
            f"the batch carries position_ids (packed sequences) but the {role} "
            f"({type(model).__name__}) has no position_ids parameter in {method}(): its "
            "documents would attend to each other. Implement position_ids in forward and "
            "hidden_states (lightning_kd.models.contract.SupportsPackedSequences; TinyLlama "
            "and HFCausalLM do), or use a data module that yields no position_ids."
        )
    return {"position_ids": position_ids}
