"""Training-step throughput of DistillationModule against a hand-written PyTorch loop.

Both run the same work on the same models and batches: teacher forward under no-grad, student
forward + KDLoss + backward, AdamW step. The Lightning side runs a real ``Trainer.fit`` (CPU,
one process, no logger, no checkpointing, no progress bar); steps after warm-up are timed.
Rounds alternate between the two so machine noise hits both. Target: overhead <= 5%.

Usage: python benchmarks/module_throughput.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_kd import DistillationModule, KDLoss, TinyLlama

VOCAB, SEQ, BATCH, WARMUP = 8192, 256, 8, 3


class Tokens(Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}


def models():
    torch.manual_seed(0)
    teacher = TinyLlama(vocab_size=VOCAB, dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                        hidden_dim=688)  # fmt: skip
    student = TinyLlama(vocab_size=VOCAB, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                        hidden_dim=344)  # fmt: skip
    return student, teacher


def plain_loop(steps: int) -> float:
    student, teacher = models()
    teacher.requires_grad_(False).eval()
    loss_fn = KDLoss(chunk_size=512)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    loader = DataLoader(Tokens(BATCH * (steps + WARMUP)), batch_size=BATCH)
    start = None
    for i, batch in enumerate(loader):
        if i == WARMUP:
            start = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(batch["input_ids"])
        loss = loss_fn(student(batch["input_ids"]), t_logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * BATCH * SEQ / (time.perf_counter() - start)


class Timer(L.Callback):
    def __init__(self) -> None:
        self.start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()


def lightning_loop(steps: int) -> float:
    student, teacher = models()
    module = DistillationModule(
        student, teacher, loss=KDLoss(chunk_size=512),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
    )  # fmt: skip
    timer = Timer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps + WARMUP, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, DataLoader(Tokens(BATCH * (steps + WARMUP)), batch_size=BATCH))
    return steps * BATCH * SEQ / (timer.end - timer.start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    plain, lightning = [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(args.steps))
        lightning.append(lightning_loop(args.steps))
    best_plain, best_lightning = max(plain), max(lightning)
    overhead = best_plain / best_lightning - 1
    shape = f"batch {BATCH}x{SEQ}, V={VOCAB}"
    print(f"tokens/s, best of {args.rounds} rounds of {args.steps} steps ({shape})")
    print(f"  plain PyTorch loop      {best_plain:10.0f}")
    print(f"  DistillationModule      {best_lightning:10.0f}")
    print(f"  overhead                {overhead * 100:9.1f}%")
    ok = overhead <= 0.05
    print(f"\nBar\n  [{'PASS' if ok else 'FAIL'}] DistillationModule overhead <= 5%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
