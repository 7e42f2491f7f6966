"""``CausalLMModule``: plain next-token training of one language model (no teacher).

The demo uses it to train its teacher from scratch; users can use it to pre-train or fine-tune
a model before distilling it. Its checkpoints store the model under ``model.``, which is what
``DistillationModule(teacher_checkpoint=..., teacher_checkpoint_prefix="model.")`` reads.

It is deliberately plain: one device or DDP (``strategy="ddp"``). It applies no TP plan and no
FSDP2, so under ``ModelParallelStrategy`` with several data-parallel ranks the replicas would
not be synchronised; train large teachers with a training stack built for that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from lightning_kd.losses.cross_entropy import token_cross_entropy
from lightning_kd.models.contract import packing_kwargs
from lightning_kd.training.loss_terms import logits_of
from lightning_kd.training.optim import build_optimizers, default_optimizer


class CausalLMModule(LightningModule):
    """Train ``model`` on next-token cross-entropy (per-token mean over valid labels).

    Batches are dicts with ``input_ids`` [B, S] and already-shifted ``labels`` [B, S], and
    ``position_ids`` [B, S] for packed documents (passed to the model, which must isolate
    them: see :class:`~lightning_kd.models.contract.SupportsPackedSequences`).

    Args:
        model: the language model, or a zero-argument factory built in ``configure_model``.
        optimizer: builds the optimizer from the model's parameters; default AdamW(lr=1e-3).
        lr_scheduler: optional scheduler factory (stepped every optimizer step).
        ignore_index: label value that is not trained on.
    """

    def __init__(
        self,
        model: Callable[[], nn.Module] | nn.Module,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self._factory = None if isinstance(model, nn.Module) else model
        self.model = model if isinstance(model, nn.Module) else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.ignore_index = ignore_index

    @override
    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._factory()

    def export_model(self, build: bool = False) -> tuple[nn.Module | None, str]:
        """(the model, ``"model."``: its key prefix in checkpoints), for export; with
        ``build``, built from its factory when it is not built yet."""
        if self.model is None and build:
            return self._factory(), "model."
        return self.model, "model."

    def _loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        kwargs = packing_kwargs(self.model, "model", "forward", batch)
        logits = logits_of(self.model(batch["input_ids"], **kwargs))
        tokens = max(int((batch["labels"] != self.ignore_index).sum()), 1)
        return token_cross_entropy(logits, batch["labels"], self.ignore_index) / tokens

    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", math.exp(min(loss.item(), 50.0)), sync_dist=True)

    @override
    def configure_optimizers(self) -> Any:
        return build_optimizers(
            self.model.parameters(), self.optimizer_factory, self.lr_scheduler_factory
        )
