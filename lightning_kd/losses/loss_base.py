"""What every distillation loss of this package shares: its options (one
:class:`~lightning_kd.losses.options.KDOptions` value), the steps around the chunked pass, and
its per-token output.

:class:`KDLossBase` is the base of :class:`~lightning_kd.KDLoss` (logits),
:class:`~lightning_kd.losses.LinearKDLoss` (hidden states and lm_head weights) and
:class:`~lightning_kd.losses.TopKKDLoss` (a cached top-k teacher). It is not a loss itself: the
subclasses' ``forward`` methods take different inputs. Imports nothing from Lightning.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from typing_extensions import Self

from lightning_kd.checks import check_bool, check_unit_interval
from lightning_kd.losses.divergences import Divergence
from lightning_kd.losses.engine import PassOutput
from lightning_kd.losses.options import KDOptions
from lightning_kd.losses.vocab_parallel import VocabParallelSoftmax
from lightning_kd.losses.vocab_softmax import VocabSoftmax


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


class _Derivation(NamedTuple):
    """How a derived loss's options follow its source loss: the source's current options with
    ``changes`` applied."""

    source: KDLossBase
    changes: dict[str, Any]


class KDLossBase(nn.Module):
    """The options of a distillation loss (one :class:`~lightning_kd.losses.options.KDOptions`
    value, see :class:`~lightning_kd.KDLoss` for each) and the helpers its ``forward`` uses
    around the chunked pass.

    The options read as attributes (``loss.temperature``, ...) and are fixed, except
    ``kd_ratio``, which may be assigned at run time (e.g. annealed by a callback). A loss made
    with :meth:`from_options` from another loss follows that loss's options: an assignment of
    its ``kd_ratio`` reaches the derived loss at its next call.

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
        options = KDOptions(
            ignore_index, temperature, fp32_upcast, tp_group, chunk_size,
            divergence=divergence, kd_ratio=kd_ratio,
        )  # fmt: skip
        self._options = self.check_options(options)
        self._derivation: _Derivation | None = None
        self._derived_from: KDOptions | None = None  # the source options _options came from

    @classmethod
    def from_options(cls, source: KDOptions | KDLossBase, **changes: Any) -> Self:
        """A loss of this class with the options ``source`` gives, ``changes`` applied.

        Args:
            source: an options value (copied), or a loss whose options the new loss follows:
                assigning ``source.kd_ratio`` later changes the new loss's too, unless
                ``changes`` (or an assignment of the new loss's own ``kd_ratio``) sets it.
            **changes: options to set, e.g. ``kd_ratio=0.0`` or ``chunk_size=1024``.

        Raises:
            ValueError: for a source that is neither, an unknown option, or a value this class
                refuses (e.g. a divergence ``TopKKDLoss`` does not support).
        """
        if isinstance(source, KDOptions):
            return cls(**source.replace(**changes).as_kwargs())
        if not isinstance(source, KDLossBase):
            raise ValueError(
                f"source must be a KDOptions or a distillation loss, got {type(source).__name__}."
            )
        loss = cls(**source.options.replace(**changes).as_kwargs())
        loss.follow(source, **changes)
        return loss

    def follow(self, source: KDLossBase, **changes: Any) -> None:
        """From now on, take the options of ``source`` as they are at each call, with
        ``changes`` applied (what :meth:`from_options` does with a loss).

        Raises:
            ValueError: for an unknown option, or options this loss refuses.
        """
        options = self.check_options(source.options.replace(**changes))
        self._derivation = _Derivation(source, dict(changes))
        self._options, self._derived_from = options, source.options

    def check_options(self, options: KDOptions) -> KDOptions:
        """``options`` if this loss supports them (subclasses refuse what they cannot do).

        Raises:
            ValueError: for options this loss does not support.
        """
        return options

    @property
    def options(self) -> KDOptions:
        """The loss's options (a frozen value; for a derived loss, its source's as of now)."""
        derivation = self._derivation
        if derivation is not None:
            current = derivation.source.options
            if current is not self._derived_from:
                self._options = self.check_options(current.replace(**derivation.changes))
                self._derived_from = current
        return self._options

    @property
    def ignore_index(self) -> int:
        return self.options.ignore_index

    @property
    def temperature(self) -> float:
        return self.options.temperature

    @property
    def fp32_upcast(self) -> bool:
        return self.options.fp32_upcast

    @property
    def tp_group(self) -> torch.distributed.ProcessGroup | None:
        return self.options.tp_group

    @property
    def chunk_size(self) -> int:
        return self.options.chunk_size

    @property
    def divergence(self) -> Divergence:
        return self.options.divergence

    @property
    def kd_ratio(self) -> float:
        """Weight of the divergence in [0, 1] (the rest weighs the cross-entropy); assigning
        it is checked like the constructor argument (and, on a derived loss, stops it
        following its source's)."""
        return self.options.kd_ratio

    @kd_ratio.setter
    def kd_ratio(self, value: float) -> None:
        value = check_unit_interval("kd_ratio", value)
        if self._derivation is not None:
            source, changes = self._derivation
            self._derivation = _Derivation(source, {**changes, "kd_ratio": value})
        self._options = self.options.replace(kd_ratio=value)

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, kd_ratio={self.kd_ratio}, "
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
            f"fp32_upcast={self.fp32_upcast}, chunk_size={self.chunk_size}, "
            f"tp_group={'set' if self.tp_group is not None else None}"
        )

    def mixed_terms(self, return_per_token: bool) -> tuple[bool, bool]:
        """``(with_ce, with_div)``: which terms the pass computes. Both for per-token outputs;
        else the CE only with ``kd_ratio < 1`` and the divergence only with ``kd_ratio > 0``."""
        check_bool("return_per_token", return_per_token)
        return self.kd_ratio < 1.0 or return_per_token, self.kd_ratio > 0.0 or return_per_token

    def compute_dtype(self, *dtypes: torch.dtype) -> torch.dtype:
        """The dtype of the softmaxes and buffers: the inputs' promoted dtype, at least fp32
        with ``fp32_upcast``."""
        dtype = dtypes[0]
        for other in dtypes[1:]:
            dtype = torch.promote_types(dtype, other)
        return torch.promote_types(dtype, torch.float32) if self.fp32_upcast else dtype

    def valid_tokens(
        self, labels: Tensor, vocab: VocabSoftmax, normaliser: float | None
    ) -> tuple[Tensor, float]:
        """``(valid, normaliser)``: the mask of tokens whose label is not ``ignore_index``
        (checked to be the same on every rank of a vocabulary-parallel group, labels
        included) and the denominator, ``normaliser`` or the number of valid tokens."""
        valid = labels != self.ignore_index
        if isinstance(vocab, VocabParallelSoftmax):
            vocab.check_same_rows(valid, labels)
        if normaliser is None:
            normaliser = float(max(int(valid.sum()), 1))
        return valid, normaliser

    @staticmethod
    def output(out: PassOutput, valid: Tensor, return_per_token: bool) -> Tensor | KDLossOutput:
        """The pass's loss, or with ``return_per_token`` the :class:`KDLossOutput` with the
        per-token values scattered back to the labels' shape (0 where ignored)."""
        if not return_per_token:
            return out.loss
        flat_valid = valid.reshape(-1).to(out.loss.device)
        per_token = []
        for values in (out.per_token_div, out.per_token_ce):
            full = torch.zeros(valid.shape, dtype=values.dtype, device=values.device)
            full.view(-1)[flat_valid] = values
            per_token.append(full)
        return KDLossOutput(out.loss, per_token[0], valid, per_token[1], out.div_loss, out.ce_loss)
