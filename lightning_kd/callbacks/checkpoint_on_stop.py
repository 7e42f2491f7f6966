"""``CheckpointOnStop``: nothing lost when a run is preempted, interrupted or simply ends.

Schedulers stop jobs with SIGTERM (``timeout``, Kubernetes, SLURM preemption) and people with
Ctrl-C (SIGINT). Lightning on its own ends a SIGTERM-ed fit with exit status 0 and keeps only the
last periodic checkpoint. This callback:

- catches SIGTERM and SIGINT, finishes the training step in flight, saves ``last.ckpt`` (a
  resumable checkpoint with the model, optimizer, loop and data-loader state) and ends the
  process with status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), so schedulers,
  scripts and CI see an interruption, not a success;
- saves ``last.ckpt`` at the end of a successful fit, so the final step is in it whatever the
  periodic interval (30 steps with saves every 25 would otherwise leave step 25).

With several processes the decision to stop is all-reduced at every training-step boundary
(one int), so every rank saves the same step together even when only one received the signal
(e.g. Lightning's launcher process). A signal that arrives outside training steps (sanity
check, validation) stops the run at the next training step; before training starts it ends
the run at once with the same exit status and no checkpoint.

It also guards the checkpoint folders. When fit starts, every checkpoint folder is created and
checked to be writable (a ``ValueError`` naming it otherwise, before any training), and the
folder of ``last.ckpt`` is locked for this run (:class:`~lightning_kd.checkpoint.FolderLock`):
a second fit started in the same folder is refused instead of silently overwriting this one's
``last.ckpt``. The lock is released when the fit ends, fails or is stopped. After each save,
the checkpoint is checked to be on disk (Lightning's file save swallows ``PermissionError``).
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_kd.checkpoint.layout import file_signature, not_written_message
from lightning_kd.checkpoint.lock import FolderLock
from lightning_kd.io import ensure_writable_dir

#: The signals a run stops on, with a checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    """Raised to end a run that a signal stopped; its ``code`` is ``128 + signal number``."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class CheckpointOnStop(Callback):
    """Save ``last.ckpt`` when SIGTERM/SIGINT stops training (then exit 128 + signal) and at
    the end of a successful fit.

    Args:
        dirpath: where ``last.ckpt`` goes; default the ``dirpath`` of the trainer's
            ``ModelCheckpoint`` (so ``--ckpt_path last`` finds it), else
            ``<default_root_dir>/checkpoints``.
        save_at_end: also save ``last.ckpt`` when fit ends normally.
    """

    def __init__(self, dirpath: str | None = None, save_at_end: bool = True) -> None:
        self.dirpath = dirpath
        self.save_at_end = save_at_end
        self.received: int | None = None  # the signal number, once one arrived
        self._previous: dict[int, Any] = {}
        self._saved_step: int | None = None
        self._lock: FolderLock | None = None

    # ------------------------------------------------------------------ signals
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            rank_zero_info(
                f"Received {signal.Signals(signum).name}: saving a checkpoint at the end of the "
                "current training step, then stopping."
            )
        self.received = signum

    def _install(self) -> None:
        for sig in STOP_SIGNALS:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.received = None
            self._saved_step = None
            self._install()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registers its own SIGTERM handler after setup; ours takes over from here,
        # so that the stop happens at a step boundary we choose, on every rank together.
        if self.received is not None:
            raise Stopped(self.received)
        signal.signal(signal.SIGTERM, self._handle)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()
            self._unlock()

    # ------------------------------------------------------------------ folders
    def _folders(self, trainer: Trainer) -> list[Path]:
        """The checkpoint folders of this run: ``last.ckpt``'s first."""
        folders = [self.last_path(trainer).parent]
        for callback in trainer.checkpoint_callbacks:
            dirpath = callback.dirpath if isinstance(callback, ModelCheckpoint) else None
            if dirpath and "://" not in str(dirpath):  # remote folders: fsspec's business
                folders.append(Path(dirpath))
        return list(dict.fromkeys(folders))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After ModelCheckpoint.setup has resolved its folder, before any training step.
        problem = None
        if trainer.is_global_zero:
            try:
                folders = self._folders(trainer)
                for folder in folders:
                    ensure_writable_dir(folder, "checkpoint folder")
                self._lock = FolderLock(folders[0])
                self._lock.acquire()
            except ValueError as error:
                problem = str(error)
            except OSError as error:  # e.g. a filesystem without hard links
                folder = self.last_path(trainer).parent
                problem = f"cannot lock the checkpoint folder {str(folder)!r}: {error}"
        problem = trainer.strategy.broadcast(problem)  # every rank fails together
        if problem is not None:
            raise ValueError(problem)

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ saving
    def last_path(self, trainer: Trainer) -> Path:
        """Where ``last.ckpt`` is written."""
        dirpath = self.dirpath
        if dirpath is None:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                    dirpath = callback.dirpath
                    break
        if dirpath is None:
            dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        name = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
        return Path(dirpath) / name

    def _save(self, trainer: Trainer) -> None:
        if self._saved_step == trainer.global_step:
            return
        path = self.last_path(trainer)
        before = file_signature(path) if trainer.is_global_zero else None  # e.g. a resumed run's
        trainer.save_checkpoint(path, weights_only=False)  # the full state: optimizer, loops
        problem = not_written_message(path, before) if trainer.is_global_zero else None
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise ValueError(problem)
        self._saved_step = trainer.global_step
        rank_zero_info(f"Saved {path} at step {trainer.global_step}.")

    def save_last(self, trainer: Trainer) -> Path:
        """Save ``last.ckpt`` now (every rank; e.g. a teacher that stops the run at a step
        boundary) and return its path.

        Raises:
            ValueError: when the checkpoint did not reach the disk.
        """
        self._save(trainer)
        return self.last_path(trainer)

    def _stop_requested(self, trainer: Trainer) -> int | None:
        """The signal to stop on, agreed by every rank (the largest signal number any got)."""
        local = self.received or 0
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([local], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        return local or None

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = self._stop_requested(trainer)
        if signum is None:
            return
        self.received = signum
        self._save(trainer)
        raise Stopped(signum)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        signum = self._stop_requested(trainer)  # e.g. a signal during the final validation
        if self.save_at_end or signum is not None:
            self._save(trainer)
        if signum is not None:
            raise Stopped(signum)

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        self._unlock()
