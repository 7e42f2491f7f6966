"""Full-student KD vs LoRA-student KD vs KD plus a hidden-state loss (issue 26), same steps.

Each variant trains ``DistillationModule`` with Lightning for the same steps on the same
random-token batches, in a fresh process (peak memory is per process): a TinyLlama teacher and
a student of the teacher's width with half its blocks, both from the same seed.

- ``full``: every student parameter trains (AdamW).
- ``lora``: the same student with ``lora={rank, alpha}`` on every block projection: only the
  adapters train (no gradients or AdamW state for the base).
- ``hidden``: ``full`` plus ``HiddenStateLoss`` (evenly spaced pairs, cosine, weight 1).

Reported per variant: trainable parameters, the KD loss (the divergence term, the same metric
for all three) averaged over the last 5 steps, peak resident memory growth of the process over
its resident memory before the models are built (``VmHWM``), and training tokens per second
after 2 warm-up steps (fp32, CPU).

Usage: python benchmarks/lora_hidden.py [--steps 30] [--dim 256] [--teacher-layers 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
VARIANTS = ("full", "lora", "hidden")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints its JSON result."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_kd import DistillationModule, KDLoss, TinyLlama
    from lightning_kd.training.hidden_state_loss import HiddenStateLoss

    try:  # imported by every variant before the baseline: its import is not model memory
        import peft  # noqa: F401
    except ImportError:
        if args.variant == "lora":
            raise
    torch.set_num_threads(args.threads)
    baseline = _status_kib("VmRSS")
    L.seed_everything(0, verbose=False)
    sizes = dict(vocab_size=args.vocab, dim=args.dim, n_heads=8, n_kv_heads=4,
                 hidden_dim=args.dim * 8 // 3 // 8 * 8, max_seq_len=args.seq)  # fmt: skip
    teacher = TinyLlama(n_layers=args.teacher_layers, init_std=0.05, **sizes)
    torch.manual_seed(1)
    lora = {"rank": args.rank, "alpha": 2.0 * args.rank} if args.variant == "lora" else None
    student = TinyLlama(n_layers=args.teacher_layers // 2, init_std=0.05, lora=lora, **sizes)
    hidden = HiddenStateLoss(distance="cosine") if args.variant == "hidden" else None
    module = DistillationModule(
        student, teacher, loss=KDLoss(chunk_size=1024), hidden_state_loss=hidden,
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    batches = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, args.vocab, (args.steps, args.batch, args.seq), generator=gen)
    ]
    losses: list[float] = []
    times: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/kd_loss"]))
            times.append(time.perf_counter())

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Record()])  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))
    timed = len(times) - 2
    tokens_per_s = timed * args.batch * args.seq / (times[-1] - times[1])
    trainable = sum(p.numel() for p in module.trainable_parameters())
    print(json.dumps({
        "variant": args.variant,
        "trainable": trainable,
        "student_params": sum(p.numel() for p in student.parameters()),
        "kd_loss_first": losses[0],
        "kd_loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "peak_growth": (_status_kib("VmHWM") - baseline) * 1024,
        "tokens_per_s": tokens_per_s,
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.variant is not None:
        child(args)
        return
    passed = sys.argv[1:]
    print(f"{'variant':<8}{'trainable':>12}{'KD loss (first)':>17}{'KD loss (last 5)':>18}"
          f"{'peak MiB':>10}{'tokens/s':>10}")  # fmt: skip
    for variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--variant", variant, *passed],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:<8}{r['trainable']:>12,}{r['kd_loss_first']:>17.4f}"
              f"{r['kd_loss_last5']:>18.4f}{r['peak_growth'] / MIB:>10.0f}"
              f"{r['tokens_per_s']:>10.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
