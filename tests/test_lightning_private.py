"""Each accessor of lightning_kd.lightning_private against the installed Lightning, with
real (tiny) Trainer fits: a Lightning upgrade that moves or redefines what an accessor reads
fails here, loudly, instead of silently shifting the callbacks' logging steps."""

from __future__ import annotations

import re
from types import SimpleNamespace

import lightning
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from lightning_kd.lightning_private import logged_step


class Boring(L.LightningModule):
    """One parameter, a constant batch, ``x`` logged on every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def training_step(self, batch, batch_idx):
        loss = (self.weight * batch).sum()
        self.log("x", float(batch_idx))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(64, 3), batch_size=2)


class TwoOptimizers(Boring):
    """Manual optimization with two optimizers: two optimizer steps per batch, so
    ``trainer.global_step`` runs twice as fast as the batches the loggers count."""

    def __init__(self) -> None:
        super().__init__()
        self.other = torch.nn.Parameter(torch.ones(3))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt, weight in zip(self.optimizers(), (self.weight, self.other), strict=True):
            opt.zero_grad()
            self.manual_backward((weight * batch).sum())
            opt.step()
        self.log("x", float(batch_idx))

    def configure_optimizers(self):
        return [torch.optim.SGD([self.weight], lr=0.1), torch.optim.SGD([self.other], lr=0.1)]


class StepLogger(Logger):
    """Keeps the step each ``log_metrics`` call of Lightning's own ``self.log`` came with."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    @property
    def name(self) -> str:
        return "steps"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if "x" in metrics:
            self.steps.append(step)


class Probe(L.Callback):
    """``logged_step`` and ``global_step`` as a callback sees them at each batch end."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((logged_step(trainer), trainer.global_step))


def _fit(module, tmp_path, **kwargs) -> tuple[L.Trainer, Probe, StepLogger]:
    probe, logger = Probe(), StepLogger()
    ckpt_path = kwargs.pop("ckpt_path", None)
    callbacks = [probe, *kwargs.pop("callbacks", [])]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, probe, logger


def test_logged_step_counts_optimizer_steps_with_gradient_accumulation(tmp_path):
    steps = 3
    trainer, probe, logger = _fit(Boring(), tmp_path, max_steps=steps, accumulate_grad_batches=2)
    assert trainer.global_step == steps
    assert logged_step(trainer) == steps
    # At each batch end (where the per-token callbacks log): the batches that stepped before it.
    assert probe.seen == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3)]
    # Lightning sends `self.log` values to the loggers at the batches that step the optimizer,
    # with the step a callback reads there.
    assert logger.steps == [s for s, _ in probe.seen[1::2]] == [0, 1, 2]


def test_logged_step_counts_batches_not_optimizer_steps_with_two_optimizers(tmp_path):
    batches = 3
    trainer, probe, logger = _fit(TwoOptimizers(), tmp_path, max_steps=2 * batches)
    assert trainer.global_step == 2 * batches  # global_step: optimizer steps
    assert logged_step(trainer) == batches  # logged_step: batches that stepped
    assert [s for s, _ in probe.seen] == list(range(batches))
    assert logger.steps == list(range(batches))


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_logged_step_continues_after_a_resume(tmp_path):
    ckpt = ModelCheckpoint(tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    _fit(Boring(), tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[ckpt])
    trainer, probe, logger = _fit(
        Boring(), tmp_path, max_steps=4, accumulate_grad_batches=2,
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )  # fmt: skip
    assert logged_step(trainer) == trainer.global_step == 4
    assert probe.seen == [(2, 2), (2, 3), (3, 3), (3, 4)]
    assert logger.steps == [s for s, _ in probe.seen[1::2]] == [2, 3]


def test_a_moved_attribute_fails_with_the_lightning_version():
    stand_in = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace()))
    version = re.escape(lightning.__version__)
    with pytest.raises(RuntimeError, match=rf"Lightning {version} .*_batches_that_stepped"):
        logged_step(stand_in)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=rf"Lightning {version} "):
        logged_step(SimpleNamespace())  # type: ignore[arg-type]
