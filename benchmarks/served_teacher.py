"""Training tokens/s with the teacher in process, from a top-k cache, and served by vLLM.

The same student (the quickstart's) learns from the same random teacher (TinyLlama, head size
64 so that vLLM's CPU attention serves it) on the quickstart data (TextDataModule, synthetic
corpus), ``--steps`` steps each, one run after the other in this process:

1. in process: the teacher runs beside the student on every batch (``KDLoss`` on logits);
2. cache: ``write_teacher_cache`` writes its top-k once (timed apart), then the student trains
   from it (``TopKKDLoss``);
3. served: a vLLM server launched for the teacher's Hugging Face export
   (``ServedTeacher(model_dir=...)``; its start-up timed apart), the student trains from its
   top-k prompt log-probabilities (``TopKKDLoss``), requests concurrent and prefetched.

Tokens/s are counted from the end of the second step (warm-up and the server's start excluded).
On one machine the server competes with the student for the same cores; the served figure is
what a teacher on other hardware costs the student's machine only when the server runs there.

Usage: LIGHTNING_KD_VLLM_PYTHON=.venv-vllm/bin/python python benchmarks/served_teacher.py
       [--steps 20] [--top_k 20] [--workdir runs/bench_served]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.data import TextDataModule
from lightning_kd.export import export_student
from lightning_kd.teacher_cache import write_teacher_cache
from lightning_kd.training.teachers import ServedTeacher

V, SEQ, BATCH = 258, 128, 16


def _teacher() -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(vocab_size=V, dim=256, n_layers=4, n_heads=4, n_kv_heads=4,
                     hidden_dim=688, max_seq_len=SEQ, init_std=0.05).eval()  # fmt: skip


def _student() -> TinyLlama:
    torch.manual_seed(1)
    return TinyLlama(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172,
                     max_seq_len=SEQ)  # fmt: skip


def _data() -> TextDataModule:
    return TextDataModule(seq_len=SEQ, batch_size=BATCH, synthetic_chars=300_000)


class _Clock(L.Callback):
    """Wall time from the end of step 2 to the end of the last step."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end = 0.0
        self.steps = 0

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2:
            self.start = time.perf_counter()
        elif self.start is not None:
            self.end, self.steps = time.perf_counter(), trainer.global_step - 2


def _trainer(steps: int, root: Path, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=str(root), callbacks=list(callbacks))  # fmt: skip


def _fit(name: str, steps: int, root: Path, **teacher) -> float:
    """Train ``steps`` steps; tokens per second after warm-up."""
    L.seed_everything(0, verbose=False)
    module = DistillationModule(_student(), loss=KDLoss(), **teacher)
    clock = _Clock()
    _trainer(steps, root / name, [clock]).fit(module, datamodule=_data())
    return clock.steps * BATCH * SEQ / (clock.end - clock.start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--workdir", default="runs/bench_served")
    args = parser.parse_args()
    if not os.environ.get("LIGHTNING_KD_VLLM_PYTHON"):
        print("set LIGHTNING_KD_VLLM_PYTHON to a Python with vLLM (make vllm-env).")
        return 1
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, float] = {}
    results["in process"] = _fit("live", args.steps, root, teacher=_teacher())
    print(f"in process: {results['in process']:,.0f} tokens/s", flush=True)

    cache = root / f"cache_k{args.top_k}"
    start = time.perf_counter()
    if not (cache / "metadata.json").is_file():
        module = DistillationModule(_student(), _teacher(), loss=KDLoss())
        data = _data()
        data.prepare_data()
        data.setup("fit")
        write_teacher_cache(module, data, _trainer(1, root / "write"), cache, args.top_k,
                            splits=["train"])  # fmt: skip
    written = time.perf_counter() - start
    results[f"top-{args.top_k} cache"] = _fit("cache", args.steps, root, teacher_cache=str(cache))
    print(f"cache: {results[f'top-{args.top_k} cache']:,.0f} tokens/s", flush=True)

    teacher = _teacher()
    model_dir = root / "teacher_hf"
    if not (model_dir / "config.json").is_file():
        export_student(teacher, teacher.state_dict(), model_dir)
    backend = ServedTeacher(model_dir=str(model_dir), top_k=args.top_k, max_model_len=SEQ + 2,
                            server_args=["--skip-tokenizer-init"])  # fmt: skip
    start = time.perf_counter()
    backend.connect(V)
    launched = time.perf_counter() - start
    try:
        results[f"served (vLLM, top-{args.top_k})"] = _fit(
            "served", args.steps, root, teacher_backend=backend
        )
    finally:
        backend.close()

    print(f"\n{args.steps} steps of {BATCH} x {SEQ} tokens, {torch.get_num_threads()} threads; "
          f"cache written in {written:.0f} s, server ready in {launched:.0f} s")  # fmt: skip
    base = results["in process"]
    for name, speed in results.items():
        print(f"  {name:<28} {speed:>9,.0f} tokens/s  ({speed / base:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
