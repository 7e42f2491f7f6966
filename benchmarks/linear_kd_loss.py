"""LinearKDLoss benchmark: the fused lm_head + loss next to the unfused path, 1 process and TP=2.

Unfused path, as usually written: ``student_logits = hidden @ W.T`` under autograd, the
teacher's logits under ``no_grad``, then ``KDLoss(chunk_size=1024)`` and ``backward()`` (the
logits go out of scope before backward, which favours the baseline). Fused path:
``LinearKDLoss(chunk_size=1024)`` on the hidden states and head weights. Forward KL, fp32,
N=8192 tokens, V=32000, d=512 (student and teacher), every token valid.

* memory: growth of the process's peak RSS over one forward+backward, each variant in a fresh
  process (the peak is reset through ``/proc/self/clear_refs`` after the inputs exist), shown
  in MiB and in units of one [N, V] fp32 matrix. Bar: fused <= 0.25x unfused (aim 0.15x).
* time: forward+backward, both variants in one process, interleaved, best of several runs
  after a warm-up (the machine may be shared: take the ratio as indicative). Bar: fused <=
  1.2x unfused.
* TP=2 (2 gloo processes, 1 thread each, plain local vocabulary slices with ``tp_group``):
  the same per rank, in units of one [N, V/2] fp32 matrix; the unfused path all-reduces the
  hidden-state gradient after backward (what a column-parallel head does), the fused one does
  it inside. Also the bytes moved by collectives per token, forward+backward.
* every divergence through the fused head (memory only, fresh process each): bar <= 0.25 of
  one [N, V] fp32 matrix (the floor is the weight gradient, 0.06, the hidden-state gradient,
  0.02, and the chunk's [1024, V] buffer, 0.125). Memory children run one thread (with two,
  the OpenMP pool adds about 14 MiB: 0.255-0.26 for the fused rows, measured 2026-12-08).

Usage: python benchmarks/linear_kd_loss.py [--quick] [--single-only | --tp-only]
(--quick times a smaller N; memory is always measured at the full size.)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_kd import KDLoss, LinearKDLoss
from lightning_kd.losses import DIVERGENCES

N, V, D, CHUNK = 8192, 32000, 512, 1024
MEMORY_BAR, MEMORY_AIM, TIME_BAR = 0.25, 0.15, 1.2
TP = 2


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _inputs(n: int, v: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, D, generator=gen)
    w = torch.randn(v, D, generator=gen) * D**-0.5
    ht = torch.randn(n, D, generator=gen)
    wt = torch.randn(v, D, generator=gen) * D**-0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    return hs, w, ht, wt, labels


def unfused_loss(hs, w, ht, wt, labels, group=None):
    student_logits = hs @ w.T
    with torch.no_grad():
        teacher_logits = ht @ wt.T
    return KDLoss(chunk_size=CHUNK, tp_group=group)(student_logits, teacher_logits, labels)


def fused_loss(hs, w, ht, wt, labels, group=None):
    return LinearKDLoss(chunk_size=CHUNK, tp_group=group)(hs, w, ht, wt, labels)


VARIANTS = {"unfused": unfused_loss, "fused": fused_loss}


def _fused_divergence(divergence: str):
    def loss(hs, w, ht, wt, labels, group=None):
        return LinearKDLoss(chunk_size=CHUNK, tp_group=group, divergence=divergence)(
            hs, w, ht, wt, labels
        )

    return loss


#: Every divergence through the fused head (memory table; bar FUSED_FLOOR_BAR each).
DIVERGENCE_VARIANTS = {f"fused {name}": _fused_divergence(name) for name in DIVERGENCES}
FUSED_FLOOR_BAR = 0.25


def _step(name, hs, w, ht, wt, labels, group=None):
    hs.grad = w.grad = None
    {**VARIANTS, **DIVERGENCE_VARIANTS}[name](hs, w, ht, wt, labels, group).backward()
    if name == "unfused" and group is not None:
        dist.all_reduce(hs.grad, group=group)  # the column-parallel head's input gradient


class _Bytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            for x in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(x, torch.Tensor):
                    self.total += x.numel() * x.element_size()
        return func(*args, **(kwargs or {}))


# --- one process -------------------------------------------------------------------------


def _child_memory(name: str) -> None:
    # One thread, as the figures: a second OpenMP thread adds its pool's ~14 MiB
    # (0.014 of the [N, V] matrix) to whatever runs, fused or not.
    torch.set_num_threads(1)
    hs, w, ht, wt, labels = _inputs(N, V)
    hs.requires_grad_()
    w.requires_grad_()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    before = _kib("VmRSS")
    _step(name, hs, w, ht, wt, labels)
    growth = (_kib("VmHWM") - before) * 1024
    assert hs.grad is not None and w.grad is not None
    print(json.dumps({"growth": growth}))


def memory_single(names=tuple(VARIANTS)) -> dict[str, float]:
    out = {}
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--child-memory", name],
            check=True,
            capture_output=True,
            text=True,
        )
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    return out


def speed_single(n: int, repeats: int) -> dict[str, float]:
    hs, w, ht, wt, labels = _inputs(n, V)
    hs.requires_grad_()
    w.requires_grad_()
    best = dict.fromkeys(VARIANTS, float("inf"))
    for rep in range(repeats + 1):  # the first round is warm-up
        for name in VARIANTS:
            start = time.perf_counter()
            _step(name, hs, w, ht, wt, labels)
            elapsed = time.perf_counter() - start
            if rep:
                best[name] = min(best[name], elapsed)
    return best


# --- TP=2 --------------------------------------------------------------------------------


def _tp_worker(rank, port, n, mode, repeats, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    group = dist.group.WORLD
    hs, w, ht, wt, labels = _inputs(n, V)
    w = torch.tensor_split(w, TP)[rank].clone().requires_grad_()  # this rank's vocab rows
    wt = torch.tensor_split(wt, TP)[rank].clone()
    hs.requires_grad_()
    if mode.startswith("memory:"):
        name = mode.split(":")[1]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _kib("VmRSS")
        _step(name, hs, w, ht, wt, labels, group)
        result = (_kib("VmHWM") - before) * 1024
    else:
        result = {}
        for name in VARIANTS:
            with _Bytes() as rec:
                _step(name, hs, w, ht, wt, labels, group)
            result[f"bytes:{name}"] = rec.total / n
        best = dict.fromkeys(VARIANTS, float("inf"))
        for _ in range(repeats):
            for name in VARIANTS:
                dist.barrier()
                start = time.perf_counter()
                _step(name, hs, w, ht, wt, labels, group)
                best[name] = min(best[name], time.perf_counter() - start)
        result.update({f"time:{k}": v for k, v in best.items()})
    queue.put((rank, result))
    dist.barrier()
    dist.destroy_process_group()


def run_tp(n: int, mode: str, repeats: int = 0) -> dict[int, object]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_tp_worker, args=(r, port, n, mode, repeats, queue)) for r in range(TP)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return results


# --- report ------------------------------------------------------------------------------


def _mib(x: float) -> str:
    return f"{x / 2**20:8.0f} MiB"


def single_section(speed_n: int, repeats: int) -> dict[str, bool]:
    unit = N * V * 4
    print(f"One process, {torch.get_num_threads()} threads: fp32, N={N}, V={V}, d={D}, "
          f"chunk_size={CHUNK}, forward KL")  # fmt: skip
    mem = memory_single()
    for name, growth in mem.items():
        print(f"  peak-RSS growth {name:8s} {_mib(growth)}  {growth / unit:5.2f} [N, V] fp32")
    mem_ratio = mem["fused"] / mem["unfused"]
    print(f"  memory fused / unfused: {mem_ratio:.3f}x")
    speed = speed_single(speed_n, repeats)
    time_ratio = speed["fused"] / speed["unfused"]
    print(f"  time (N={speed_n}, best of {repeats}): unfused {speed['unfused']:.2f}s, fused "
          f"{speed['fused']:.2f}s, fused / unfused {time_ratio:.3f}x")  # fmt: skip
    return {
        f"1 process: memory fused <= {MEMORY_BAR}x unfused (aim {MEMORY_AIM}x)": mem_ratio
        <= MEMORY_BAR,
        f"1 process: time fused <= {TIME_BAR}x unfused": time_ratio <= TIME_BAR,
    }


def divergence_section() -> dict[str, bool]:
    unit = N * V * 4
    print(f"\nEvery divergence through the fused head, same size: peak-RSS growth (fresh "
          f"process each), in [N, V] fp32 matrices; bar <= {FUSED_FLOOR_BAR}")  # fmt: skip
    mem = memory_single(tuple(DIVERGENCE_VARIANTS))
    bars = {}
    for name, growth in mem.items():
        print(f"  {name:24s} {_mib(growth)}  {growth / unit:5.3f}x")
        bars[f"1 process: {name} <= {FUSED_FLOOR_BAR}x [N, V]"] = growth / unit <= FUSED_FLOOR_BAR
    return bars


def tp_section(speed_n: int, repeats: int) -> dict[str, bool]:
    unit = N * (V // TP) * 4
    print(f"\nTP={TP} on gloo (1 thread per rank, plain vocab slices with tp_group): per rank")
    mem = {name: max(run_tp(N, f"memory:{name}").values()) for name in VARIANTS}
    for name, growth in mem.items():
        print(f"  peak-RSS growth {name:8s} {_mib(growth)}  {growth / unit:5.2f} [N, V/{TP}] fp32")
    mem_ratio = mem["fused"] / mem["unfused"]
    print(f"  memory fused / unfused (worst rank): {mem_ratio:.3f}x")
    res = run_tp(speed_n, "speed", repeats)
    times = {name: max(r[f"time:{name}"] for r in res.values()) for name in VARIANTS}
    time_ratio = times["fused"] / times["unfused"]
    print(f"  time (N={speed_n}, best of {repeats}, slowest rank): unfused "
          f"{times['unfused']:.2f}s, fused {times['fused']:.2f}s, fused / unfused "
          f"{time_ratio:.3f}x")  # fmt: skip
    fused_b, unfused_b = res[0]["bytes:fused"], res[0]["bytes:unfused"]
    print(f"  collective bytes per token (forward+backward): fused {fused_b:.0f} "
          f"(hidden gradient {4 * D} = 4·d, softmaxes {fused_b - 4 * D:.0f}), unfused "
          f"{unfused_b:.0f}")  # fmt: skip
    return {
        f"TP={TP}: memory fused <= {MEMORY_BAR}x unfused per rank": mem_ratio <= MEMORY_BAR,
        f"TP={TP}: time fused <= {TIME_BAR}x unfused": time_ratio <= TIME_BAR,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="time a smaller N, fewer repeats")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--single-only", action="store_true")
    which.add_argument("--tp-only", action="store_true")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        _child_memory(args.child_memory)
        return 0
    speed_n, repeats = (2048, 2) if args.quick else (N, 3)
    print(f"torch {torch.__version__}\n")
    bars = {}
    if not args.tp_only:
        bars.update(single_section(speed_n, repeats))
        bars.update(divergence_section())
    if not args.single_only:
        bars.update(tp_section(speed_n, repeats))
    print("\nBars")
    for bar, ok in bars.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {bar}")
    return 0 if all(bars.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
