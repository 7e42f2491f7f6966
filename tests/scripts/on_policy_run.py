"""A small on-policy distillation run for tests/test_on_policy.py (run as a script: Lightning's
ModelParallelStrategy launches the other ranks by re-running it).

Writes a JSON file (rank 0) with the per-step KD losses, which steps used student samples, and
the student's final weights digest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from lightning_kd import DistillationModule, KDLoss
from lightning_kd.cli import shutdown_distributed
from lightning_kd.training.on_policy import OnPolicySequences
from tests.helpers.distributed import exit_now
from tests.scripts.fit_run import RandomTokens, make_hf_models, make_models


class Recorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.student_samples: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.losses.append(float(metrics["train/kd_loss"]))
        self.student_samples.append(float(metrics["train/student_samples"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lmbda", type=float, default=0.5)
    parser.add_argument("--seq-kd", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling; 0: greedy")
    parser.add_argument("--family", default="tiny", help="tiny (TinyLlama) or an HF model_type")
    parser.add_argument("--divergence", default="reverse_kl")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--ckpt-dir", default=None, help="checkpoint every 2 steps here")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    student, teacher = make_models() if args.family == "tiny" else make_hf_models(args.family)
    on_policy = OnPolicySequences(lmbda=args.lmbda, seq_kd=args.seq_kd, max_new_tokens=6,
                                  temperature=args.temperature, seed=3)  # fmt: skip
    module = DistillationModule(
        student, teacher, loss=KDLoss(temperature=2.0, divergence=args.divergence),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), on_policy=on_policy,
    )  # fmt: skip
    strategy = "auto"
    if args.devices > 1:
        strategy = ModelParallelStrategy(data_parallel_size=args.dp, tensor_parallel_size=args.tp)
    recorder = Recorder()
    callbacks: list[Callback] = [recorder]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(args.ckpt_dir, every_n_train_steps=2, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
        logger=False, enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        deterministic=True,
    )  # fmt: skip
    dataset = RandomTokens(args.samples)
    sampler = None
    if args.devices == 1:  # the sampler Lightning injects in distributed runs
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    trainer.fit(module, loader, ckpt_path=args.resume)
    state = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
        for k, v in module.student.state_dict().items()
    }
    if trainer.global_rank == 0:
        result = {
            "losses": recorder.losses,
            "student_samples": recorder.student_samples,
            "student_abs_sum": sum(float(v.double().abs().sum()) for v in state.values()),
            "calls": on_policy.calls,
        }
        Path(args.out).write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_now(0)  # see tests/helpers/distributed.py: no gloo teardown abort after success
