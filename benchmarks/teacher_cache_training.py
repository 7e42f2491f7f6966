"""Training from a teacher cache vs. with the live teacher, on the demo (issue 15's figures).

In a directory where the demo ran (``python -m lightning_kd.demo`` leaves the teacher in
``runs/teacher/checkpoints/last.ckpt``):

1. ``lightning-kd cache-teacher`` writes the demo teacher's top-k distribution (k=64 by default)
   over the quickstart data (train and val splits);
2. the quickstart student trains ``--steps`` steps with the live teacher and, from the same
   initialisation and data order, from the cache (validation off, so the wall time is training);
3. both students are validated against the *live* teacher: the KL to it of the student trained
   from the cache vs. the one trained with the teacher.

Reported: training tokens/s of both runs (same process, one after the other) and their ratio
(target >= 1.5x), and the two validation KLs (aim: the cached student within 5 %).

Usage: python benchmarks/teacher_cache_training.py [--top_k 64] [--steps 300] [--workdir .]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from lightning_kd.cli import KDLightningCLI
from lightning_kd.demo import config_path

TEACHER = Path("runs/teacher/checkpoints/last.ckpt")


def _cli(*args: str) -> KDLightningCLI:
    return KDLightningCLI(args=["--config", config_path("quickstart.yaml"), *args], run=False)


def _train(name: str, steps: int, *overrides: str) -> tuple[float, Path]:
    """Fit ``steps`` steps; (tokens per second, the run's last.ckpt)."""
    run = f"runs/bench_{name}"
    cli = _cli(
        "--model.init_args.teacher_checkpoint", str(TEACHER),
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", run, "--trainer.logger.init_args.save_dir", run,
        *overrides,
    )  # fmt: skip
    tokens = steps * cli.datamodule.batch_size * cli.datamodule.seq_len
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    elapsed = time.perf_counter() - start
    ckpt = Path(run) / "checkpoints" / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    return tokens / elapsed, ckpt


def _kl_to_live_teacher(ckpt: Path) -> float:
    """val/kd_loss of the student in ``ckpt`` against the live teacher."""
    cli = _cli("--model.init_args.teacher_checkpoint", str(TEACHER),
               "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
               "--trainer.callbacks", "[]")  # fmt: skip
    (metrics,) = cli.trainer.validate(
        cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), verbose=False
    )
    return float(metrics["val/kd_loss"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default=".", help="where the demo ran (has runs/teacher)")
    args = parser.parse_args()
    os.chdir(args.workdir)
    if not TEACHER.is_file():
        print(f"no demo teacher at {TEACHER}: run `python -m lightning_kd.demo` here first.")
        return 1
    cache = Path(f"runs/bench_cache_k{args.top_k}")
    start = time.perf_counter()
    if not (cache / "metadata.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "lightning_kd", "cache-teacher",
             "--config", config_path("quickstart.yaml"), "--output_dir", str(cache),
             "--top_k", str(args.top_k), "--model.init_args.teacher_checkpoint", str(TEACHER)],
            check=True,
        )  # fmt: skip
    written = time.perf_counter() - start
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())

    live_speed, live_ckpt = _train("live", args.steps)
    cached_speed, cached_ckpt = _train(
        "cached", args.steps,
        "--model.init_args.teacher", "null", "--model.init_args.teacher_checkpoint", "null",
        "--model.init_args.teacher_cache", str(cache),
    )  # fmt: skip
    live_kl, cached_kl = _kl_to_live_teacher(live_ckpt), _kl_to_live_teacher(cached_ckpt)

    print(f"\ncache: top_k={args.top_k}, {size / 2**20:.1f} MiB, written in {written:.0f} s")
    print(f"training tokens/s: live teacher {live_speed:,.0f}, from the cache "
          f"{cached_speed:,.0f} ({cached_speed / live_speed:.2f}x)")  # fmt: skip
    print(f"validation KL to the live teacher after {args.steps} steps: trained with it "
          f"{live_kl:.4f}, trained from the cache {cached_kl:.4f} "
          f"({100 * (cached_kl / live_kl - 1):+.1f} %)")  # fmt: skip
    bars = {
        "tokens/s from the cache >= 1.5x the live teacher": cached_speed >= 1.5 * live_speed,
        "cached student's KL within 5 % of the live one": cached_kl <= 1.05 * live_kl,
    }
    for name, ok in bars.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    return 0 if all(bars.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
