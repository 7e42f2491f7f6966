"""Keep the outputs of chosen transformer blocks with forward hooks (hidden-state distillation).

A :class:`LayerTaps` registers one forward hook on each chosen block of a model's
``fsdp_units()`` (its transformer blocks: TinyLlama's ``layers``, a Hugging Face model's decoder
layers). Each hook stores its block's output (the residual stream after the block, ``[B, S, d]``)
and nothing else is kept: the other blocks' outputs are freed as usual. :meth:`LayerTaps.take`
hands the stored outputs over and forgets them, so a step never keeps them past its loss.

The hooks sit on the block modules themselves, so they survive what the parallel pipeline does
to the model in place: tensor parallelism (``parallelize_module``), activation checkpointing
(which replaces the block's ``forward``, not its ``__call__``: the hook sees the checkpointed
output, and the recomputation in backward runs no hook) and FSDP2 (``fully_shard`` swaps the
block's class, keeping its hooks). Under tensor parallelism a block's output is replicated
over the TP ranks; a replicated DTensor output is read as its local tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.hooks import RemovableHandle

from lightning_kd.models.contract import fsdp_units

__all__ = ["LayerTaps", "block_count", "resolve_layer"]


def block_count(model: nn.Module, role: str) -> int:
    """How many transformer blocks ``model`` lists in ``fsdp_units()``.

    Raises:
        ValueError: when it lists none (no blocks to tap).
    """
    blocks = fsdp_units(model)
    if not blocks:
        raise ValueError(
            f"hidden-state distillation taps the {role}'s transformer blocks, but "
            f"{type(model).__name__} lists none (implement fsdp_units(), see "
            "lightning_kd.models.contract.SupportsFSDP)."
        )
    return len(blocks)


def resolve_layer(index: int, count: int, role: str) -> int:
    """``index`` (negative counts from the end, -1 the last block) as a block number in
    ``[0, count)``.

    Raises:
        ValueError: for an index outside ``[-count, count)``.
    """
    if not -count <= index < count:
        raise ValueError(
            f"{role} layer {index} is out of range: the {role} has {count} blocks (valid "
            f"indices {-count}..{count - 1})."
        )
    return index % count


def _output_tensor(output: Any) -> Tensor:
    """A block's hidden-state output: the tensor itself or the first item of a tuple (older
    transformers decoder layers return ``(hidden_states, ...)``)."""
    if isinstance(output, tuple | list):
        output = output[0]
    if isinstance(output, DTensor):
        if all(isinstance(p, Replicate) for p in output.placements):
            return output.to_local()
        return output.full_tensor()  # sequence-parallel plans shard it
    if not isinstance(output, Tensor):
        raise ValueError(f"a tapped block returned {type(output).__name__}, expected a tensor.")
    return output


class LayerTaps:
    """Forward hooks that keep the outputs of ``layers`` (block numbers) of ``model``.

    Args:
        model: a model with ``fsdp_units()``.
        layers: block numbers, each in ``[-n_blocks, n_blocks)``; duplicates are tapped once.
        role: ``"student"`` or ``"teacher"``, for error messages.

    Raises:
        ValueError: for a model without blocks or a block number out of range.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], role: str) -> None:
        blocks = fsdp_units(model)
        count = block_count(model, role)
        self.role = role
        self.layers = sorted({resolve_layer(i, count, role) for i in layers})
        self._outputs: dict[int, Tensor] = {}
        self._handles: list[RemovableHandle] = [
            blocks[i].register_forward_hook(self._hook(i)) for i in self.layers
        ]

    def _hook(self, index: int):
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self._outputs[index] = _output_tensor(output)

        return keep

    def take(self) -> dict[int, Tensor]:
        """The outputs kept since the last call, ``{block number: [B, S, d]}``, forgotten here.

        Raises:
            ValueError: when a tapped block has not run since the last call (the model was not
                run on this batch, or ran through a path that skips its blocks).
        """
        missing = [i for i in self.layers if i not in self._outputs]
        outputs, self._outputs = self._outputs, {}
        if missing:
            raise ValueError(
                f"no output of the {self.role}'s blocks {missing} since the last hidden-state "
                "loss: run the model's forward (or hidden_states) on the batch first."
            )
        return outputs

    def clear(self) -> None:
        """Forget the kept outputs (e.g. after a generation pass)."""
        self._outputs = {}

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = {}
