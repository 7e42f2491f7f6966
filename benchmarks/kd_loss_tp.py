"""Tensor-parallel KDLoss benchmark: TP=2 on gloo (CPU processes) next to one process.

For vocab-sharded fp32 logits [N, V] (default N=4096, V=32000) it prints, per variant:

* per-rank peak-RSS growth for one forward+backward, in units of one [N, V/tp] fp32 matrix
  (the local gradient alone is 1.0). Bar: chunk_size=512 <= 1.5.
* forward+backward time (best of 3 after warm-up; slowest rank), next to the single-process
  path on the full [N, V] with the same total number of threads.
* bytes moved by collectives per token, recorded from every collective the loss issues.

Then, per divergence (chunk_size=512, fp32), the collective bytes per token of one
forward+backward with kd_ratio=1 and with kd_ratio=0.5 (the hard-label cross-entropy in the
same pass), at temperature 2 and at temperature 1 (where the cross-entropy reuses the student's
log-normaliser). All are O(tokens): per-row all-reduces only, none in backward.

Usage: python benchmarks/kd_loss_tp.py [--quick] [--divergences-only]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_kd import KDLoss
from lightning_kd.losses import DIVERGENCES

TP = 2


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


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _inputs(n, v, rank, world):
    torch.manual_seed(0)
    student = torch.randn(n, v // world)  # this rank's vocab slice (values do not matter)
    teacher = torch.randn(n, v // world)
    labels = torch.randint(0, v, (n,))
    return student, teacher, labels


def _worker(rank, port, n, v, chunk, mode, queue, loss_kwargs=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    mesh = init_device_mesh("cpu", (TP,))
    student, teacher, labels = _inputs(n, v, rank, TP)
    loss_fn = KDLoss(chunk_size=chunk, **(loss_kwargs or {}))

    def step():
        s = DTensor.from_local(student, mesh, [Shard(-1)]).requires_grad_()
        t = DTensor.from_local(teacher, mesh, [Shard(-1)])
        loss_fn(s, t, labels).backward()
        return s

    if mode == "memory":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _kib("VmRSS")
        step()
        result = (_kib("VmHWM") - before) * 1024 / (n * (v // TP) * 4)
    elif mode == "bytes":
        with _Bytes() as rec:
            step()
        result = {"bytes_per_token": rec.total / n}
    else:
        with _Bytes() as rec:
            step()
        times = []
        for _ in range(3):
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result = {"time": min(times), "bytes_per_token": rec.total / n}
    queue.put((rank, result))
    dist.destroy_process_group()


def run_tp(n, v, chunk, mode, loss_kwargs=None):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, port, n, v, chunk, mode, queue, loss_kwargs))
        for r in range(TP)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return results


def run_single(n, v, chunk):
    torch.manual_seed(0)
    student, teacher = torch.randn(n, v), torch.randn(n, v)
    labels = torch.randint(0, v, (n,))
    loss_fn = KDLoss(chunk_size=chunk)
    times = []
    for _ in range(4):
        s = student.clone().requires_grad_()
        start = time.perf_counter()
        loss_fn(s, teacher, labels).backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def divergence_bytes(n, v) -> None:
    """Collective bytes per token of every divergence (rank 0's view; every rank issues the
    same collectives)."""
    print(f"\nCollective bytes per token, chunk_size=512, fp32 [N={n}, V={v}], TP={TP}")
    print(f"  {'divergence':16s} {'kd=1 T=2':>9s} {'kd=0.5 T=2':>11s} {'kd=1 T=1':>9s} "
          f"{'kd=0.5 T=1':>11s}")  # fmt: skip
    for name in DIVERGENCES:
        row = []
        for temperature in (2.0, 1.0):
            for kd_ratio in (1.0, 0.5):
                kwargs = dict(divergence=name, kd_ratio=kd_ratio, temperature=temperature)
                row.append(run_tp(n, v, 512, "bytes", kwargs)[0]["bytes_per_token"])
        print(f"  {name:16s} {row[0]:9.1f} {row[1]:11.1f} {row[2]:9.1f} {row[3]:11.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--divergences-only", action="store_true")
    args = parser.parse_args()
    n, v = (1024, 32000) if args.quick else (4096, 32000)
    print(f"TP={TP} on gloo, fp32 logits [N={n}, V={v}], torch {torch.__version__}\n")
    ok = True
    if not args.divergences_only:
        header = f"  {'variant':28s} {'peak/rank':>10s} {'time TP=2':>10s} {'time 1 proc':>12s}"
        print(header + f" {'comm bytes/token':>17s}")
        for chunk in (512, 0):
            mem = max(run_tp(n, v, chunk, "memory").values())
            speed = run_tp(n, v, chunk, "speed")
            tp_time = max(r["time"] for r in speed.values())
            comm = speed[0]["bytes_per_token"]
            single = run_single(n, v, chunk)
            name = f"chunk_size={chunk}" if chunk else "unchunked"
            print(f"  {name:28s} {mem:9.2f}x {tp_time:9.3f}s {single:11.3f}s {comm:17.0f}")
            if chunk:
                ok &= mem <= 1.5
        print(
            f"\npeak/rank in [N, V/{TP}] fp32 matrices; 1 proc runs "
            f"{torch.get_num_threads()} threads"
        )
        status = "PASS" if ok else "FAIL"
        print(f"\nBar\n  [{status}] TP per-rank peak growth, chunk_size=512 <= 1.5x")
    divergence_bytes(n, v)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
