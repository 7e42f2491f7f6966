"""Activation checkpointing benchmark (issue 14): peak resident memory of one forward + backward
of a TinyLlama student (cross-entropy on random tokens), with and without
``checkpoint_blocks`` (what ``DistillationModule(activation_checkpointing=True)`` applies), each
in a fresh process (``tests/scripts/memory_run.py``; growth = ``ru_maxrss`` at the end minus the
resident memory before the model exists), and their ratio. Also the memory estimate of a short
distillation fit against the same measurement.

Defaults: V=1024, d=256, 8 blocks, SwiGLU 682, batch 8 × 512 tokens, fp32, CPU, 2 steps.

Usage: python benchmarks/activation_checkpointing.py [--dim 256] [--layers 8] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def measure(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.scripts.memory_run", *args], cwd=ROOT,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", default="256")
    parser.add_argument("--layers", default="8")
    parser.add_argument("--seq", default="512")
    args = parser.parse_args()
    sizes = ("--dim", args.dim, "--layers", args.layers, "--seq", args.seq)
    growth = {}
    for ac in (False, True):
        run = measure("--mode", "student", *sizes, *(("--ac",) if ac else ()))
        growth[ac] = run["peak"] - run["baseline"]
    ratio = growth[True] / growth[False]
    print(f"student fwd+bwd peak RSS growth: without AC {growth[False] / MIB:.0f} MiB, "
          f"with AC {growth[True] / MIB:.0f} MiB, ratio {ratio:.2f}")  # fmt: skip
    fit = measure("--mode", "fit", "--seq", "128", "--vocab", "8192", "--layers", "4",
                  "--teacher-dim", "512")  # fmt: skip
    measured, estimate = fit["peak"] - fit["baseline"], fit["estimate"]
    print(f"distillation fit: estimated {estimate / MIB:.0f} MiB, measured peak growth "
          f"{measured / MIB:.0f} MiB (estimate/measured {estimate / measured:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
