"""The session's gloo worker pool (tests/helpers/pool.py): tasks run on every rank, a failure
or a crash reaches the test with the rank's traceback, and the pool is replaced after it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers import pool

pytestmark = pytest.mark.distributed


def _sum_of_ranks(rank: int, world_size: int, expected: int) -> None:
    value = torch.tensor(float(rank))
    dist.all_reduce(value)
    assert value.item() == expected and dist.get_world_size() == world_size


def _fails_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one says no")
    dist.barrier()  # rank 0 waits for a peer that will not come


def _crashes_on_rank_zero(rank: int, world_size: int) -> None:
    if rank == 0:
        os._exit(3)
    dist.barrier()


def _draws(rank: int, world_size: int, out: str) -> None:
    torch.save(torch.rand(3), f"{out}/{rank}-{torch.rand(1).item()}.pt")


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_task_runs_on_every_rank_of_one_group(world_size):
    pool.run(_sum_of_ranks, world_size, sum(range(world_size)))
    pool.run(_sum_of_ranks, world_size, sum(range(world_size)))  # the same pool again


def test_a_failure_on_one_rank_is_raised_and_the_pool_replaced():
    pool.run(_sum_of_ranks, 2, 1)
    first = pool._pools[2]
    with pytest.raises(AssertionError, match=r"(?s)rank 1 ---.*ValueError: rank one says no"):
        pool.run(_fails_on_rank_one, 2)
    assert 2 not in pool._pools and not first.alive()
    pool.run(_sum_of_ranks, 2, 1)
    assert pool._pools[2] is not first


def test_a_crashed_worker_is_reported_and_replaced():
    with pytest.raises(AssertionError, match="worker exited with code 3"):
        pool.run(_crashes_on_rank_zero, 2)
    pool.run(_sum_of_ranks, 2, 1)


def test_each_task_starts_from_the_rng_state_its_rank_started_with(tmp_path):
    """A task's random draws do not depend on the tasks run before it on that rank."""
    for task in ("a", "b"):
        (tmp_path / task).mkdir()
        pool.run(_draws, 2, str(tmp_path / task))
    a, b = (sorted(p.name for p in (tmp_path / task).iterdir()) for task in ("a", "b"))
    assert len(a) == 2 and a == b


def test_spawn_workers_runs_a_task_in_fresh_processes():
    """The runner for a test about the processes themselves (no pool)."""
    from tests.helpers.distributed import spawn_workers

    spawn_workers(_sum_of_ranks, 2, 1)
