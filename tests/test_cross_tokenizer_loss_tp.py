"""ULDLoss and HybridKDLoss on vocabulary-sharded logits (TP=2, gloo) equal one process: loss,
per-span values and the student gradient, for DTensor ``Shard(-1)`` logits and for plain local
shards with ``tp_group`` (uneven vocabularies included)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_kd.losses.cross_tokenizer_loss import HybridKDLoss, ULDLoss
from lightning_kd.losses.token_spans import TokenSpans
from lightning_kd.losses.vocab_map import VocabMap
from tests.helpers.distributed import run_workers
from tests.helpers.reference import assert_rel

# [batch 2] × student rows 7 / teacher rows 9; spans of 1-3 rows on either side.
ROWS = [
    [(0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 5), (4, 5, 5, 6), (6, 7, 7, 9)],
    [(0, 1, 0, 2), (1, 2, 2, 3), (2, 5, 3, 4), (5, 6, 4, 5), (6, 7, 5, 6)],
]


def _inputs(vs: int, vt: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 7, vs, generator=gen) * 2
    teacher = torch.randn(2, 9, vt, generator=gen) * 2
    s_labels = torch.randint(0, vs, (2, 7), generator=gen)
    t_labels = torch.randint(0, vt, (2, 9), generator=gen)
    # Make some single-row spans predict tokens with equal strings (exact in the hybrid).
    vmap = VocabMap(
        torch.arange(0, vs, 2), torch.arange(1, min(vt, vs + 1), 2)[: (vs + 1) // 2], vs, vt
    )
    for b, example in enumerate(ROWS):
        for s0, s1, t0, t1 in example:
            if s1 - s0 == 1 and t1 - t0 == 1:
                s_labels[b, s0] = 2 * (s0 % 3)
                t_labels[b, t0] = 2 * (s0 % 3) + 1
    return student, teacher, s_labels, t_labels, vmap


def _losses(vmap):
    return [
        ULDLoss(temperature=1.5, chunk_size=3),
        HybridKDLoss(vmap, "jsd", temperature=2.0, chunk_size=0, uld_weight=0.5),
        HybridKDLoss(vmap, "forward_kl", chunk_size=2),
    ]


def _single(loss, student, teacher, sl, tl, spans):
    s = student.clone().requires_grad_()
    out = loss(s, teacher, sl, tl, spans, return_per_span=True)
    (out.loss * 2.5).backward()
    return out, s.grad


def _tp_matches_one_process(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    group = mesh.get_group(0)
    spans = TokenSpans.from_rows(ROWS, 7, 9)
    for case, (vs, vt) in enumerate([(24, 30), (23, 37)]):
        student, teacher, sl, tl, vmap = _inputs(vs, vt, seed=case)
        for i, loss in enumerate(_losses(vmap)):
            ref, ref_grad = _single(loss, student, teacher, sl, tl, spans)
            if i > 0:
                assert ref.exact.any() and (~ref.exact).any()
            what = f"case {case}, loss {i}"
            # DTensors sharded on the vocabulary.
            s_dt = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
            t_dt = distribute_tensor(teacher, mesh, [Shard(-1)])
            out = loss(s_dt, t_dt, sl, tl, spans, return_per_span=True)
            (out.loss * 2.5).backward()
            assert_rel(out.loss, ref.loss, 1e-5, f"loss, {what}")
            assert_rel(out.per_span, ref.per_span, 1e-5, f"per span, {what}")
            assert torch.equal(out.exact, ref.exact)
            assert_rel(s_dt.grad.full_tensor(), ref_grad, 1e-4, f"DTensor grad, {what}")
            # Plain local shards (tensor_split: other uneven shards) with tp_group.
            s_loc = student.tensor_split(world, -1)[rank].clone().requires_grad_()
            t_loc = teacher.tensor_split(world, -1)[rank]
            loss.tp_group = group
            out = loss(s_loc, t_loc, sl, tl, spans, return_per_span=True)
            loss.tp_group = None
            (out.loss * 2.5).backward()
            assert_rel(out.loss, ref.loss, 1e-5, f"loss (shards), {what}")
            assert_rel(
                s_loc.grad, ref_grad.tensor_split(world, -1)[rank], 1e-4, f"grad (shards), {what}"
            )
    dist.barrier()


@pytest.mark.distributed
def test_tp2_equals_one_process():
    run_workers(_tp_matches_one_process, 2)
