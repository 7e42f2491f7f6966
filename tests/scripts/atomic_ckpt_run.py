"""A tiny TP=2 distillation run that saves ``last.ckpt`` with AtomicModelParallelStrategy and
can SIGKILL the whole job at a chosen moment of a chosen save (tests/test_checkpoint_atomic.py).

Run as a script: Lightning's ModelParallelStrategy launches rank 1 by re-running it. Rank 0
appends ``{"step", "loss"}`` to ``<out>/losses.jsonl`` after every optimizer step (so a killed
run still reports what it trained), writes ``<out>/killed.json`` just before a kill, and
``<out>/result.json`` plus ``<out>/student.pt`` (the full student weights) at the end of a run
that was not killed. The caller must start it in a new session (process group): the kill is
``killpg`` of rank 0's group, which holds every rank and nothing else.

Kill phases (all at save number ``--kill-at-save`` of this process, counting every save):

- ``shards``: rank 0 has written its shard files, DCP's ``.metadata`` is not written yet
  (rank 1 may still be writing);
- ``after_shards``, ``after_metadata``, ``after_marker``: once that file is written;
- ``between_renames``: the old checkpoint is renamed aside, the new one not yet in place;
- ``after_renames``: the new one is in place, the old one not yet removed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.tensor import DTensor

from lightning_kd import DistillationModule, KDLoss
from lightning_kd.checkpoint.strategy import AtomicModelParallelStrategy
from lightning_kd.cli import shutdown_distributed
from lightning_kd.data.sampler import ResumableDataLoader, ResumableSampler
from tests.helpers.distributed import exit_now
from tests.scripts.fit_run import RandomTokens, make_models

PHASES = (
    "shards",
    "after_shards",
    "after_metadata",
    "after_marker",
    "between_renames",
    "after_renames",
)


def kill_job(out: Path, phase: str, save: int) -> None:
    """Record where, then SIGKILL every process of this job (rank 0's process group)."""
    (out / "killed.json").write_text(json.dumps({"phase": phase, "save": save}))
    os.killpg(os.getpgid(0), signal.SIGKILL)


class KillingWriter(FileSystemWriter):
    """Kills the job on rank 0 once its own shards are written, before DCP's ``.metadata``."""

    def __init__(self, path: Path, out: Path, save: int) -> None:
        super().__init__(path, sync_files=True)
        self.out, self.save = out, save

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)
        written.wait()
        if torch.distributed.get_rank() == 0:
            kill_job(self.out, "shards", self.save)
        return written


class KillingStrategy(AtomicModelParallelStrategy):
    """AtomicModelParallelStrategy that SIGKILLs the job at ``phase`` of save ``at_save``."""

    def __init__(self, phase: str | None, at_save: int, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.phase, self.at_save, self.out = phase, at_save, out
        self.saves = 0
        self.sealed = False  # the marker of the current save is written (not a roll-forward)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        self.saves += 1
        self.sealed = False
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _kill_if(self, phase: str) -> None:
        if self.phase == phase and self.saves == self.at_save and self.global_rank == 0:
            kill_job(self.out, phase, self.saves)

    def _storage_writer(self, staged):
        if self.phase == "shards" and self.saves == self.at_save:
            return KillingWriter(staged, self.out, self.saves)
        return super()._storage_writer(staged)

    def _write_shards(self, checkpoint, staged):
        super()._write_shards(checkpoint, staged)
        self._kill_if("after_shards")

    def _write_metadata(self, checkpoint, staged):
        super()._write_metadata(checkpoint, staged)
        self._kill_if("after_metadata")

    def _write_marker(self, checkpoint, staged, **kwargs):
        super()._write_marker(checkpoint, staged, **kwargs)
        self.sealed = True
        self._kill_if("after_marker")

    def _move_aside(self, path, aside):
        super()._move_aside(path, aside)
        if self.sealed:
            self._kill_if("between_renames")

    def _move_into_place(self, staged, path):
        super()._move_into_place(staged, path)
        if self.sealed:
            self._kill_if("after_renames")


class LossLog(Callback):
    """Rank 0 appends each optimizer step's KD loss to a JSON-lines file (survives SIGKILL)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0:
            loss = float(trainer.callback_metrics["train/kd_loss"])
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": loss}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="folder for losses.jsonl, result.json, ...")
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=2, help="ModelCheckpoint interval (steps)")
    parser.add_argument("--top-k", type=int, default=0, help="ModelCheckpoint save_top_k")
    parser.add_argument("--samples", type=int, default=48, help="4 per batch: 12 batches/epoch")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--kill-phase", choices=PHASES, default=None)
    parser.add_argument("--kill-at-save", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    L.seed_everything(0, verbose=False)
    student, teacher = make_models()
    module = DistillationModule(
        student,
        teacher,
        loss=KDLoss(chunk_size=5, temperature=2.0, kd_ratio=0.7),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    strategy = KillingStrategy(
        args.kill_phase, args.kill_at_save, out, data_parallel_size=1, tensor_parallel_size=2
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=args.steps,
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
        callbacks=[
            LossLog(out / "losses.jsonl"),
            ModelCheckpoint(
                args.ckpt_dir,
                save_last=True,
                every_n_train_steps=args.every,
                save_top_k=args.top_k,
            ),
        ],
    )
    # One epoch of 12 batches: every save is mid-epoch, and the resumable loader makes a
    # resumed run continue with exactly the batches an uninterrupted run sees. (Chained
    # resumes from checkpoints taken at the last batch of an epoch diverge in Lightning 2.6:
    # its epoch counters come out differently after a resume.) TP ranks share the batches.
    dataset = RandomTokens(args.samples)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = ResumableDataLoader(dataset, batch_size=4, sampler=sampler)
    trainer.fit(module, loader, ckpt_path=args.resume)

    student_state = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
        for k, v in module.student.state_dict().items()
    }
    if trainer.global_rank == 0:
        torch.save(student_state, out / "student.pt")
        result = {"global_step": trainer.global_step, "saves": strategy.saves}
        (out / "result.json").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_now(0)  # see tests/helpers/distributed.py: no gloo teardown abort after success
