"""``KDLoss``: a divergence between teacher and student for knowledge distillation of LMs.

The public loss module. It validates its inputs, selects the valid tokens, picks the
vocabulary-softmax (one process, or a tensor-parallel vocabulary shard) and hands the work to
the chunked engine in :mod:`lightning_kd.losses.engine`: the divergence (forward KL by default,
see :mod:`lightning_kd.losses.divergences`) and, when mixed in with ``kd_ratio < 1``, the
student's hard-label cross-entropy, both in one bounded pass. It imports nothing from
Lightning so that it can be used in any PyTorch training loop.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_kd.checks import check_bool, check_int, check_unit_interval
from lightning_kd.losses.divergences import Divergence, resolve_divergence
from lightning_kd.losses.engine import PassSpec, distill_over_rows
from lightning_kd.losses.input_checks import check_label_range, check_normaliser
from lightning_kd.losses.vocab_parallel import VocabParallelSoftmax, resolve_vocab_parallel


class KDLossOutput(NamedTuple):
    """What :meth:`KDLoss.forward` returns with ``return_per_token=True``.

    Attributes:
        loss: 0-dim tensor, the same value the plain call returns (connected to the student):
            ``kd_ratio · div_loss + (1 − kd_ratio) · ce_loss``.
        per_token_div: [*] detached ``T² · divergence`` per token of the chosen divergence
            (labels' shape, the loss's dtype), 0 where the label is ignored. Read-only alias:
            :attr:`per_token_kl`, its 0.1 name.
        valid_mask: [*] bool, True where ``labels != ignore_index``.
        per_token_ce: [*] detached cross-entropy ``−log softmax(student)[label]`` at
            temperature 1, 0 where ignored, NaN for a valid token whose label is not a
            vocabulary id.
        div_loss: 0-dim detached divergence term, ``Σ per_token_div / normaliser``.
        ce_loss: 0-dim detached cross-entropy term, ``Σ per_token_ce / normaliser``.

    All fields come from the same pass as the loss.
    """

    loss: Tensor
    per_token_div: Tensor
    valid_mask: Tensor
    per_token_ce: Tensor
    div_loss: Tensor
    ce_loss: Tensor

    @property
    def per_token_kl(self) -> Tensor:
        """0.1 name of :attr:`per_token_div` (read-only alias)."""
        return self.per_token_div


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise ValueError(f"temperature must be a real number > 0, got {temperature!r}.")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}.")
    return float(temperature)


class KDLoss(nn.Module):
    """Distillation loss over the tokens whose label is not ``ignore_index``.

    For each valid token, with ``P = softmax(teacher / T)`` and ``Q = softmax(student / T)``,
    the per-token divergence is ``T² · D(P, Q)`` for the chosen ``divergence``:

    - ``forward_kl`` (default): KL(P ‖ Q)
    - ``reverse_kl``: KL(Q ‖ P)
    - ``jsd`` (``beta``, default 0.5): ``β KL(P ‖ M) + (1 − β) KL(Q ‖ M)`` with
      ``M = β P + (1 − β) Q``; ``β = 0`` is KL(P ‖ Q), ``β = 1`` is KL(Q ‖ P) (TRL's GKD)
    - ``tvd``: ½ Σ |P − Q|
    - ``skew_kl`` (``alpha``, default 0.1): KL(P ‖ α P + (1 − α) Q) (DistiLLM)
    - ``skew_reverse_kl`` (``alpha``, default 0.1): KL(Q ‖ α Q + (1 − α) P) (DistiLLM)

    and the loss is ``kd_ratio · divergence + (1 − kd_ratio) · CE``, each term summed over the
    valid tokens and divided by their count (or by ``num_batch_labels``, the valid tokens of a
    whole gradient-accumulation window), where CE is the student's hard-label cross-entropy
    ``−log softmax(student)[label]`` at temperature 1. Both terms come from one chunked pass
    over the same student rows. The gradient flows to the student logits only, in their dtype,
    and is computed analytically during the forward pass, chunk by chunk.

    Args:
        ignore_index: label value of tokens to leave out (padding, prompt tokens).
        temperature: softmax temperature ``T`` (finite, > 0) of the divergence; it is scaled
            by ``T²``. The cross-entropy term always uses temperature 1.
        fp32_upcast: compute softmaxes in fp32 even for bf16/fp16 logits; ``False`` computes in
            the logits' dtype (less memory, less accuracy).
        tp_group: process group over which the vocabulary is sharded, for plain local-shard
            tensors (each rank passes its own vocabulary slice, in rank order). Not needed for
            DTensor logits sharded on the last dim: the group is inferred from their mesh.
        chunk_size: the flattened tokens are processed in windows of ``chunk_size`` positions
            (only their valid tokens are computed); memory then stays at the student gradient
            plus O(chunk_size × V) in forward and backward. 0 processes all tokens at once.
        divergence: a name from the list above (default parameters) or a
            :class:`~lightning_kd.losses.divergences.Divergence` object such as ``JSD(beta=0.3)``.
        kd_ratio: weight of the divergence in [0, 1]; 1 (default) is pure distillation and
            computes no cross-entropy unless ``return_per_token`` asks for it; 0 trains on the
            labels alone and computes no divergence unless ``return_per_token`` asks for it.
            With ``kd_ratio < 1`` the labels of valid tokens must be vocabulary ids.

    Raises:
        ValueError: for a non-positive or non-finite temperature, a negative chunk_size, a
            ``kd_ratio`` outside [0, 1], an unknown divergence name, an object that is not a
            ``Divergence``, or arguments of the wrong type.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        temperature: float = 1.0,
        fp32_upcast: bool = True,
        tp_group: torch.distributed.ProcessGroup | None = None,
        chunk_size: int = 0,
        *,
        divergence: str | Divergence = "forward_kl",
        kd_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        check_int("ignore_index", ignore_index)
        check_int("chunk_size (0 = unchunked)", chunk_size, 0)
        check_bool("fp32_upcast", fp32_upcast)
        self.ignore_index = ignore_index
        self.temperature = _check_temperature(temperature)
        self.fp32_upcast = fp32_upcast
        self.tp_group = tp_group
        self.chunk_size = chunk_size
        self.divergence = resolve_divergence(divergence)
        self.kd_ratio = kd_ratio

    @property
    def kd_ratio(self) -> float:
        """Weight of the divergence in [0, 1] (the rest weighs the cross-entropy); assigning
        it is checked like the constructor argument."""
        return self._kd_ratio

    @kd_ratio.setter
    def kd_ratio(self, value: float) -> None:
        self._kd_ratio = check_unit_interval("kd_ratio", value)

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, kd_ratio={self.kd_ratio}, "
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
            f"fp32_upcast={self.fp32_upcast}, chunk_size={self.chunk_size}, "
            f"tp_group={'set' if self.tp_group is not None else None}"
        )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor,
        num_batch_labels: int | float | Tensor | None = None,
        *,
        return_per_token: bool = False,
    ) -> Tensor | KDLossOutput:
        """Compute the loss.

        Args:
            student_logits: [*, V] floating logits of the student (any strides), or a DTensor
                (vocab-sharded on the last dim for the tensor-parallel path).
            teacher_logits: [*, V] teacher logits of the same shape and kind; no gradient.
            labels: [*] integer labels (plain tensor or replicated DTensor): compared with
                ``ignore_index``, and the cross-entropy targets when that term is computed.
            num_batch_labels: total valid tokens of the gradient-accumulation window (> 0); the
                loss is then ``Σ per-token loss / num_batch_labels`` instead of the mean.
            return_per_token: also return the detached per-token divergence and cross-entropy
                and both terms (see :class:`KDLossOutput`); the cross-entropy is then computed
                even when ``kd_ratio`` is 1.

        Returns:
            A 0-dim tensor (fp32 when ``fp32_upcast`` and the logits are half precision, else
            the logits' dtype), or a :class:`KDLossOutput` when ``return_per_token`` is True.
            With no valid token the loss is a finite 0 that is still connected to the student
            (zero gradient).

        Raises:
            ValueError: on mismatched shapes or kinds, non-floating logits, non-integer labels,
                a non-positive ``num_batch_labels``, or (with ``kd_ratio < 1``) a valid label
                outside ``[0, V)``; raised before any heavy work.
        """
        check_bool("return_per_token", return_per_token)
        student, teacher, labels, vocab = resolve_vocab_parallel(
            student_logits, teacher_logits, labels, self.tp_group
        )
        self._check_inputs(student, teacher, labels)
        normaliser = None if num_batch_labels is None else check_normaliser(num_batch_labels)

        with_ce = self.kd_ratio < 1.0 or return_per_token
        with_div = self.kd_ratio > 0.0 or return_per_token
        valid = labels != self.ignore_index
        if isinstance(vocab, VocabParallelSoftmax):
            vocab.check_same_rows(valid, labels)
        if normaliser is None:
            normaliser = float(max(int(valid.sum()), 1))
        compute_dtype = torch.promote_types(student.dtype, teacher.dtype)
        if self.fp32_upcast:
            compute_dtype = torch.promote_types(compute_dtype, torch.float32)
        spec = PassSpec(
            self.divergence if with_div else None,
            self.temperature,
            normaliser,
            self.chunk_size,
            compute_dtype,
            kd_ratio=self.kd_ratio,
            with_ce=with_ce,
        )
        targets = None
        if with_ce:
            targets = labels.reshape(-1).to(student.device, torch.int64)
            offset, vocab_size = vocab.vocab_range(student.shape[-1], student.device)
            spec = spec._replace(label_offset=offset, vocab_size=vocab_size)
            if self.kd_ratio < 1.0:
                check_label_range(targets, valid, vocab_size)
        out = distill_over_rows(student, teacher, valid, vocab, spec, targets)
        if not return_per_token:
            return out.loss
        flat_valid = valid.reshape(-1).to(out.loss.device)
        per_token = []
        for values in (out.per_token_div, out.per_token_ce):
            full = torch.zeros(valid.shape, dtype=values.dtype, device=values.device)
            full.view(-1)[flat_valid] = values
            per_token.append(full)
        return KDLossOutput(out.loss, per_token[0], valid, per_token[1], out.div_loss, out.ce_loss)

    @staticmethod
    def _check_inputs(student: Tensor, teacher: Tensor, labels: Tensor) -> None:
        for name, x in (("student_logits", student), ("teacher_logits", teacher)):
            if not isinstance(x, Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(x).__name__}.")
            if not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
            if x.ndim < 1:
                raise ValueError(f"{name} must have shape [*, V], got a 0-dim tensor.")
        if student.shape != teacher.shape:
            raise ValueError(
                "student_logits and teacher_logits must have the same shape [*, V], got "
                f"{tuple(student.shape)} and {tuple(teacher.shape)}."
            )
        if student.device != teacher.device:
            raise ValueError(
                "student_logits and teacher_logits must be on the same device, got "
                f"{student.device} and {teacher.device}."
            )
        if not isinstance(labels, Tensor):
            raise ValueError(f"labels must be an integer tensor, got {type(labels).__name__}.")
        if labels.shape != student.shape[:-1]:
            raise ValueError(
                f"labels must have the logits' leading shape {tuple(student.shape[:-1])}, got "
                f"{tuple(labels.shape)}."
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}.")
