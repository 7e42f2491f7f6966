"""Run a test function in real worker processes joined by a gloo process group (CPU)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    # Leave together: a rank that tears down gloo while a peer is still sending aborts the
    # peer ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    exit_now(0)


def parallelize(model: torch.nn.Module, dp: int, tp: int) -> torch.nn.Module:
    """``model`` (with a ``tensor_parallel_plan``) under TP=``tp`` and, with ``dp > 1``,
    FSDP2 over DP=``dp`` on a CPU mesh of this worker's process group, in place."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_kd.parallel.pipeline import parallelize_model

    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
    return parallelize_model(
        model, tp_mesh=mesh["tensor_parallel"], dp_mesh=mesh["data_parallel"], fsdp=dp > 1
    )


def exit_now(code: int = 0) -> None:
    """Flush and end the process without running C++ static destructors. On a loaded machine
    gloo's background threads can still be winding down at interpreter exit, and their
    destructors abort the process ("terminate called without an active exception", SIGABRT)
    after a run that succeeded. Test workers and scripts end here instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` on the ranks of a gloo group of ``world_size``
    worker processes, started once per session (:mod:`tests.helpers.pool`); raise with the
    failing ranks' tracebacks. ``fn`` must be a module-level function (it is pickled)."""
    from tests.helpers import pool

    pool.run(fn, world_size, *args)


def spawn_workers(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """:func:`run_workers` in ``world_size`` freshly spawned processes (for a test about the
    processes themselves); re-raise the first worker's exception."""
    mp.spawn(_entry, args=(fn, world_size, _free_port(), args), nprocs=world_size, join=True)


class CollectiveRecorder(TorchDispatchMode):
    """Records every collective (c10d or functional) with the sizes of its tensor arguments
    (``calls``: ``(op name, [numel of each tensor argument])``), e.g. to check that a loss
    communicates O(tokens) bytes and nothing in backward."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            self.calls.append(
                (str(func), [x.numel() for x in leaves if isinstance(x, torch.Tensor)])
            )
        return func(*args, **(kwargs or {}))
