"""Every divergence and the cross-entropy mix on vocab-sharded logits, in real gloo processes.

One spawn per mesh shape runs all the cases (divergences × kd_ratio × temperature, chunking,
even and uneven vocabularies, ``num_batch_labels``) on two inputs kinds: vocab-sharded
DTensors (the group inferred from the mesh) and plain local shards with an explicit
``tp_group`` (split with ``tensor_split``, unlike DTensor's ``chunk``: other uneven shards).
Loss, per-token values, both terms and the student gradient must equal the single-process
result (1e-5 / 1e-4 relative); the forward communicates only O(tokens) all-reduces and the
backward nothing.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lightning_kd import KDLoss
from lightning_kd.losses import JSD, SkewKL
from tests.helpers.distributed import CollectiveRecorder, run_workers
from tests.helpers.reference import assert_rel

LEAD = (2, 6)  # [batch, seq]; 12 tokens
DIVERGENCES = [
    "forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", JSD(0.3), SkewKL(0.25)
]  # fmt: skip
SETTINGS = [  # temperature, chunk_size, vocabulary, num_batch_labels
    (1.0, 0, 40, None),
    (2.0, 5, 37, 31),
    (0.5, 3, 37, None),
]
CASES = list(itertools.product(DIVERGENCES, (1.0, 0.5, 0.0), SETTINGS))


def _case_inputs(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*LEAD, vocab, generator=gen) * 3
    teacher = torch.randn(*LEAD, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, LEAD, generator=gen)
    labels[0, :2] = -100
    labels[1, 4] = -100
    return student, teacher, labels


def _single_process(student, teacher, labels, nbl=None, **kwargs):
    s = student.clone().requires_grad_()
    out = KDLoss(**kwargs)(s, teacher, labels, num_batch_labels=nbl, return_per_token=True)
    (out.loss * 2.5).backward()  # a non-unit incoming gradient
    return out, s.grad


def _mesh(mesh_shape):
    if len(mesh_shape) == 1:
        return init_device_mesh("cpu", mesh_shape), [Shard(-1)]
    names = ("data_parallel", "tensor_parallel")
    return init_device_mesh("cpu", mesh_shape, mesh_dim_names=names), [Replicate(), Shard(2)]


def _compare(out, grad, ref, ref_grad, what, per_token=True, grad_scale=None):
    assert_rel(out if not per_token else out.loss, ref.loss, 1e-5, f"loss, {what}")
    if per_token:
        assert_rel(out.per_token_kl, ref.per_token_kl, 1e-5, f"per-token divergence, {what}")
        assert_rel(out.per_token_ce, ref.per_token_ce, 1e-5, f"per-token CE, {what}")
        assert_rel(out.div_loss, ref.div_loss, 1e-5, f"div_loss, {what}")
        assert_rel(out.ce_loss, ref.ce_loss, 1e-5, f"ce_loss, {what}")
    assert_rel(grad, ref_grad, 1e-4, f"grad, {what}", grad_scale)


def _all_cases_match_single_process(rank, world, mesh_shape):
    mesh, placements = _mesh(mesh_shape)
    tp_group = mesh.get_group(len(mesh_shape) - 1)
    tp_size, tp_rank = mesh_shape[-1], dist.get_rank(tp_group)
    for i, (divergence, kd_ratio, (temperature, chunk, vocab, nbl)) in enumerate(CASES):
        student, teacher, labels = _case_inputs(vocab, seed=i)
        kwargs = dict(
            temperature=temperature, chunk_size=chunk, divergence=divergence, kd_ratio=kd_ratio
        )
        ref, ref_grad = _single_process(student, teacher, labels, nbl, **kwargs)
        what = f"rank {rank} case {i}: {divergence} kd={kd_ratio} T={temperature} " + (
            f"chunk={chunk} V={vocab} nbl={nbl}"
        )

        # Vocab-sharded DTensors, with the per-token outputs.
        s = distribute_tensor(student, mesh, placements).requires_grad_()
        t = distribute_tensor(teacher, mesh, placements)
        out = KDLoss(**kwargs)(s, t, labels, num_batch_labels=nbl, return_per_token=True)
        assert not isinstance(out.loss, DTensor)
        (out.loss * 2.5).backward()
        assert isinstance(s.grad, DTensor) and s.grad.placements == s.placements
        assert s.grad.to_local().shape == s.to_local().shape
        _compare(out, s.grad.full_tensor(), ref, ref_grad, f"DTensor, {what}")

        # Plain local shards with an explicit group, plain call.
        s_local = torch.tensor_split(student, tp_size, dim=-1)[tp_rank].clone().requires_grad_()
        t_local = torch.tensor_split(teacher, tp_size, dim=-1)[tp_rank].clone()
        loss = KDLoss(**kwargs, tp_group=tp_group)(s_local, t_local, labels, num_batch_labels=nbl)
        (loss * 2.5).backward()
        ref_slice = torch.tensor_split(ref_grad, tp_size, dim=-1)[tp_rank]
        # A shard's gradient is compared at the scale of the whole one.
        _compare(loss, s_local.grad, ref, ref_slice, f"tp_group, {what}", per_token=False,
                 grad_scale=ref_grad.abs().max())  # fmt: skip

    for j, divergence in enumerate(DIVERGENCES):
        # A padded vocabulary: -inf in both logits, a whole shard of it for TP=4.
        student, teacher, labels = _case_inputs(40, seed=1000 + j)
        student[..., 30:] = -math.inf
        teacher[..., 30:] = -math.inf
        labels = torch.where(labels >= 30, labels - 30, labels)
        kwargs = dict(temperature=2.0, chunk_size=4, divergence=divergence, kd_ratio=0.5)
        ref, ref_grad = _single_process(student, teacher, labels, **kwargs)
        s = distribute_tensor(student, mesh, placements).requires_grad_()
        t = distribute_tensor(teacher, mesh, placements)
        out = KDLoss(**kwargs)(s, t, labels, return_per_token=True)
        (out.loss * 2.5).backward()
        assert torch.isfinite(out.loss) and torch.isfinite(s.grad.to_local()).all()
        _compare(out, s.grad.full_tensor(), ref, ref_grad, f"rank {rank} masked, {divergence}")

        # All labels ignored: a finite zero, connected, with a zero gradient.
        s = distribute_tensor(student, mesh, placements).requires_grad_()
        loss = KDLoss(**kwargs)(s, t, torch.full_like(labels, -100))
        loss.backward()
        assert loss.item() == 0.0 and s.grad.to_local().abs().max() == 0

    if mesh_shape == (2,):
        _collectives_are_small(rank, world, mesh)
        _bad_labels_refused_on_every_rank(rank, world, mesh)


def _collectives_are_small(rank, world, mesh):
    """Every divergence, with and without the CE term: all-reduces of at most two values per
    token in forward (packed row sums), none in backward."""
    vocab = 1024  # ≫ the 2 × 12 values per collective allowed
    student, teacher, labels = _case_inputs(vocab, seed=7)
    n_tokens = labels.numel()
    for divergence, kd_ratio, per_token in itertools.product(
        DIVERGENCES, (1.0, 0.5, 0.0), (False, True)
    ):
        s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
        t = distribute_tensor(teacher, mesh, [Shard(-1)])
        loss_fn = KDLoss(chunk_size=4, divergence=divergence, kd_ratio=kd_ratio, temperature=2.0)
        with CollectiveRecorder() as fwd:
            out = loss_fn(s, t, labels, return_per_token=per_token)
        loss = out.loss if per_token else out
        with CollectiveRecorder() as bwd:
            loss.backward()
        what = f"{divergence} kd={kd_ratio} per_token={per_token}"
        assert fwd.calls, f"the TP path must communicate in forward ({what})"
        for name, sizes in fwd.calls:
            assert "allreduce" in name or "all_reduce" in name, f"{what}: {name}"
            assert max(sizes) <= 2 * n_tokens, f"{what}: {name} moved {sizes} elements"
        assert bwd.calls == [], f"{what}: backward must not communicate, saw {bwd.calls}"


def _bad_labels_refused_on_every_rank(rank, world, mesh):
    student, teacher, labels = _case_inputs(37, seed=3)
    labels = labels.clone()
    labels[1, 1] = 37  # one past the whole vocabulary (each rank holds ~18 columns)
    s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    t = distribute_tensor(teacher, mesh, [Shard(-1)])
    for kd_ratio in (0.5, 1.0):  # pure distillation too: such labels are padding, not tokens
        with pytest.raises(ValueError, match=r"vocabulary ids in \[0, 37\)"):
            KDLoss(kd_ratio=kd_ratio, divergence="tvd")(s, t, labels)
    # Same tokens selected but other label values on one rank: refused on every rank, not a
    # hang or a silently wrong loss (also for pure distillation, which does not read them:
    # other labels mean another batch, e.g. data-parallel ranks taken for a TP group).
    other = labels.clone()
    if rank == 0:
        other[0, 3] = (other[0, 3] + 1) % 37
    for loss_fn, kwargs in ((KDLoss(kd_ratio=0.5), {}), (KDLoss(), {"return_per_token": True}),
                            (KDLoss(), {})):  # fmt: skip
        with pytest.raises(ValueError, match="labels differ"):
            loss_fn(s, t, other, **kwargs)


# Each spawn runs ~150 cases: about 10 s (tp2) to 20 s (tp4) on 2 busy CPU cores.
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "mesh_shape"),
    [
        pytest.param(2, (2,), id="tp2"),
        pytest.param(4, (4,), id="tp4"),
        pytest.param(4, (2, 2), id="dp2xtp2"),
    ],
)
def test_every_divergence_matches_single_process(world, mesh_shape):
    run_workers(_all_cases_match_single_process, world, mesh_shape)
