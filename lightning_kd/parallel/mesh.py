"""The one place that finds the data-parallel and tensor-parallel process groups.

Lightning's ``ModelParallelStrategy`` gives a 2-D device mesh ``("data_parallel",
"tensor_parallel")``; a DDP run has no mesh and data-parallelises over the whole world; a
single process has neither. Metrics and token counts must be reduced over the data-parallel
group only: tensor-parallel ranks hold identical values and would be counted several times.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

DP_DIM, TP_DIM = "data_parallel", "tensor_parallel"


class DataParallel(NamedTuple):
    """Where to reduce metrics: ``sync`` is False when there is nothing to reduce over.

    Attributes:
        sync: whether there are several data-parallel ranks.
        group: the data-parallel process group (None outside distributed runs).
        rank: this process's rank in ``group`` (0 without one).
        size: the number of data-parallel ranks (1 without a group).
    """

    sync: bool
    group: dist.ProcessGroup | None
    rank: int
    size: int


def data_parallel_group(mesh: DeviceMesh | None) -> dist.ProcessGroup | None:
    """The data-parallel group: the mesh's ``data_parallel`` dimension when there is a mesh,
    else the whole world in a distributed run (DDP), else None (one process)."""
    if mesh is not None:
        return mesh[DP_DIM].get_group()
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def data_parallel(mesh: DeviceMesh | None) -> DataParallel:
    """Group, rank and size of the data-parallel dimension (see :func:`data_parallel_group`)."""
    group = data_parallel_group(mesh)
    if group is None:
        return DataParallel(False, None, 0, 1)
    size = dist.get_world_size(group)
    return DataParallel(size > 1, group, dist.get_rank(group), size)


def tensor_parallel_size(mesh: DeviceMesh | None) -> int:
    """Size of the mesh's ``tensor_parallel`` dimension (1 without a mesh)."""
    return mesh[TP_DIM].size() if mesh is not None else 1


def dp_sum(values: Tensor, group: dist.ProcessGroup | None, device: torch.device) -> Tensor:
    """``values`` summed over the data-parallel ranks, as a new tensor on ``device`` (the
    model's device: NCCL cannot reduce CPU tensors). Every rank must call it."""
    out = values.to(device, copy=True)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(out, group=group)
    return out
