"""A pool of gloo worker processes per world size, started once and reused by the tests.

``run(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` on every rank of the pool's
process group, as a fresh ``mp.spawn`` would, without starting ``world_size`` interpreters per
test. Each task starts from the RNG state its rank started with (a fresh process's, arbitrary)
and the grad mode, default dtype and determinism of a fresh process. A task that fails on any rank
raises here with every failing rank's traceback; the pool is then stopped (peers may be left
waiting in a collective) and the next task starts a new one, as does a crashed worker. A task
still running after :data:`HANG_S` seconds is a hang: the pool is killed and the test fails.
"""

from __future__ import annotations

import atexit
import os
import queue
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

#: Seconds a task may run before it counts as hung: far above the slowest task on a busy
#: 2-core machine (about a minute), so only a real hang fires it.
HANG_S = 900.0
#: Seconds the other ranks get to report after one rank failed (they may be stuck waiting for
#: it in a collective; the pool is replaced either way).
GRACE_S = 10.0


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    import torch.distributed as dist

    from tests.helpers.distributed import exit_now

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fresh_seed = torch.initial_seed()
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test session died: no one to serve
                exit_now(1)
            continue
        if task is None:
            break
        fn, args = task
        # The state this process started with (a task may have changed it, e.g. a Trainer).
        torch.manual_seed(fresh_seed)
        random.seed()
        torch.use_deterministic_algorithms(False)
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        try:
            fn(rank, world_size, *args)
            dist.barrier()  # leave the task together
        except BaseException:  # reported to the test, which fails
            results.put(("error", traceback.format_exc()))
            continue
        results.put(("ok", None))
    dist.barrier()
    dist.destroy_process_group()
    exit_now(0)


class Pool:
    """``world_size`` gloo worker processes joined in one process group."""

    def __init__(self, world_size: int) -> None:
        from tests.helpers.distributed import _free_port

        context = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = [context.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [
            context.Process(target=_worker, args=(rank, world_size, port, self.tasks[rank],
                                                  self.results[rank]))
            for rank in range(world_size)
        ]  # fmt: skip
        for proc in self.procs:
            proc.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(rank, world_size, *args)`` on every rank; raises ``AssertionError`` with the
        failing ranks' tracebacks (the pool is then unusable: :func:`run` replaces it)."""
        for tasks in self.tasks:
            tasks.put((fn, args))
        replies: dict[int, tuple[str, str | None]] = {}
        deadline = time.monotonic() + HANG_S
        while len(replies) < self.world_size:
            if any(status == "error" for status, _ in replies.values()):
                deadline = min(deadline, time.monotonic() + GRACE_S)
            if time.monotonic() > deadline:
                break
            for rank in set(range(self.world_size)) - set(replies):
                try:
                    replies[rank] = self.results[rank].get(timeout=0.05)
                except queue.Empty:
                    if not self.procs[rank].is_alive():
                        code = self.procs[rank].exitcode
                        replies[rank] = ("error", f"worker exited with code {code}")
        failed = {r: tb for r, (status, tb) in replies.items() if status == "error"}
        if failed or len(replies) < self.world_size:
            self.stop(kill=True)
            silent = sorted(set(range(self.world_size)) - set(replies))
            report = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items()))
            if silent and not failed:
                report = f"\nno reply after {HANG_S:.0f} s (a hang) from ranks {silent}"
            raise AssertionError(f"{getattr(fn, '__name__', fn)} failed:{report}")

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def stop(self, kill: bool = False) -> None:
        if not kill:
            for tasks in self.tasks:
                tasks.put(None)
            for proc in self.procs:
                proc.join(timeout=30)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        for q in (*self.tasks, *self.results):
            q.cancel_join_thread()
            q.close()


_pools: dict[int, Pool] = {}


def run(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """``fn(rank, world_size, *args)`` on the ranks of this session's pool of ``world_size``
    (started on first use, replaced after a failure). ``fn`` must be importable by its module
    and name (it is pickled)."""
    pool = _pools.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.stop(kill=True)
        pool = _pools[world_size] = Pool(world_size)
    try:
        pool.run(fn, *args)
    except AssertionError:
        _pools.pop(world_size, None)
        raise


@atexit.register
def stop_all() -> None:
    """Stop every pool (at the end of the session)."""
    while _pools:
        _pools.popitem()[1].stop()
