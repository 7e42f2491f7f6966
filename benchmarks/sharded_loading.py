"""Peak host memory per rank that the teacher adds, with and without sharded loading.

A Hugging Face Llama teacher (about 150M parameters, fp32, saved with ``save_pretrained`` to a
temporary directory) and a tiny one, each distilled into the same tiny student for one step by
``tests/scripts/sharded_loading_run.py`` at TP=2 (2 processes) and TP=2 x DP=2 (4 processes),
with ``sharded_loading`` off and on. The teacher's share of a rank's peak resident memory
(``ru_maxrss``) is the big-teacher run minus the tiny-teacher run, reported as a multiple of
the teacher's fp32 size (the worst rank), twice: when training starts (the weights loaded and
sharded: what a GPU node's host memory must hold to start the run) and at the end of the run
(on CPU the training step's memory is host memory too: FSDP2 all-gathers one teacher block at
a time).

Each layout runs three ways: loading in full, sharded, and sharded with glibc's mmap threshold
fixed (``MALLOC_MMAP_THRESHOLD_=65536``): glibc raises that threshold as large blocks are
freed, after which FSDP2's freed per-block all-gather buffers stay in the heap, which shows in
the whole-run figure on CPU.

    python benchmarks/sharded_loading.py [--hidden 1024 --layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "sharded_loading_run.py"
LAYOUTS = {"TP=2": ("2", "1"), "TP=2 x DP=2": ("4", "2")}
# (sharded_loading, environment): loading in full, sharded, and sharded with glibc's mmap
# threshold fixed (see the module docstring).
VARIANTS = [
    ("no", {}),
    ("yes", {}),
    ("yes, fixed mmap threshold", {"MALLOC_MMAP_THRESHOLD_": "65536"}),
]


def run(*args: str, env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(SCRIPT), *args]
        if "--make-teacher" not in args:
            cmd += ["--out", str(out)]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-4000:])
        return json.loads(out.read_text()) if out.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"big": (args.hidden, args.layers), "tiny": (32, 2)}
        for name, (hidden, layers) in sizes.items():
            run("--make-teacher", f"{tmp}/{name}", "--teacher", "hf",
                "--hf-hidden", str(hidden), "--hf-layers", str(layers))  # fmt: skip
        print(f"{'layout':<12} {'sharded loading':<26} {'teacher MiB':>11} "
              f"{'start MiB/rank':>14} {'x':>5} {'run MiB/rank':>12} {'x':>5}")  # fmt: skip
        for layout, (devices, dp) in LAYOUTS.items():
            for sharded, env in VARIANTS:
                flags = ["--source", "", "--teacher", "hf", "--devices", devices, "--dp", dp,
                         "--steps", str(args.steps)]  # fmt: skip
                flags += ["--sharded"] if sharded != "no" else []
                results = {}
                for name in sizes:
                    flags[1] = f"{tmp}/{name}"
                    results[name] = run(*flags, env=env)
                teacher_mib = results["big"]["teacher_numel"] * 4 / 2**20
                start = added(results, "start_peak_rss_mib")
                whole = added(results, "peak_rss_mib")
                print(f"{layout:<12} {sharded:<26} {teacher_mib:>11.0f} {start:>14.0f} "
                      f"{start / teacher_mib:>5.2f} {whole:>12.0f} {whole / teacher_mib:>5.2f}",
                      flush=True)  # fmt: skip


def added(results: dict[str, dict], key: str) -> float:
    """The teacher's share of the worst rank's peak: big-teacher run minus tiny-teacher run."""
    pairs = zip(results["big"][key], results["tiny"][key], strict=True)
    return max(big - tiny for big, tiny in pairs)


if __name__ == "__main__":
    main()
