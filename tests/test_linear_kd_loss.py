"""LinearKDLoss (one process) against the unfused path: ``KDLoss`` on ``hidden @ W.T + b``.

Value, per-token outputs and the gradients of the student's hidden states, weight and bias must
equal the unfused path (float64: 1e-5 values, 1e-4 gradients, relative to the largest
magnitude) for every divergence and kd_ratio, over temperatures, chunk sizes, biases,
``num_batch_labels`` and ignored tokens; bf16 within 2e-3 (gradients 4 × that: bf16
storage). Also: no tensor of ``[N, V]``
elements is ever created, teachers get no gradient, the kinds of weight an FSDP2 head hands
over (leaf parameter, view), autocast, and the input checks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_kd import KDLoss, LinearKDLoss
from lightning_kd.losses import JSD, SkewKL, engine, linear_engine
from tests.helpers.reference import assert_rel

LEAD = (3, 7)  # [batch, seq]: 21 tokens
V, D_S, D_T = 29, 6, 10
DIVERGENCES = [
    "forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", JSD(0.3), SkewKL(0.25)
]  # fmt: skip
SETTINGS = [  # temperature, chunk_size, biases, num_batch_labels
    (1.0, 0, True, None),
    (2.0, 7, False, 40),
    (0.5, 1, True, None),
    (1.0, 64, False, None),
    (2.0, 4, True, 17.0),
]


def _inputs(seed, dtype=torch.float64, lead=LEAD, vocab=V, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(*lead, D_S, generator=gen, dtype=dtype)
    w = torch.randn(vocab, D_S, generator=gen, dtype=dtype)
    ht = torch.randn(*lead, D_T, generator=gen, dtype=dtype)
    wt = torch.randn(vocab, D_T, generator=gen, dtype=dtype)
    b = torch.randn(vocab, generator=gen, dtype=dtype) if bias else None
    bt = torch.randn(vocab, generator=gen, dtype=dtype) if bias else None
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels.view(-1)[[0, 1, 5, 11, 12]] = -100
    return hs, w, b, ht, wt, bt, labels


def _leaves(hs, w, b):
    return [x.detach().clone().requires_grad_() if x is not None else None for x in (hs, w, b)]


def _unfused(hs, w, b, ht, wt, bt, labels, nbl=None, grad_out=2.5, **kwargs):
    """The unfused path. ``F.linear`` (``hs @ w.T + b`` as one addmm, what an lm_head does)
    rounds half-precision logits once, like the fused path."""
    hs, w, b = _leaves(hs, w, b)
    s = nn.functional.linear(hs, w, b)
    t = nn.functional.linear(ht, wt, bt)
    out = KDLoss(**kwargs)(s, t, labels, num_batch_labels=nbl, return_per_token=True)
    (out.loss * grad_out).backward()
    return out, [x.grad if x is not None else None for x in (hs, w, b)]


def _fused(hs, w, b, ht, wt, bt, labels, nbl=None, grad_out=2.5, per_token=True, **kwargs):
    hs, w, b = _leaves(hs, w, b)
    out = LinearKDLoss(**kwargs)(
        hs, w, ht, wt, labels, b, bt, num_batch_labels=nbl, return_per_token=per_token
    )
    ((out.loss if per_token else out) * grad_out).backward()
    return out, [x.grad if x is not None else None for x in (hs, w, b)]


def _compare(out, grads, ref, ref_grads, what, value_rel=1e-5, grad_rel=1e-4, per_token=True):
    assert_rel(out.loss if per_token else out, ref.loss, value_rel, f"loss, {what}")
    if per_token:
        for field in ("per_token_kl", "per_token_ce", "div_loss", "ce_loss"):
            assert_rel(getattr(out, field), getattr(ref, field), value_rel, f"{field}, {what}")
        assert torch.equal(out.valid_mask, ref.valid_mask)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert (g is None) == (r is None), f"grad of {name} present/absent, {what}"
        if g is not None:
            assert g.dtype == r.dtype and g.shape == r.shape, f"grad of {name}, {what}"
            assert_rel(g, r, grad_rel, f"grad of {name}, {what}")


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=str)
def test_matches_unfused(divergence, kd_ratio):
    for i, (temperature, chunk, bias, nbl) in enumerate(SETTINGS):
        inputs = _inputs(seed=i, bias=bias)
        kwargs = dict(
            temperature=temperature, chunk_size=chunk, divergence=divergence, kd_ratio=kd_ratio
        )
        what = f"{divergence} kd={kd_ratio} T={temperature} chunk={chunk} bias={bias} nbl={nbl}"
        ref, ref_grads = _unfused(*inputs, nbl=nbl, **kwargs)
        out, grads = _fused(*inputs, nbl=nbl, **kwargs)
        _compare(out, grads, ref, ref_grads, what)
        # The plain call (no per-token outputs: kd_ratio 1 computes no CE, 0 no divergence).
        out, grads = _fused(*inputs, nbl=nbl, per_token=False, **kwargs)
        _compare(out, grads, ref, ref_grads, f"plain call, {what}", per_token=False)


def test_ce_only_needs_no_teacher():
    hs, w, b, ht, wt, bt, labels = _inputs(seed=3)
    ref, ref_grads = _unfused(hs, w, b, ht, wt, bt, labels, kd_ratio=0.0, chunk_size=5)
    hs2, w2, b2 = _leaves(hs, w, b)
    loss = LinearKDLoss(kd_ratio=0.0, chunk_size=5)(hs2, w2, None, None, labels, b2)
    (loss * 2.5).backward()
    _compare(loss, [hs2.grad, w2.grad, b2.grad], ref, ref_grads, "teacher None", per_token=False)
    with pytest.raises(ValueError, match="needed for the divergence"):
        LinearKDLoss(kd_ratio=0.0)(hs, w, None, None, labels, return_per_token=True)
    with pytest.raises(ValueError, match="needed for the divergence"):
        LinearKDLoss(kd_ratio=0.5)(hs, w, None, None, labels)


def test_teacher_matmul_skipped_for_ce_only():
    """kd_ratio=0 without per-token outputs computes no teacher logits at all."""
    hs, w, b, ht, wt, bt, labels = _inputs(seed=4)
    with _MaxNumel() as rec:
        LinearKDLoss(kd_ratio=0.0, chunk_size=4)(hs, w, ht, wt, labels, b, bt)
    assert not any(x.shape[-1] == D_T for x in rec.inputs), "the teacher's hidden was read"


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op returns, and every op's tensor inputs."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.max_numel = max(self.max_numel, x.numel())
        for x in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(x, torch.Tensor) and x.ndim == 2:
                self.inputs.append(x)
        return out


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_no_n_by_v_tensor(divergence):
    """Forward and backward never create a tensor with [N, V] elements (N=120 tokens, V=97,
    chunks of 8): the largest is a chunk's [8, V] or a gradient shaped like an input."""
    hs, w, b, ht, wt, bt, labels = _inputs(seed=5, lead=(4, 30), vocab=97)
    hs, w, b = _leaves(hs, w, b)
    loss_fn = LinearKDLoss(chunk_size=8, divergence=divergence, kd_ratio=0.5)
    with _MaxNumel() as rec:
        out = loss_fn(hs, w, ht, wt, labels, b, bt, return_per_token=True)
        out.loss.backward()
    bound = max(8 * 97, hs.numel(), ht.numel(), w.numel(), wt.numel())
    assert rec.max_numel <= bound < labels.numel() * 97


# Not TVD: its gradient is a sign, which bf16 rounding of the logits may flip.
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", JSD(0.3)], ids=str)
def test_bf16_inputs(divergence):
    hs, w, b, ht, wt, bt, labels = _inputs(seed=6, dtype=torch.bfloat16)
    kwargs = dict(temperature=2.0, chunk_size=4, divergence=divergence, kd_ratio=0.5)
    ref, ref_grads = _unfused(hs, w, b, ht, wt, bt, labels, **kwargs)
    out, grads = _fused(hs, w, b, ht, wt, bt, labels, **kwargs)
    assert out.loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    # bf16 gradient storage rounds to 2^-8 (as in test_kd_loss's bf16 tests).
    _compare(out, grads, ref, ref_grads, f"bf16 {divergence}", value_rel=2e-3, grad_rel=2e-3 * 4)


def test_mixed_dtypes_and_no_upcast():
    """A bf16 teacher with an fp32 student (compute in fp32), and fp32_upcast=False on bf16."""
    hs, w, b, ht, wt, bt, labels = _inputs(seed=7, dtype=torch.float32)
    ht, wt, bt = ht.bfloat16(), wt.bfloat16(), bt.bfloat16()
    ref, ref_grads = _unfused(hs, w, b, ht, wt, bt, labels, chunk_size=4, kd_ratio=0.5)
    out, grads = _fused(hs, w, b, ht, wt, bt, labels, chunk_size=4, kd_ratio=0.5)
    _compare(out, grads, ref, ref_grads, "bf16 teacher", value_rel=2e-3, grad_rel=2e-3 * 4)
    inputs = _inputs(seed=8, dtype=torch.bfloat16)
    kwargs = dict(chunk_size=4, kd_ratio=0.5, fp32_upcast=False)
    ref, ref_grads = _unfused(*inputs, **kwargs)
    out, grads = _fused(*inputs, **kwargs)
    assert out.loss.dtype == torch.bfloat16
    _compare(out, grads, ref, ref_grads, "no upcast", value_rel=2e-2, grad_rel=3e-2)


def test_autocast_uses_the_autocast_dtype_like_f_linear():
    hs, w, b, ht, wt, bt, labels = _inputs(seed=9, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hs1, w1, b1 = _leaves(hs, w, b)
        s = nn.functional.linear(hs1, w1, b1)
        t = nn.functional.linear(ht, wt, bt)
        assert s.dtype == torch.bfloat16
        ref = KDLoss(chunk_size=4, kd_ratio=0.5)(s, t, labels)
        hs2, w2, b2 = _leaves(hs, w, b)
        loss = LinearKDLoss(chunk_size=4, kd_ratio=0.5)(hs2, w2, ht, wt, labels, b2, bt)
    ref.backward()
    loss.backward()
    assert_rel(loss, ref, 2e-3, "autocast loss")
    for g, r in ((hs2.grad, hs1.grad), (w2.grad, w1.grad), (b2.grad, b1.grad)):
        assert g.dtype == r.dtype == torch.float32
        assert_rel(g, r, 1e-2, "autocast grad")


def test_all_ignored_is_a_connected_zero():
    hs, w, b, ht, wt, bt, labels = _inputs(seed=10)
    labels = torch.full_like(labels, -100)
    for kd_ratio in (1.0, 0.5, 0.0):
        hs2, w2, b2 = _leaves(hs, w, b)
        out = LinearKDLoss(kd_ratio=kd_ratio)(
            hs2, w2, ht, wt, labels, b2, bt, return_per_token=True
        )
        assert out.loss.item() == 0.0 and out.loss.requires_grad
        out.loss.backward()
        for g, x in ((hs2.grad, hs2), (w2.grad, w2), (b2.grad, b2)):
            assert g.shape == x.shape and g.abs().max() == 0
        assert not out.valid_mask.any() and out.per_token_kl.abs().max() == 0


def test_teacher_gets_no_gradient_and_weight_kinds():
    """Teacher tensors that require grad are used as constants. The student's weight may be a
    leaf nn.Parameter, a non-leaf view of one, or tied to an embedding; gradients reach the
    parameters through autograd."""
    hs, w, b, ht, wt, bt, labels = _inputs(seed=11)
    ref, ref_grads = _unfused(hs, w, b, ht, wt, bt, labels, chunk_size=3, kd_ratio=0.5)
    teacher = [x.clone().requires_grad_() for x in (ht, wt, bt)]
    loss_fn = LinearKDLoss(chunk_size=3, kd_ratio=0.5)

    head = nn.Linear(D_S, V, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    hidden = hs.clone().requires_grad_()
    loss = loss_fn(hidden, head.weight, teacher[0], teacher[1], labels, head.bias, teacher[2])
    (loss * 2.5).backward()
    _compare(loss, [hidden.grad, head.weight.grad, head.bias.grad], ref, ref_grads, "leaf",
             per_token=False)  # fmt: skip
    assert all(x.grad is None for x in teacher)

    flat = nn.Parameter(w.reshape(-1).clone())  # the weight as a view of another parameter
    hidden = hs.clone().requires_grad_()
    loss = loss_fn(hidden, flat.view(V, D_S), ht, wt, labels, b, bt)
    (loss * 2.5).backward()
    assert_rel(flat.grad.view(V, D_S), ref_grads[1], 1e-4, "view of a parameter")

    emb = nn.Embedding(V, D_S, dtype=torch.float64)  # tied: the grad adds to the lookup's
    with torch.no_grad():
        emb.weight.copy_(w)
    ids = torch.tensor([[1, 2], [2, 3]])
    hidden = hs.clone().requires_grad_()
    (loss_fn(hidden, emb.weight, ht, wt, labels, b, bt) * 2.5 + emb(ids).sum()).backward()
    lookup = torch.zeros(V, D_S, dtype=torch.float64)
    lookup.index_add_(0, ids.reshape(-1), torch.ones(4, D_S, dtype=torch.float64))
    assert_rel(emb.weight.grad, ref_grads[1] + lookup, 1e-4, "tied embedding")


def test_only_required_gradients_and_no_grad_mode():
    hs, w, b, ht, wt, bt, labels = _inputs(seed=12)
    ref, ref_grads = _unfused(hs, w, b, ht, wt, bt, labels, chunk_size=5)
    hidden = hs.clone().requires_grad_()  # frozen head
    (LinearKDLoss(chunk_size=5)(hidden, w, ht, wt, labels, b, bt) * 2.5).backward()
    assert_rel(hidden.grad, ref_grads[0], 1e-4, "hidden only")
    weight = w.clone().requires_grad_()  # frozen hidden states
    (LinearKDLoss(chunk_size=5)(hs, weight, ht, wt, labels, b, bt) * 2.5).backward()
    assert_rel(weight.grad, ref_grads[1], 1e-4, "weight only")
    hs2, w2, b2 = _leaves(hs, w, b)
    with torch.no_grad():
        out = LinearKDLoss(chunk_size=5)(hs2, w2, ht, wt, labels, b2, bt, return_per_token=True)
    assert not out.loss.requires_grad
    assert_rel(out.loss, ref.loss, 1e-5, "no_grad loss")
    assert_rel(out.per_token_ce, ref.per_token_ce, 1e-5, "no_grad CE")


def test_non_contiguous_hidden_states():
    hs, w, b, ht, wt, bt, labels = _inputs(seed=13, lead=(3, 8))
    hs_nc = hs.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    ht_nc = torch.cat([ht, ht], -1)[..., :D_T]
    ref, ref_grads = _unfused(hs, w, b, ht, wt, bt, labels, chunk_size=5, kd_ratio=0.5)
    out, grads = _fused(hs_nc, w, b, ht_nc, wt, bt, labels, chunk_size=5, kd_ratio=0.5)
    _compare(out, grads, ref, ref_grads, "non-contiguous")


def test_options_match_kd_loss():
    loss = LinearKDLoss()
    assert loss.chunk_size == 1024 and loss.kd_ratio == 1.0 and loss.temperature == 1.0
    src = KDLoss(temperature=2.0, divergence=JSD(0.3), kd_ratio=0.25, ignore_index=-1)
    made = LinearKDLoss.from_kd_loss(src)
    assert made.divergence == JSD(0.3) and made.kd_ratio == 0.25 and made.ignore_index == -1
    assert made.temperature == 2.0 and made.chunk_size == 1024
    assert LinearKDLoss.from_kd_loss(src, chunk_size=7).chunk_size == 7
    assert "JSD" in repr(made)
    for bad in (
        dict(temperature=0.0), dict(chunk_size=-1), dict(kd_ratio=1.5), dict(divergence="kl"),
        dict(chunk_size=True), dict(fp32_upcast="no"), dict(ignore_index=1.0),
    ):  # fmt: skip
        with pytest.raises(ValueError):
            LinearKDLoss(**bad)
    with pytest.raises(ValueError, match="must be a KDLoss"):
        LinearKDLoss.from_kd_loss(loss)


def test_bad_inputs():
    hs, w, b, ht, wt, bt, labels = _inputs(seed=14)
    fn = LinearKDLoss()

    def call(**over):
        args = dict(hs=hs, w=w, ht=ht, wt=wt, labels=labels, b=b, bt=bt)
        args.update(over)
        a = args
        return fn(a["hs"], a["w"], a["ht"], a["wt"], a["labels"], a["b"], a["bt"])

    cases = [
        (dict(hs=hs[..., :-1]), "last dimension"),
        (dict(wt=wt[:, :-1]), "last dimension"),
        (dict(wt=wt[:-1], bt=bt[:-1]), "same vocabulary size"),
        (dict(w=w[0]), "2-D"),
        (dict(b=b[:-1]), r"shape \[V\]"),
        (dict(b=b[None]), "1-D"),
        (dict(labels=labels[:, :-1]), "labels' shape"),
        (dict(ht=ht[:, :-1]), "labels' shape"),
        (dict(labels=labels.double()), "integer"),
        (dict(hs=hs.long()), "floating-point"),
        (dict(w=w.int()), "floating-point"),
        (dict(b=[0.0] * V), "must be a tensor"),
        (dict(ht=None), "both teacher_hidden and teacher_weight"),
        (dict(hs=hs.new_zeros(())), "0-dim"),
    ]
    for over, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**over)
    with pytest.raises(ValueError, match="num_batch_labels"):
        fn(hs, w, ht, wt, labels, num_batch_labels=0)
    with pytest.raises(ValueError, match=r"vocabulary ids in \[0, 29\)"):
        bad = labels.clone()
        bad[2, 3] = V
        LinearKDLoss(kd_ratio=0.5)(hs, w, ht, wt, bad)
    with pytest.raises(ValueError, match="teacher_bias"):
        LinearKDLoss(kd_ratio=0.0)(hs, w, None, None, labels, teacher_bias=bt)


def test_public_import():
    import lightning_kd
    from lightning_kd.losses import LinearKDLoss as FromLosses

    assert lightning_kd.LinearKDLoss is FromLosses is LinearKDLoss
    assert "LinearKDLoss" in lightning_kd.__all__


def test_weight_gradient_sums_do_not_overflow_in_fp16():
    """Without upcast the softmaxes run in fp16, but the weight and bias gradients sum over
    every token: kept in fp32 they stay finite and close to the float64 gradient (an fp16
    accumulator overflowed to inf at this N)."""
    hs, w, b, ht, wt, bt, labels = _inputs(7, lead=(4, 4096), vocab=16)
    labels.fill_(1)
    _, ref_grads = _fused(hs, w, b, ht, wt, bt, labels, chunk_size=512)
    half = [x.half() for x in (hs, w, b, ht, wt, bt)]
    _, grads = _fused(*half, labels, chunk_size=512, fp32_upcast=False)
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad.double(), ref, rtol=2e-2, atol=1e-3, msg=name)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_kl", "skew_reverse_kl"])
def test_row_blocks_match_unfused(monkeypatch, divergence):
    """The chunk's student logits in one matmul, the teacher's in blocks of 5 rows and the
    chunk math in blocks of 2 (blocks that divide neither the chunks nor each other): the same
    values and gradients as the unfused path, and one [chunk, V] buffer in all."""
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 2 * V)
    monkeypatch.setattr(linear_engine, "TEACHER_BLOCK_ELEMENTS", 5 * V)
    for chunk, kd_ratio in ((7, 0.5), (0, 1.0), (16, 0.0)):
        inputs = _inputs(seed=11, bias=True)
        kwargs = dict(temperature=2.0, chunk_size=chunk, divergence=divergence, kd_ratio=kd_ratio)
        what = f"{divergence} chunk={chunk} kd={kd_ratio}"
        ref, ref_grads = _unfused(*inputs, **kwargs)
        with _Allocations() as rec:
            out, grads = _fused(*inputs, **kwargs)
        _compare(out, grads, ref, ref_grads, what)
        n_valid = int((inputs[-1] != -100).sum())
        rows = min(chunk or n_valid, n_valid)
        chunk_sized = [n for n in rec.numels if n > 5 * V]
        assert chunk_sized == [rows * V], f"{what}: {rec.numels}"
        with torch.no_grad():
            value = LinearKDLoss(**kwargs)(*inputs[:2], *inputs[3:5], inputs[-1], inputs[2],
                                           inputs[5])  # fmt: skip
        assert_rel(value, ref.loss, 1e-5, f"no-grad loss, {what}")


class _Allocations(TorchDispatchMode):
    """Records the element counts of the tensors ``torch.empty`` creates."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.empty.memory_format:
            self.numels.append(out.numel())
        return out
