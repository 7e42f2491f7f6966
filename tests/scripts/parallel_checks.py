"""Multi-process checks of the parallel layer, run as a script (Lightning re-runs it per rank).

Modes (``--mode``):
  local_head    TP=2 with a student plan whose lm_head returns plain local shards: must raise.
  precision     DP=2 (FSDP2) under bf16-mixed: record the dtypes FSDP gathers and reduces in.
  uneven_eval   DDP on 2 ranks where rank 1 has no validation batch: must not hang.
Writes a JSON result (rank 0) to ``--out``.
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.tensor.parallel import ColwiseParallel
from torch.utils.data import DataLoader, IterableDataset

from lightning_kd import DistillationModule, TinyLlama
from lightning_kd.cli import shutdown_distributed
from tests.helpers.distributed import exit_now

VOCAB, SEQ = 37, 12


def batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


class RankBatches(IterableDataset):
    """Fixed batches for rank 0, and none at all for the other ranks (no ``__len__``, so
    Lightning runs the evaluation loop on every rank)."""

    def __init__(self, count: int) -> None:
        self.items = batches(count)

    def __iter__(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        return iter(self.items if rank == 0 else [])


def models() -> tuple[TinyLlama, TinyLlama]:
    torch.manual_seed(0)
    student = TinyLlama(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                        hidden_dim=32)  # fmt: skip
    teacher = TinyLlama(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                        hidden_dim=32)  # fmt: skip
    return student, teacher


class DtypeRecorder(DistillationModule):
    """Records the dtype of the weights the first block sees in forward (what FSDP gathered)
    and of the sharded gradients after backward."""

    seen: dict

    def configure_model(self) -> None:
        super().configure_model()
        self.seen = {}
        for role in ("student", "teacher"):
            block = getattr(self, role).layers[0].attn.wq

            def hook(module, args, role=role):
                self.seen[f"{role}_gathered"] = str(module.weight.dtype)

            block.register_forward_pre_hook(hook)

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        grads = {str(p.grad.dtype) for p in self.trainable_parameters() if p.grad is not None}
        self.seen["student_grad"] = sorted(grads)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    student, teacher = models()
    result: dict = {}
    if args.mode == "local_head":
        plans = [model.tensor_parallel_plan(2) for model in (student, teacher)]
        for plan in plans:
            plan["lm_head"] = ColwiseParallel()  # plain [B, S, V/2] local output: the trap
        module = DistillationModule(student, teacher, student_tp_plan=plans[0],
                                    teacher_tp_plan=plans[1])  # fmt: skip
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1,
                            logger=False, enable_checkpointing=False,
                            enable_progress_bar=False)  # fmt: skip
        trainer.fit(module, DataLoader(batches(2), batch_size=None))
    elif args.mode == "precision":
        module = DtypeRecorder(student, teacher)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1,
                            precision="bf16-mixed", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False)  # fmt: skip
        trainer.fit(module, DataLoader(batches(2), batch_size=None))
        result = module.seen
    elif args.mode == "uneven_eval":
        module = DistillationModule(student, teacher)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(),
                            logger=False, enable_checkpointing=False,
                            enable_progress_bar=False)  # fmt: skip
        (metrics,) = trainer.validate(module, DataLoader(RankBatches(3), batch_size=None),
                                      verbose=False)  # fmt: skip
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {k: float(v) for k, v in metrics.items()})
        result = {"metrics_per_rank": gathered}
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump(result, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_now(0)  # see tests/helpers/distributed.py: no gloo teardown abort after success
