"""LinearKDLoss on vocabulary-sharded heads in real gloo processes (TP=2 and TP=4, uneven
vocabulary shards), against the unfused single-process path.

One spawn per TP size runs every case (see ``tests/scripts/linear_kd_loss_tp.py``): DTensor
heads and plain local slices with ``tp_group``; loss, per-token outputs and the gradients of
the hidden states (the whole gradient on every rank) and of the weight and bias (each rank's
slice) within 1e-5 / 1e-4 relative; the collectives O(tokens) plus one all-reduce of the
hidden-state gradient in forward, none in backward.
"""

from __future__ import annotations

import pytest

from tests.helpers.distributed import run_workers
from tests.scripts.linear_kd_loss_tp import check_all, check_fsdp_shards_are_not_vocabulary_shards


# About 7 s (tp2) and 17 s (tp4) on 2 busy CPU cores.
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [pytest.param(2, id="tp2"), pytest.param(4, id="tp4")])
def test_linear_kd_loss_matches_single_process(world):
    run_workers(check_all, world)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_weight_shards_read_outside_forward_are_refused():
    run_workers(check_fsdp_shards_are_not_vocabulary_shards, 2)
