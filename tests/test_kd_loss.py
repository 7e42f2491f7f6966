"""KDLoss on one process: values and gradients against a float64 reference, edge cases, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd import KDLoss, KDLossOutput
from lightning_kd.losses.divergences import ForwardKL, ReverseKL
from lightning_kd.losses.engine import PassSpec, distill_over_rows
from lightning_kd.losses.vocab_softmax import LocalVocabSoftmax
from tests.helpers.reference import (
    assert_rel,
    kd_loss_reference,
    per_token_forward_kl,
    per_token_reverse_kl,
    reference_with_grad,
)


def _inputs(shape=(3, 13), vocab=97, dtype=torch.float32, ignored=5, scale=3.0):
    student = (torch.randn(*shape, vocab) * scale).to(dtype).requires_grad_()
    teacher = (torch.randn(*shape, vocab) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape)
    labels.view(-1)[torch.randperm(labels.numel())[:ignored]] = -100
    return student, teacher, labels


# Two float32 computations of the same quantity that reduce in different orders (chunked vs
# not, 40 vs 30 vocabulary columns, a float32 mean vs the loss's float64 sum) agree to float32
# precision, not bit for bit: the vectorised reductions, and so the roundings, depend on the
# shapes and on the CPU. Compare them at a few float32 ulps per reduced term: 1e-5 relative,
# and for gradients (at most ~1e-2 here) 1e-8 absolute.
F32_RTOL, F32_GRAD_ATOL = 1e-5, 1e-8


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [0, 1, 7, 64])
@pytest.mark.parametrize("num_batch_labels", [None, 50])
def test_matches_float64_reference(temperature, chunk_size, num_batch_labels):
    student, teacher, labels = _inputs()
    loss_fn = KDLoss(temperature=temperature, chunk_size=chunk_size)
    loss = loss_fn(student, teacher, labels, num_batch_labels=num_batch_labels)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(
        student, teacher, labels, temperature=temperature, num_batch_labels=num_batch_labels
    )
    assert_rel(loss, ref_loss, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")
    assert student.grad.dtype == student.dtype and loss.dtype == torch.float32


def test_chunked_equals_unchunked():
    student, teacher, labels = _inputs(shape=(4, 33), ignored=20)
    results = []
    for chunk_size in (0, 1, 5, 16, 1000):
        s = student.detach().clone().requires_grad_()
        out = KDLoss(chunk_size=chunk_size)(s, teacher, labels, return_per_token=True)
        out.loss.backward()
        results.append((out.loss, s.grad, out.per_token_kl))
    for loss, grad, per_token in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=F32_RTOL, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=F32_RTOL, atol=F32_GRAD_ATOL)
        torch.testing.assert_close(per_token, results[0][2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [0, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_with_upcast(dtype, chunk_size):
    student, teacher, labels = _inputs(dtype=dtype)
    loss = KDLoss(chunk_size=chunk_size, temperature=2.0)(student, teacher, labels)
    loss.backward()
    # Reference on the same (rounded) values, in float64.
    ref_loss, ref_grad = reference_with_grad(student, teacher, labels, temperature=2.0)
    assert loss.dtype == torch.float32
    assert student.grad.dtype == dtype
    assert_rel(loss, ref_loss, 2e-3, "loss")
    assert_rel(student.grad, ref_grad, 2e-3 * 4, "grad")  # bf16 grad storage rounds to 2^-8


def test_fp32_upcast_false_computes_in_input_dtype():
    student, teacher, labels = _inputs(dtype=torch.bfloat16)
    low = KDLoss(fp32_upcast=False)(student, teacher, labels)
    high = KDLoss(fp32_upcast=True)(student, teacher, labels)
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32
    ref = kd_loss_reference(student, teacher, labels)
    assert abs(low.double() - ref) < 5e-2 * ref
    low.backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad).all()


def test_float64_inputs_stay_float64():
    student, teacher, labels = _inputs(dtype=torch.float64)
    loss = KDLoss()(student, teacher, labels)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(
        loss, kd_loss_reference(student, teacher, labels), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_noncontiguous_shifted_view_and_leading_dims(chunk_size):
    base = torch.randn(2, 9, 31, requires_grad=True)
    teacher_base = torch.randn(2, 9, 31)
    labels = torch.randint(0, 31, (2, 8))
    labels[1, 2] = -100
    student = base[:, :-1]  # the usual shift: not viewable as [N, V]
    assert not student.is_contiguous()
    loss = KDLoss(chunk_size=chunk_size)(student, teacher_base[:, :-1], labels)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(student, teacher_base[:, :-1], labels)
    assert_rel(loss, ref_loss, 1e-5, "loss")
    assert_rel(base.grad[:, :-1], ref_grad, 1e-4, "grad")
    assert base.grad[:, -1].abs().max() == 0


@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 4)])
def test_any_leading_dims(shape):
    student, teacher, labels = _inputs(shape=shape, vocab=11, ignored=0)
    loss = KDLoss(chunk_size=2)(student, teacher, labels)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(student, teacher, labels)
    assert_rel(loss, ref_loss, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")


def test_transposed_student_layout():
    student = torch.randn(17, 5, 3).transpose(0, 2).contiguous().transpose(0, 2)
    student.requires_grad_()
    teacher = torch.randn(17, 5, 3)
    labels = torch.randint(0, 3, (17, 5))
    loss = KDLoss(chunk_size=4)(student, teacher, labels)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(student, teacher, labels)
    assert_rel(loss, ref_loss, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")


def test_kl_of_identical_distributions_is_zero():
    student, _, labels = _inputs()
    loss = KDLoss(chunk_size=4)(student, student.detach().clone(), labels)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert student.grad.abs().max() < 1e-6


def test_teacher_gets_no_gradient():
    student, teacher, labels = _inputs()
    teacher.requires_grad_()
    KDLoss()(student, teacher, labels).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_all_labels_ignored_gives_connected_zero(chunk_size):
    student, teacher, _ = _inputs()
    labels = torch.full(student.shape[:-1], -100)
    loss = KDLoss(chunk_size=chunk_size)(student, teacher, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_masked_vocabulary_contributes_nothing(chunk_size):
    student, teacher, labels = _inputs(vocab=40)
    labels = torch.where(labels >= 0, labels % 30, labels)  # ids of the unmasked vocabulary
    s_masked = student.detach().clone()
    t_masked = teacher.clone()
    s_masked[..., 30:] = -math.inf
    t_masked[..., 30:] = -math.inf
    s_masked.requires_grad_()
    out = KDLoss(chunk_size=chunk_size)(s_masked, t_masked, labels, return_per_token=True)
    out.loss.backward()
    s_small = student.detach()[..., :30].clone().requires_grad_()
    ref = KDLoss()(s_small, teacher[..., :30], labels)
    ref.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s_masked.grad).all()
    torch.testing.assert_close(out.loss, ref, rtol=F32_RTOL, atol=0)
    torch.testing.assert_close(s_masked.grad[..., :30], s_small.grad)
    assert s_masked.grad[..., 30:].abs().max() == 0


def test_teacher_minus_inf_alone_is_fine():
    student, teacher, labels = _inputs(vocab=40)
    teacher = teacher.clone()
    teacher[..., ::3] = -math.inf
    loss = KDLoss(chunk_size=6)(student, teacher, labels)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(student, teacher, labels)
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert_rel(loss, ref_loss, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")


def test_num_batch_labels_makes_accumulated_gradients_equal_full_batch():
    student, teacher, labels = _inputs(shape=(4, 10), ignored=9)
    full = student.detach().clone().requires_grad_()
    KDLoss(chunk_size=3)(full, teacher, labels).backward()
    halves = student.detach().clone().requires_grad_()
    total = int((labels != -100).sum())
    loss_fn = KDLoss(chunk_size=3)
    for part in (slice(0, 2), slice(2, 4)):
        loss_fn(halves[part], teacher[part], labels[part], num_batch_labels=total).backward()
    torch.testing.assert_close(halves.grad, full.grad, rtol=F32_RTOL, atol=F32_GRAD_ATOL)


def test_num_batch_labels_accepts_tensor():
    student, teacher, labels = _inputs()
    a = KDLoss()(student, teacher, labels, num_batch_labels=torch.tensor(12))
    b = KDLoss()(student, teacher, labels, num_batch_labels=12)
    assert torch.equal(a, b)


def test_per_token_output_matches_reference_and_loss():
    student, teacher, labels = _inputs()
    out = KDLoss(temperature=2.0, chunk_size=4)(student, teacher, labels, return_per_token=True)
    assert isinstance(out, KDLossOutput)
    assert out.per_token_kl.shape == labels.shape and not out.per_token_kl.requires_grad
    ref = per_token_forward_kl(student, teacher, 2.0)
    valid = labels != -100
    assert torch.equal(out.valid_mask, valid)
    torch.testing.assert_close(out.per_token_kl[valid].double(), ref[valid], rtol=1e-5, atol=1e-7)
    assert out.per_token_kl[~valid].abs().max() == 0
    torch.testing.assert_close(out.per_token_kl[valid].mean(), out.loss, rtol=F32_RTOL, atol=0)


def test_no_grad_mode_and_non_leaf_student():
    student, teacher, labels = _inputs()
    with torch.no_grad():
        loss = KDLoss(chunk_size=3)(student, teacher, labels)
    assert not loss.requires_grad
    # A float32 loss against the float64 reference: float32 precision, not float64's default.
    torch.testing.assert_close(
        loss.double(), kd_loss_reference(student, teacher, labels), rtol=F32_RTOL, atol=0
    )
    # A student produced by a layer: gradient reaches the layer's weight.
    layer = torch.nn.Linear(8, 97)
    hidden = torch.randn(3, 13, 8)
    KDLoss()(layer(hidden), teacher, labels).backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_custom_ignore_index():
    student, teacher, labels = _inputs(ignored=0)
    labels[0] = 7
    loss = KDLoss(ignore_index=7)(student, teacher, labels)
    ref = kd_loss_reference(student, teacher, labels, ignore_index=7)
    assert_rel(loss, ref, 1e-5, "loss")


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_reverse_kl_reuses_the_engine(chunk_size):
    student, teacher, labels = _inputs(ignored=4)
    valid = labels != -100
    spec = PassSpec(ReverseKL(), 2.0, float(valid.sum()), chunk_size, torch.float32)
    loss = distill_over_rows(student, teacher, valid, LocalVocabSoftmax(), spec).loss
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(
        student, teacher, labels, temperature=2.0, per_token=per_token_reverse_kl
    )
    assert_rel(loss, ref_loss, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")


def test_forward_kl_divergence_object_is_the_default():
    assert isinstance(KDLoss().divergence, ForwardKL)


def test_double_backward_through_same_loss_raises():
    student, teacher, labels = _inputs()
    loss = KDLoss()(student, teacher, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward"):
        loss.backward()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "2"}, "temperature"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"ignore_index": 1.5}, "ignore_index"),
        ({"fp32_upcast": "yes"}, "fp32_upcast"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDLoss(**kwargs)


def test_forward_rejects_bad_inputs():
    student, teacher, labels = _inputs()
    loss_fn = KDLoss()
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="leading shape"):
        loss_fn(student, teacher, labels[:, :-1])
    with pytest.raises(ValueError, match="integer"):
        loss_fn(student, teacher, labels.float())
    with pytest.raises(ValueError, match="integer"):
        loss_fn(student, teacher, labels > 0)
    with pytest.raises(ValueError, match="floating-point"):
        loss_fn(student.detach().long(), teacher.long(), labels)
    for bad in (0, -3, math.nan, torch.tensor(0.0), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="num_batch_labels"):
            loss_fn(student, teacher, labels, num_batch_labels=bad)


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_backward_scales_by_the_incoming_gradient(chunk_size):
    student, teacher, labels = _inputs()
    (KDLoss(chunk_size=chunk_size)(student, teacher, labels) * 3.0).backward()
    _, ref_grad = reference_with_grad(student, teacher, labels)
    assert_rel(student.grad, 3.0 * ref_grad, 1e-4, "grad of 3·loss")
    s2 = student.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(KDLoss()(s2, teacher, labels), s2, torch.tensor(-0.5))
    assert_rel(g, -0.5 * ref_grad, 1e-4, "autograd.grad with grad_outputs")


def test_half_precision_gradient_scale_is_exact():
    """The backward factor must not be rounded to the student's dtype: no systematic bias in
    bf16, and no overflow in fp16 under a GradScaler-sized incoming gradient."""
    student, teacher, labels = _inputs(shape=(3,), vocab=501, dtype=torch.bfloat16, ignored=0)
    KDLoss()(student, teacher, labels).backward()
    _, ref_grad = reference_with_grad(student, teacher, labels)
    big = ref_grad.abs() > 1e-3
    ratio = (student.grad.double()[big] / ref_grad[big]).median()
    assert abs(ratio - 1) < 5e-4, ratio
    s16 = student.detach().half().requires_grad_()
    (KDLoss()(s16, teacher.half(), labels) * 65536.0).backward()
    assert torch.isfinite(s16.grad).all()


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_nan_or_inf_logits_of_valid_tokens_give_nan(chunk_size):
    student, teacher, labels = _inputs(ignored=0)
    loss_fn = KDLoss(chunk_size=chunk_size)
    bad_student = student.detach().clone()
    bad_student[1, 2, 5] = math.nan
    assert loss_fn(bad_student, teacher, labels).isnan()
    bad_teacher = teacher.clone()
    bad_teacher[0, 0, 3] = math.inf
    assert loss_fn(student, bad_teacher, labels).isnan()
    # Garbage in an ignored position does not matter.
    labels = labels.clone()
    labels[1, 2] = -100
    loss = loss_fn(bad_student, teacher, labels)
    ref = kd_loss_reference(student, teacher, labels)
    assert torch.isfinite(loss) and abs(loss.double() - ref) <= 1e-5 * ref


@pytest.mark.parametrize("chunk_size", [0, 1, 4, 9, 16])
def test_dense_and_sparse_label_patterns(chunk_size):
    """Blocks of ignored tokens (prompts, padding) and scattered ones, so that windows are
    processed both as dense spans and as gathered rows."""
    student, teacher, _ = _inputs(shape=(4, 16), ignored=0)
    labels = torch.randint(0, 97, (4, 16))
    labels[0, :10] = -100  # prompt
    labels[1, 12:] = -100  # padding
    labels[2, ::2] = -100  # scattered
    labels[3, 3] = -100  # one hole in a dense run
    out = KDLoss(chunk_size=chunk_size)(student, teacher, labels, return_per_token=True)
    out.loss.backward()
    ref_loss, ref_grad = reference_with_grad(student, teacher, labels)
    assert_rel(out.loss, ref_loss, 1e-5, "loss")
    assert_rel(student.grad, ref_grad, 1e-4, "grad")
    valid = labels != -100
    ref_tokens = per_token_forward_kl(student, teacher, 1.0)[valid]
    torch.testing.assert_close(out.per_token_kl[valid].double(), ref_tokens, rtol=1e-5, atol=1e-7)
    assert student.grad[~valid].abs().max() == 0
