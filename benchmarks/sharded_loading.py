"""Peak host memory per rank that the teacher adds, with and without sharded loading.

A Hugging Face Llama teacher (about 150M parameters, fp32, saved with ``save_pretrained`` to a
temporary directory) and a tiny one, each distilled into the same tiny student for one step by
``tests/scripts/sharded_loading_run.py`` at TP=2 (2 processes) and TP=2 x DP=2 (4 processes),
with ``sharded_loading`` off and on. The teacher's share of a rank's peak resident memory
(``ru_maxrss``) is the big-teacher run minus the tiny-teacher run, reported as a multiple of
the teacher's fp32 size (the worst rank).

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


def run(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
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
        print(f"{'layout':<12} {'sharded':<8} {'teacher MiB':>11} {'added/rank MiB':>15} "
              f"{'x teacher':>9}")  # fmt: skip
        for layout, (devices, dp) in LAYOUTS.items():
            for sharded in (False, True):
                peaks = {}
                for name in sizes:
                    result = run("--source", f"{tmp}/{name}", "--teacher", "hf",
                                 "--devices", devices, "--dp", dp, "--steps", str(args.steps),
                                 *(["--sharded"] if sharded else []))  # fmt: skip
                    peaks[name] = result
                teacher_mib = peaks["big"]["teacher_numel"] * 4 / 2**20
                added = max(
                    b - t
                    for b, t in zip(
                        peaks["big"]["peak_rss_mib"], peaks["tiny"]["peak_rss_mib"], strict=True
                    )
                )
                print(f"{layout:<12} {sharded!s:<8} {teacher_mib:>11.0f} {added:>15.0f} "
                      f"{added / teacher_mib:>9.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
