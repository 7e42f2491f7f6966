"""KDLoss on vocab-sharded logits in real gloo processes, against the single-process loss.

Each test spawns its processes once and loops over its cases inside them, to keep the suite
fast. Loss and student gradient (``grad.full_tensor()``) must match the single-process result
within 1e-5 / 1e-4 relative.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lightning_kd import KDLoss
from lightning_kd.losses.cross_entropy import token_cross_entropy
from lightning_kd.losses.divergences import ReverseKL
from lightning_kd.losses.engine import PassSpec, distill_over_rows
from lightning_kd.losses.vocab_parallel import VocabParallelSoftmax, find_vocab_tp_group
from lightning_kd.losses.vocab_softmax import LocalVocabSoftmax
from tests.helpers.distributed import CollectiveRecorder, run_workers
from tests.helpers.reference import assert_rel

LEAD = (2, 6)  # [batch, seq]; 12 tokens


def _case_inputs(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*LEAD, vocab, generator=gen) * 3
    teacher = torch.randn(*LEAD, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, LEAD, generator=gen)
    labels[0, :2] = -100
    labels[1, 4] = -100
    return student, teacher, labels


def _single_process(student, teacher, labels, **kwargs):
    nbl = kwargs.pop("num_batch_labels", None)
    s = student.clone().requires_grad_()
    out = KDLoss(**kwargs)(s, teacher, labels, num_batch_labels=nbl, return_per_token=True)
    out.loss.backward()
    return out, s.grad


def _mesh(mesh_shape):
    if len(mesh_shape) == 1:
        return init_device_mesh("cpu", mesh_shape), [Shard(-1)]
    names = ("data_parallel", "tensor_parallel")
    return init_device_mesh("cpu", mesh_shape, mesh_dim_names=names), [Replicate(), Shard(2)]


CASES = list(
    itertools.product(
        (1.0, 2.0),  # temperature
        (0, 5),  # chunk_size
        (40, 37),  # even and uneven vocabulary
        (None, 31),  # num_batch_labels
    )
)


def _dtensor_matches_single_process(rank, world, mesh_shape):
    mesh, placements = _mesh(mesh_shape)
    tp_group = mesh.get_group(len(mesh_shape) - 1)
    tp_size = mesh_shape[-1]  # the ranks of this rank's row of the (dp, tp) mesh
    tp_ranks = list(range(rank // tp_size * tp_size, (rank // tp_size + 1) * tp_size))
    for i, (temperature, chunk_size, vocab, nbl) in enumerate(CASES):
        student, teacher, labels = _case_inputs(vocab, seed=i)
        kwargs = dict(temperature=temperature, chunk_size=chunk_size, num_batch_labels=nbl)
        ref, ref_grad = _single_process(student, teacher, labels, **kwargs)

        s = distribute_tensor(student, mesh, placements).requires_grad_()
        t = distribute_tensor(teacher, mesh, placements)
        found = find_vocab_tp_group(s)
        assert found is tp_group, f"rank {rank}: not the mesh's tensor-parallel group"
        assert dist.get_process_group_ranks(found) == tp_ranks, (
            f"rank {rank}: {dist.get_process_group_ranks(found)} != {tp_ranks}"
        )
        nbl_kw = kwargs.pop("num_batch_labels")
        out = KDLoss(**kwargs)(s, t, labels, num_batch_labels=nbl_kw, return_per_token=True)
        assert not isinstance(out.loss, DTensor)
        (out.loss * 2.5).backward()  # a non-unit incoming gradient
        ref_grad = ref_grad * 2.5
        what = f"rank {rank} case T={temperature} chunk={chunk_size} V={vocab} nbl={nbl}"
        assert_rel(out.loss, ref.loss, 1e-5, f"loss, {what}")
        assert_rel(out.per_token_kl, ref.per_token_kl, 1e-5, f"per-token KL, {what}")
        assert isinstance(s.grad, DTensor) and s.grad.placements == s.placements
        assert_rel(s.grad.full_tensor(), ref_grad, 1e-4, f"grad, {what}")
        local = s.grad.to_local()
        assert local.shape == s.to_local().shape, "gradient must stay a local vocab shard"


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world", "mesh_shape"),
    [
        pytest.param(2, (2,), id="tp2"),
        pytest.param(4, (4,), id="tp4", marks=pytest.mark.slow),
        pytest.param(4, (2, 2), id="dp2xtp2", marks=pytest.mark.slow),
    ],
)
def test_dtensor_logits_match_single_process(world, mesh_shape):
    run_workers(_dtensor_matches_single_process, world, mesh_shape)


def _explicit_group_matches_single_process(rank, world):
    group = dist.new_group(list(range(world)))
    for i, (temperature, chunk_size, vocab, nbl) in enumerate(CASES):
        student, teacher, labels = _case_inputs(vocab, seed=100 + i)
        ref, ref_grad = _single_process(
            student, teacher, labels, temperature=temperature, chunk_size=chunk_size,
            num_batch_labels=nbl,
        )  # fmt: skip
        s_local = torch.tensor_split(student, world, dim=-1)[rank].clone().requires_grad_()
        t_local = torch.tensor_split(teacher, world, dim=-1)[rank].clone()
        loss_fn = KDLoss(temperature=temperature, chunk_size=chunk_size, tp_group=group)
        out = loss_fn(s_local, t_local, labels, num_batch_labels=nbl, return_per_token=True)
        out.loss.backward()
        assert_rel(out.loss, ref.loss, 1e-5, f"loss case {i}")
        assert_rel(out.per_token_kl, ref.per_token_kl, 1e-5, f"per-token case {i}")
        ref_slice = torch.tensor_split(ref_grad, world, dim=-1)[rank]
        assert_rel(s_local.grad, ref_slice, 1e-4, f"grad case {i}")

    # Ranks may hold their shards in different memory layouts (here rank 1's cannot be viewed
    # as [N, V]); the chunk plan, and so every collective, must not depend on it.
    student, teacher, labels = _case_inputs(40, seed=9)
    labels = labels.clone()
    labels[:, 1:] = 7
    labels[1, 3] = -100  # one hole in a dense window
    ref, ref_grad = _single_process(student, teacher, labels, chunk_size=5)
    s_local = torch.tensor_split(student, world, dim=-1)[rank].clone()
    t_local = torch.tensor_split(teacher, world, dim=-1)[rank].clone()
    if rank == 1:
        s_local = s_local.transpose(0, 1).contiguous().transpose(0, 1)
        t_local = t_local.transpose(0, 1).contiguous().transpose(0, 1)
    s_local.requires_grad_()
    loss = KDLoss(chunk_size=5, tp_group=group)(s_local, t_local, labels)
    loss.backward()
    assert_rel(loss, ref.loss, 1e-5, "loss with mixed layouts")
    ref_slice = torch.tensor_split(ref_grad, world, dim=-1)[rank]
    assert_rel(s_local.grad, ref_slice, 1e-4, "grad with mixed layouts")

    # Labels that differ across the group are refused on every rank, not a hang.
    bad_labels = labels.clone()
    if rank == 0:
        bad_labels[0, 5] = -100
    with pytest.raises(ValueError, match="labels differ"):
        KDLoss(tp_group=group)(s_local, t_local, bad_labels)

    # A rank outside the given group is refused.
    only_rank0 = dist.new_group([0])
    if rank == 1:
        with pytest.raises(ValueError, match="not a member"):
            KDLoss(tp_group=only_rank0)(s_local, t_local, labels)

    # The same engine and TP softmax serve another divergence (reverse KL).
    student, teacher, labels = _case_inputs(37, seed=5)
    full = student.clone().requires_grad_()
    valid = labels != -100
    spec = PassSpec(ReverseKL(), 2.0, float(valid.sum()), 0, torch.float32)
    ref = distill_over_rows(full, teacher, valid, LocalVocabSoftmax(), spec).loss
    ref.backward()
    s_local = torch.tensor_split(student, world, dim=-1)[rank].clone().requires_grad_()
    t_local = torch.tensor_split(teacher, world, dim=-1)[rank]
    spec = spec._replace(chunk_size=4)
    loss = distill_over_rows(s_local, t_local, valid, VocabParallelSoftmax(group), spec).loss
    loss.backward()
    assert_rel(loss, ref, 1e-5, "reverse KL loss")
    ref_slice = torch.tensor_split(full.grad, world, dim=-1)[rank]
    assert_rel(s_local.grad, ref_slice, 1e-4, "reverse KL grad")


@pytest.mark.distributed
def test_explicit_tp_group_with_local_shards():
    run_workers(_explicit_group_matches_single_process, 2)


def _collectives_are_small(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    vocab = 4096
    student, teacher, labels = _case_inputs(vocab, seed=7)
    n_tokens = labels.numel()
    for chunk_size in (0, 4):
        s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
        t = distribute_tensor(teacher, mesh, [Shard(-1)])
        with CollectiveRecorder() as fwd:
            loss = KDLoss(chunk_size=chunk_size)(s, t, labels)
        with CollectiveRecorder() as bwd:
            loss.backward()
        assert fwd.calls, "the TP path must communicate in forward"
        for name, sizes in fwd.calls:
            assert "allreduce" in name or "all_reduce" in name, f"unexpected collective {name}"
            assert max(sizes) <= n_tokens, f"{name} moved {sizes} elements for {n_tokens} tokens"
        assert bwd.calls == [], f"backward must not communicate, saw {bwd.calls}"


@pytest.mark.distributed
def test_collectives_are_all_reduces_of_per_token_size():
    run_workers(_collectives_are_small, 2)


def _mixed_inputs_and_other_placements(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    student, teacher, labels = _case_inputs(37, seed=3)
    sharded = distribute_tensor(student, mesh, [Shard(-1)])
    loss_fn = KDLoss()
    with pytest.raises(ValueError, match="both be DTensors"):
        loss_fn(sharded, teacher, labels)
    with pytest.raises(ValueError, match="both be DTensors"):
        loss_fn(student, distribute_tensor(teacher, mesh, [Shard(-1)]), labels)
    with pytest.raises(ValueError, match="same placements"):
        loss_fn(sharded, distribute_tensor(teacher, mesh, [Replicate()]), labels)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(
            sharded, distribute_tensor(teacher[..., :-1].contiguous(), mesh, [Shard(-1)]), labels
        )
    mesh2 = init_device_mesh("cpu", (1, world))
    with pytest.raises(ValueError, match="replicated on every other"):
        two_d = distribute_tensor(student, mesh2, [Shard(0), Shard(-1)])
        loss_fn(two_d, distribute_tensor(teacher, mesh2, [Shard(0), Shard(-1)]), labels)
    with pytest.raises(ValueError, match="more than one mesh dimension"):
        twice = [Shard(-1), Shard(-1)]
        loss_fn(distribute_tensor(student, mesh2, twice), distribute_tensor(teacher, mesh2, twice),
                labels)  # fmt: skip

    # Replicated DTensors take the single-process path; labels may be a replicated DTensor.
    ref, ref_grad = _single_process(student, teacher, labels)
    s = distribute_tensor(student, mesh, [Replicate()]).requires_grad_()
    t = distribute_tensor(teacher, mesh, [Replicate()])
    assert find_vocab_tp_group(s) is None
    loss = loss_fn(s, t, distribute_tensor(labels, mesh, [Replicate()]))
    loss.backward()
    assert_rel(loss, ref.loss, 1e-5, "replicated loss")
    assert_rel(s.grad.full_tensor(), ref_grad, 1e-4, "replicated grad")

    # Sharded logits with replicated-DTensor labels.
    s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    t = distribute_tensor(teacher, mesh, [Shard(-1)])
    loss = loss_fn(s, t, distribute_tensor(labels, mesh, [Replicate()]))
    assert_rel(loss, ref.loss, 1e-5, "sharded loss with DTensor labels")

    # All labels ignored on the TP path: finite zero, zero gradient.
    s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    loss = loss_fn(s, t, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0 and s.grad.to_local().abs().max() == 0


@pytest.mark.distributed
def test_mixed_inputs_rejected_and_replicated_dtensors_work():
    run_workers(_mixed_inputs_and_other_placements, 2)


def test_find_vocab_tp_group_on_plain_tensor_is_none():
    assert find_vocab_tp_group(torch.randn(2, 3)) is None


def _cross_entropy_matches(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    for vocab in (40, 37):
        student, _, labels = _case_inputs(vocab, seed=11)
        full = student.clone().requires_grad_()
        ref = token_cross_entropy(full, labels)
        ref.backward()
        expected = torch.nn.functional.cross_entropy(
            student.reshape(-1, vocab), labels.reshape(-1), reduction="sum"
        )
        # Two float32 sums of 12 per-token cross-entropies in different orders: float32
        # precision.
        assert_rel(ref, expected, 1e-5, "plain cross-entropy")
        s = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
        with CollectiveRecorder() as rec:
            ce = token_cross_entropy(s, labels)
        assert all("allreduce" in name for name, _ in rec.calls), rec.calls
        ce.backward()
        assert_rel(ce, ref, 1e-5, f"sharded cross-entropy V={vocab}")
        assert_rel(s.grad.full_tensor(), full.grad, 1e-5, f"sharded CE grad V={vocab}")


@pytest.mark.distributed
def test_cross_entropy_on_vocab_shards_matches_plain():
    run_workers(_cross_entropy_matches, 2)
