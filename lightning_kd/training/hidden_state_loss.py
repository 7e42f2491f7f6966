"""``HiddenStateLoss``: intermediate-layer distillation, a loss term on hidden states.

Pairs of (student block, teacher block) are compared after each block (the residual stream,
before the final norm) with a distance of :mod:`lightning_kd.losses.hidden_state` (MSE,
cosine, normalised MSE). When the widths differ, a learned linear map (no bias) takes the
student's width to the teacher's, one per pair (DistillKit's projection). The term is

    hidden_loss = weight · mean over pairs of (per-token mean distance over the valid tokens)

and :class:`~lightning_kd.DistillationModule` adds it to the logit loss (``train/loss`` is the
total; ``train/hidden_loss`` and ``train/hidden/s<i>_t<j>`` each term).

Only the chosen blocks' outputs are kept (forward hooks, :mod:`lightning_kd.models.layer_taps`),
so it works with the live and the fused-head teacher alike, with activation checkpointing,
tensor parallelism (block outputs are replicated over the TP ranks) and FSDP2 (the module
shards the projections over the data-parallel mesh like any trainable module it holds beside
the student). The projections are part of the module's checkpoints and resume with it; they are
not part of the student, so exporting the student drops them.

Lifecycle: the module calls :meth:`HiddenStateLoss.attach` once the models are built (before
parallelisation): it resolves the pairs, builds the projections (seeded by ``seed``, so every
rank and every parallel layout starts from the same ones) and registers the hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_kd.losses.hidden_state import check_distance, hidden_state_distance
from lightning_kd.models.layer_taps import LayerTaps, block_count, resolve_layer

__all__ = ["HiddenStateLoss", "HiddenStateTerms", "evenly_spaced_pairs"]


def evenly_spaced_pairs(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """Every student block paired with the teacher block at the same relative depth: student
    block ``i`` (of ``n_s``) with teacher block ``round((i + 1) · n_t / n_s) - 1``, so the last
    blocks pair up (e.g. 2 student and 4 teacher blocks: ``[(0, 1), (1, 3)]``)."""
    return [
        (i, max(0, round((i + 1) * teacher_blocks / student_blocks) - 1))
        for i in range(student_blocks)
    ]


class HiddenStateTerms(NamedTuple):
    """What :meth:`HiddenStateLoss.forward` returns.

    Attributes:
        loss: 0-dim fp32, ``weight ·`` the mean of the pairs' distances (connected to the student
            and the projections).
        pairs: ``{"s<i>_t<j>": 0-dim fp32}``, each pair's per-token mean distance (detached).
    """

    loss: Tensor
    pairs: dict[str, Tensor]


class HiddenStateLoss(nn.Module):
    """A loss term on intermediate hidden states, for ``DistillationModule(hidden_state_loss=)``.

    Args:
        pairs: ``[[student block, teacher block], ...]`` (negative numbers count from the
            last block, -1). None: every student block with the teacher block at the same
            relative depth (:func:`evenly_spaced_pairs`).
        distance: ``"mse"``, ``"cosine"`` or ``"normalized_mse"`` (see
            :mod:`lightning_kd.losses.hidden_state`).
        weight: the term's weight (>= 0) beside the logit loss.
        seed: seeds the projections' initialisation (the same on every rank and layout).

    Raises:
        ValueError: for an unknown distance, a negative weight, an empty or malformed
            ``pairs``; at :meth:`attach`, for block numbers outside a model.
    """

    def __init__(
        self,
        pairs: Sequence[Sequence[int]] | None = None,
        distance: str = "mse",
        weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.distance = check_distance(distance)
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"weight must be a number >= 0, got {weight!r}.")
        self.weight = float(weight)
        if pairs is not None:
            pairs = [tuple(p) for p in pairs]
            if not pairs or any(
                len(p) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in p)
                for p in pairs
            ):
                raise ValueError(
                    "pairs must be a non-empty list of [student block, teacher block] integer "
                    f"pairs, got {pairs!r}."
                )
        self.requested_pairs: list[tuple[int, int]] | None = pairs
        self.seed = int(seed)
        self.pairs: list[tuple[int, int]] = []  # resolved at attach
        self.projections: nn.ModuleList | None = None
        self._taps: dict[str, LayerTaps] = {}

    # ------------------------------------------------------------------ set-up
    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Resolve the pairs on the built models, build the projections when the widths differ
        and register the hooks (idempotent: a second call changes nothing).

        Raises:
            ValueError: for models without blocks or widths, or block numbers out of range.
        """
        if self._taps:
            return
        counts = {role: block_count(m, role) for role, m in (("student", student),
                                                             ("teacher", teacher))}  # fmt: skip
        requested = self.requested_pairs or evenly_spaced_pairs(counts["student"],
                                                                counts["teacher"])  # fmt: skip
        self.pairs = [
            (resolve_layer(s, counts["student"], "student"),
             resolve_layer(t, counts["teacher"], "teacher"))
            for s, t in requested
        ]  # fmt: skip
        widths = (model_width(student, "student"), model_width(teacher, "teacher"))
        if widths[0] != widths[1] and self.projections is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.projections = nn.ModuleList(
                    nn.Linear(widths[0], widths[1], bias=False) for _ in self.pairs
                )
        self._taps = {
            "student": LayerTaps(student, [s for s, _ in self.pairs], "student"),
            "teacher": LayerTaps(teacher, [t for _, t in self.pairs], "teacher"),
        }

    def detach_hooks(self) -> None:
        """Remove the hooks (:meth:`attach` registers them again)."""
        for taps in self._taps.values():
            taps.remove()
        self._taps = {}

    def settings(self) -> dict[str, object]:
        """What a checkpoint records about the term (compared on load)."""
        return {
            "pairs": self.requested_pairs,
            "distance": self.distance,
            "weight": self.weight,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ per step
    def collect(self) -> tuple[list[Tensor], list[Tensor]]:
        """The tapped outputs of the last forwards, in pair order: (student [B, S, d_s] each,
        teacher [B, S, d_t] each, detached); forgotten by the taps.

        Raises:
            ValueError: before :meth:`attach`, or when a model did not run since the last call.
        """
        if not self._taps:
            raise ValueError("HiddenStateLoss.attach(student, teacher) must be called first.")
        student, teacher = self._taps["student"].take(), self._taps["teacher"].take()
        return (
            [student[s] for s, _ in self.pairs],
            [teacher[t].detach() for _, t in self.pairs],
        )

    def forward(
        self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], valid_mask: Tensor
    ) -> HiddenStateTerms:
        """The term from the pairs' hidden states.

        Args:
            student_hidden: per pair, [B, S, d_s] (any float dtype; the gradient flows back).
            teacher_hidden: per pair, [B, S, d_t].
            valid_mask: [B, S] bool, the tokens that count.

        Returns:
            :class:`HiddenStateTerms`.

        Raises:
            ValueError: for a number of tensors other than the number of pairs, or shapes that
                do not match after the projection.
        """
        if not len(student_hidden) == len(teacher_hidden) == len(self.pairs):
            raise ValueError(
                f"expected {len(self.pairs)} student and teacher hidden states (one per pair), "
                f"got {len(student_hidden)} and {len(teacher_hidden)}."
            )
        distances = []
        for k, (s, t) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
            if self.projections is not None:
                s = self.projections[k](s.to(self.projections[k].weight.dtype))
            distances.append(hidden_state_distance(s, t, valid_mask, self.distance))
        loss = self.weight * torch.stack(distances).mean()
        names = [f"s{s}_t{t}" for s, t in self.pairs]
        return HiddenStateTerms(
            loss, {n: d.detach() for n, d in zip(names, distances, strict=True)}
        )

    def extra_repr(self) -> str:
        pairs = self.pairs or self.requested_pairs or "evenly spaced"
        return f"pairs={pairs}, distance={self.distance!r}, weight={self.weight}"


def model_width(model: nn.Module, role: str) -> int:
    """The width of the model's hidden states: the input width of its ``output_head()``
    (TinyLlama, HFCausalLM), else a Hugging Face ``config.hidden_size``.

    Raises:
        ValueError: when neither is there.
    """
    head = getattr(model, "output_head", None)
    if callable(head):
        weight = getattr(head(), "weight", None)
        if isinstance(weight, Tensor) and weight.ndim == 2:
            return int(weight.shape[1])
    config = getattr(getattr(model, "model", model), "config", None)
    width = getattr(config, "hidden_size", None)
    if isinstance(width, int):
        return width
    raise ValueError(
        f"cannot tell the hidden width of the {role} ({type(model).__name__}): implement "
        "output_head() (see lightning_kd.models.contract.SupportsFusedHead)."
    )
