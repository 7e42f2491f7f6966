"""How KDLoss's time and memory scale with the tokens N and the vocabulary V.

For each (N, V) of the grid, chunked (``chunk_size=1024``) and unchunked (``chunk_size=0``),
forward KL with ``kd_ratio=1`` on fp32 logits, one fresh process each:

* memory: growth of the process's peak RSS over one forward+backward, after the inputs exist
  (``/proc/self/clear_refs`` resets the high-water mark), in units of one fp32 [N, V] matrix
  (the student's gradient, 1.0, is the floor);
* time: median of 3 forward+backward passes after that one, in seconds and in nanoseconds per
  logit (N·V).

The rule it checks: chunked memory is ``1 + min(chunk, N) / N`` matrices (the gradient plus one
[chunk, V] workspace) within 0.1, and time grows with N·V (ns per logit about constant).
Unchunked rows whose inputs would not fit this machine's memory (above MAX_UNCHUNKED_LOGITS)
are skipped.

Usage: python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from lightning_kd import KDLoss

CHUNK = 1024
GRID = [(1024, 32000), (4096, 32000), (16384, 32000), (1024, 128256), (4096, 128256),
        (8192, 128256)]  # fmt: skip
QUICK_GRID = [(1024, 32000), (4096, 32000)]
#: Unchunked runs above this many logits are skipped (inputs + workspaces near 24 GiB).
MAX_UNCHUNKED_LOGITS = 16384 * 32000
TOLERANCE = 0.1  # a few MiB of allocator and thread-pool overhead at the smallest sizes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(n: int, v: int, chunk: int) -> None:
    torch.manual_seed(0)
    student = torch.randn(n, v, requires_grad=True)
    teacher = torch.randn(n, v)
    labels = torch.randint(0, v, (n,))
    loss = KDLoss(divergence="forward_kl", kd_ratio=1.0, chunk_size=chunk)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    before = _status_kib("VmRSS")
    loss(student, teacher, labels).backward()
    growth = (_status_kib("VmHWM") - before) * 1024 / (n * v * 4)
    times = []
    for _ in range(3):
        student.grad = None
        start = time.perf_counter()
        loss(student, teacher, labels).backward()
        times.append(time.perf_counter() - start)
    print(json.dumps({"growth": growth, "seconds": statistics.median(times)}))


def measure(n: int, v: int, chunk: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(n), str(v), str(chunk)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes only")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    print(f"KDLoss forward KL, fp32, forward+backward, {torch.get_num_threads()} threads")
    print("| N | V | chunk | memory (N×V fp32) | rule 1 + chunk/N | time (s) | ns per logit |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ok = True
    for n, v in QUICK_GRID if args.quick else GRID:
        for chunk in (CHUNK, 0):
            if chunk == 0 and n * v > MAX_UNCHUNKED_LOGITS:
                continue
            got = measure(n, v, chunk)
            rule = 1 + min(chunk, n) / n if chunk else None
            if rule is not None and abs(got["growth"] - rule) > TOLERANCE:
                ok = False
            rule_text = f"{rule:.3f}" if rule is not None else "-"
            per_logit = got["seconds"] / (n * v) * 1e9
            print(f"| {n} | {v} | {chunk or 'none'} | {got['growth']:.3f} | {rule_text} | "
                  f"{got['seconds']:.2f} | {per_logit:.2f} |", flush=True)  # fmt: skip
    print(f"\nchunked memory follows 1 + chunk/N within {TOLERANCE}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
