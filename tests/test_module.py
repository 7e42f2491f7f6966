"""DistillationModule on one process with a real Lightning Trainer (CPU, tiny models)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.losses import JSD, ForwardKL
from lightning_kd.parallel.grad_clip import clip_grad_norm
from lightning_kd.parallel.plans import resolve_tensor_parallel_plan as tensor_parallel_plan
from lightning_kd.training.fused_head import FusedHeadOutput
from tests.helpers.trainer import cpu_trainer as _trainer
from tests.scripts.fit_run import RandomTokens, make_models


def _module(**kwargs) -> DistillationModule:
    student, teacher = make_models()
    kwargs.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=3e-3))
    return DistillationModule(student, teacher, **kwargs)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fit_trains_student_only_and_kd_loss_falls_on_a_fixed_batch():
    L.seed_everything(0, verbose=False)
    module = _module(loss=KDLoss(chunk_size=7, temperature=2.0))
    teacher_before, student_before = _state(module.teacher), _state(module.student)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/kd_loss"]))
            assert not pl_module.teacher.training, "teacher must stay in eval mode"

    loader = DataLoader(RandomTokens(samples=4), batch_size=4)
    _trainer(max_steps=25, callbacks=[Record()]).fit(module, loader)
    teacher_after, student_after = _state(module.teacher), _state(module.student)
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher_after.items())
    assert any(not torch.equal(student_before[k], v) for k, v in student_after.items())
    assert not any(p.requires_grad for p in module.teacher.parameters())
    optimized = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradient_accumulation_equals_the_larger_batch():
    """Micro-batches with different numbers of valid tokens: the window normalisation must
    weight them by tokens, so accumulate=2 with batch 2 equals batch 4 exactly."""

    class Uneven(RandomTokens):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["labels"][: 2 + 3 * (i % 3)] = -100
            return item

    finals = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        L.seed_everything(0, verbose=False)
        module = _module(kd_ratio=0.6, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        loader = DataLoader(Uneven(samples=8), batch_size=batch_size)
        _trainer(max_steps=2, accumulate_grad_batches=accumulate).fit(module, loader)
        finals.append(_state(module.student))
    for key, value in finals[0].items():
        torch.testing.assert_close(finals[1][key], value, rtol=1e-5, atol=1e-7)


def test_checkpoint_excludes_teacher_and_resume_continues_the_trajectory(tmp_path):
    def run(steps, ckpt_path=None, ckpt_dir=None, save_teacher=False):
        L.seed_everything(0, verbose=False)
        module = _module(save_teacher=save_teacher)
        losses = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(trainer.callback_metrics["train/kd_loss"]))

        callbacks = [Record()]
        if ckpt_dir:
            callbacks.append(
                L.pytorch.callbacks.ModelCheckpoint(ckpt_dir, save_last=True, every_n_train_steps=3)
            )
        trainer = _trainer(
            max_steps=steps, callbacks=callbacks, enable_checkpointing=bool(ckpt_dir)
        )
        trainer.fit(module, DataLoader(RandomTokens(samples=12), batch_size=4), ckpt_path=ckpt_path)
        return losses, module

    straight, _ = run(6)
    first, _ = run(3, ckpt_dir=tmp_path / "a")
    ckpt = torch.load(tmp_path / "a" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    resumed, module = run(6, ckpt_path=tmp_path / "a" / "last.ckpt")
    assert module.trainer.global_step == 6
    assert first == straight[:3]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight[3:]), rtol=1e-6, atol=0)

    run(3, ckpt_dir=tmp_path / "b", save_teacher=True)
    ckpt = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)
    assert any(k.startswith("teacher.") for k in ckpt["state_dict"])

    # load_from_checkpoint: the same arguments load silently, different ones warn by name.
    student, teacher = make_models()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistillationModule.load_from_checkpoint(tmp_path / "a" / "last.ckpt", student=student,
                                                teacher=teacher)  # fmt: skip
    with pytest.warns(UserWarning, match=r"kd_ratio: saved 1\.0, now 0\.5.*not the teacher"):
        DistillationModule.load_from_checkpoint(tmp_path / "a" / "last.ckpt", student=student,
                                                teacher=teacher, kd_ratio=0.5)  # fmt: skip


def test_factories_are_built_in_configure_model_and_teacher_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(1)
    trained_teacher = TinyLlama(vocab_size=37, dim=32, n_layers=2, hidden_dim=64)
    torch.save(trained_teacher.state_dict(), tmp_path / "teacher.pt")
    torch.save({"state_dict": {"model." + k: v for k, v in trained_teacher.state_dict().items()}},
               tmp_path / "teacher.ckpt")  # fmt: skip
    built = []

    def student_factory():
        built.append("student")
        return TinyLlama(vocab_size=37, dim=16, n_layers=1, n_heads=2, hidden_dim=32)

    def teacher_factory():
        built.append("teacher")
        return TinyLlama(vocab_size=37, dim=32, n_layers=2, hidden_dim=64)

    for path, prefix in ((tmp_path / "teacher.pt", ""), (tmp_path / "teacher.ckpt", "model.")):
        built.clear()
        module = DistillationModule(
            student_factory, teacher_factory, teacher_checkpoint=str(path),
            teacher_checkpoint_prefix=prefix,
        )  # fmt: skip
        assert module.student is None and module.teacher is None and built == []
        _trainer(max_steps=1).fit(module, DataLoader(RandomTokens(samples=4), batch_size=4))
        assert built == ["student", "teacher"]
        for key, value in trained_teacher.state_dict().items():
            assert torch.equal(module.teacher.state_dict()[key], value)


def test_validation_reports_kl_and_perplexities():
    module = _module()
    metrics = {}

    class Grab(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    loader = DataLoader(RandomTokens(samples=8), batch_size=4)
    _trainer(max_steps=2, limit_val_batches=2, callbacks=[Grab()]).fit(module, loader, loader)
    for key in ("val/kd_loss", "val/student_ppl", "val/teacher_ppl", "val/student_ce"):
        assert key in metrics and metrics[key] > 0, metrics
    assert metrics["val/student_ppl"] == pytest.approx(
        torch.tensor(metrics["val/student_ce"]).exp()
    )


def _fixed_batch_losses(precision: str, steps: int = 6) -> torch.Tensor:
    """``train/loss`` of each step of a fit on one fixed batch of 4 sequences."""
    L.seed_everything(0, verbose=False)
    module = _module(kd_ratio=0.5)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    loader = DataLoader(RandomTokens(samples=4), batch_size=4)
    _trainer(max_steps=steps, precision=precision, callbacks=[Record()]).fit(module, loader)
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_precisions_follow_the_fp32_trajectory(precision):
    fp32, bf16 = _fixed_batch_losses("32-true"), _fixed_batch_losses(precision)
    assert bf16.shape == fp32.shape == (6,)
    # bf16 keeps 8 significant bits: the same trajectory within one bf16 epsilon (2^-7),
    # relative (observed: <= 0.2 % with bf16 weights, <= 0.03 % with fp32 weights).
    torch.testing.assert_close(bf16, fp32, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
    # One fixed batch: every step lowers the loss.
    assert (bf16.diff() < 0).all(), bf16.tolist()


def test_gradient_clipping_single_process_matches_torch():
    params = [nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    expected = [p.grad.clone() for p in params]
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    for rp, g in zip(ref_params, expected, strict=True):
        rp.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    norm = clip_grad_norm(params, 1.0)
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in expected))
    assert float(total) > 1.0  # the clip is active
    assert float(norm) == pytest.approx(float(total), rel=1e-5)  # fp32 norm of 45 values
    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-5)
    for p, rp in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, rp.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(params, 0.0)


class ClipProbe(DistillationModule):
    """Keeps the gradients and parameters as Lightning hands them to clipping, and the
    gradients after it."""

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.params_before = [p.detach().clone() for p in params]
        self.grads_before = [p.grad.detach().clone() for p in params]
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.grads_after = [p.grad.detach().clone() for p in params]
        self.clipped_params = params


@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["clipped", "below-the-limit"])
def test_trainer_gradient_clipping_logs_the_norm_and_scales_the_step(max_norm):
    """``Trainer(gradient_clip_val=...)`` goes through the module's own clipping: the logged
    ``train/grad_norm`` is the norm before clipping, and the SGD step uses the gradients
    scaled by ``max_norm / (norm + 1e-6)`` when that is below 1."""
    L.seed_everything(0, verbose=False)
    student, teacher = make_models()
    lr = 0.5
    module = ClipProbe(student, teacher, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    loader = DataLoader(RandomTokens(samples=4), batch_size=4)
    _trainer(max_steps=1, gradient_clip_val=max_norm).fit(module, loader)

    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in module.grads_before)))
    logged = float(module.trainer.callback_metrics["train/grad_norm"])
    assert logged == pytest.approx(norm, rel=1e-5)  # an fp32 norm
    coef = min(1.0, max_norm / (norm + 1e-6))
    assert (coef < 1.0) == (max_norm < 1.0), (norm, max_norm)  # each case does what it says
    clipped_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in module.grads_after))
    assert float(clipped_norm) == pytest.approx(min(norm, max_norm), rel=1e-5)
    for before, after in zip(module.grads_before, module.grads_after, strict=True):
        torch.testing.assert_close(after, before * coef, rtol=1e-6, atol=0)
    # The optimizer stepped with the clipped gradients: p1 = p0 - lr * coef * g (fp32, a few
    # ulps of |p0|).
    params = module.clipped_params
    assert {id(p) for p in params} == {id(p) for p in module.student.parameters()}
    for p1, p0, g in zip(params, module.params_before, module.grads_before, strict=True):
        expected = p0.double() - lr * coef * g.double()
        torch.testing.assert_close(p1.detach().double(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p1.detach(), p0)


def test_bad_arguments_are_rejected(tmp_path):
    student, teacher = make_models()
    with pytest.raises(ValueError, match="kd_ratio"):
        DistillationModule(student, teacher, kd_ratio=1.5)
    with pytest.raises(ValueError, match=r"missing\.pt"):
        DistillationModule(student, teacher, teacher_checkpoint=str(tmp_path / "missing.pt"))
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "teacher.ckpt")
    wrong_prefix = DistillationModule(
        student, teacher, teacher_checkpoint=str(tmp_path / "teacher.ckpt"),
        teacher_checkpoint_prefix="teacher.",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher_checkpoint_prefix='teacher\.'.*'model\.w'"):
        wrong_prefix.configure_model()
    with pytest.raises(ValueError, match="no tensor-parallel plan"):
        tensor_parallel_plan(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="tie_embeddings"):
        TinyLlama(tie_embeddings=True).tensor_parallel_plan(2)
    with pytest.raises(ValueError, match="must divide"):
        TinyLlama(n_heads=4, n_kv_heads=2).tensor_parallel_plan(4)


def test_teacher_without_tp_plan_works_single_device():
    """A model with no TP plan (a plain nn.Module) still trains on one device."""

    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(37, 37)

        def forward(self, input_ids):
            return self.table(input_ids)

    # SGD without weight decay: only the distillation gradient moves the student.
    module = DistillationModule(Bigram(), Bigram(), optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    teacher_before = _state(module.teacher)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/kd_loss"]))

    loader = DataLoader(RandomTokens(samples=4), batch_size=4)  # one fixed batch
    _trainer(max_steps=3, callbacks=[Record()]).fit(module, loader)
    assert module.trainer.global_step == 3
    assert losses[2] < losses[1] < losses[0], losses  # the student learns
    assert torch.equal(module.teacher.table.weight, teacher_before["table.weight"])


def test_kd_ratio_has_one_source_of_truth_the_loss():
    student, teacher = make_models()
    default = DistillationModule(student, teacher)
    assert default.kd_ratio == 1.0 and default.kd_loss.divergence == ForwardKL()
    assert DistillationModule(student, teacher, kd_ratio=0.3).kd_loss.kd_ratio == 0.3
    from_loss = DistillationModule(student, teacher, loss=KDLoss(kd_ratio=0.4))
    assert from_loss.kd_ratio == 0.4
    agreeing = DistillationModule(student, teacher, loss=KDLoss(kd_ratio=0.4), kd_ratio=0.4)
    assert agreeing.kd_ratio == 0.4
    with pytest.raises(ValueError, match=r"kd_ratio=0\.5 contradicts the loss's kd_ratio=0\.4"):
        DistillationModule(student, teacher, loss=KDLoss(kd_ratio=0.4), kd_ratio=0.5)
    for bad in (True, -0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="kd_ratio must be"):
            DistillationModule(student, teacher, kd_ratio=bad)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"])
def test_compute_loss_is_the_losses_mix_in_one_pass(name):
    """compute_loss = kd_ratio · divergence + (1 − kd_ratio) · CE, with the divergence and
    the CE of the loss's own pass; the gradient reaches the student only."""
    torch.manual_seed(0)
    module = _module(loss=KDLoss(temperature=2.0, chunk_size=5, divergence=name, kd_ratio=0.3))
    module.configure_model()
    batch = next(iter(DataLoader(RandomTokens(samples=2), batch_size=2)))
    student_logits = module.run_student(batch)
    with torch.no_grad():
        teacher_logits = module.run_teacher(batch)
    terms = module.compute_loss(student_logits, teacher_logits, batch)
    reference = KDLoss(temperature=2.0, divergence=name)(
        student_logits.detach(), teacher_logits, batch["labels"], return_per_token=True
    )
    ce = F.cross_entropy(
        student_logits.detach().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(terms.kd_loss, reference.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms.ce_loss, ce, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms.loss, 0.3 * reference.loss + 0.7 * ce, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms.per_token_div, reference.per_token_div, rtol=1e-5, atol=0)
    assert terms.per_token_kl is terms.per_token_div  # 0.1 name, read-only alias
    assert not terms.kd_loss.requires_grad and not terms.ce_loss.requires_grad
    terms.loss.backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def test_validation_cross_entropies_of_both_models_match_torch():
    module = _module(loss=KDLoss(chunk_size=3, divergence="jsd"))
    metrics = {}

    class Grab(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    loader = DataLoader(RandomTokens(samples=6), batch_size=4)  # batches of 4 and 2
    _trainer(callbacks=[Grab()], limit_val_batches=None).validate(module, loader)
    labels = torch.cat([b["labels"] for b in loader]).flatten()
    with torch.no_grad():
        for role in ("student", "teacher"):
            model = getattr(module, role)
            logits = torch.cat([model(b["input_ids"]) for b in loader]).flatten(0, 1)
            expected = F.cross_entropy(logits.double(), labels, ignore_index=-100)
            assert metrics[f"val/{role}_ce"] == pytest.approx(float(expected), rel=1e-5), role


def test_checkpoints_record_the_divergence():
    saved = {}
    _module(loss=KDLoss(divergence="jsd")).on_save_checkpoint(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _module(loss=KDLoss(divergence=JSD(beta=0.5))).on_load_checkpoint(saved)
    with pytest.warns(UserWarning, match=r"divergence: saved 'JSD\(beta=0\.5\)', now 'TVD\(\)'"):
        _module(loss=KDLoss(divergence="tvd")).on_load_checkpoint(saved)


@pytest.mark.parametrize(
    ("name", "kd_ratio"), [("forward_kl", 1.0), ("jsd", 0.5), ("skew_reverse_kl", 0.0)]
)
def test_fused_head_equals_the_unfused_loss_and_gradients(name, kd_ratio):
    """fused_head=True: the same terms and student gradients, with no logits anywhere."""
    batch = next(iter(DataLoader(RandomTokens(samples=3), batch_size=3)))
    results = []
    for fused in (False, True):
        loss = KDLoss(temperature=2.0, chunk_size=5, divergence=name, kd_ratio=kd_ratio)
        module = _module(loss=loss, fused_head=fused)
        module.configure_model()
        student_output = module.run_student(batch)
        with torch.no_grad():
            teacher_output = module.run_teacher(batch)
        assert isinstance(student_output, FusedHeadOutput) == fused
        terms = module.compute_loss(student_output, teacher_output, batch)
        terms.loss.backward()
        grads = {n: p.grad.clone() for n, p in module.student.named_parameters()}
        assert all(p.grad is None for p in module.teacher.parameters())
        results.append((terms, grads))
    (plain, plain_grads), (fused, fused_grads) = results
    for field in ("loss", "kd_loss", "ce_loss", "per_token_div"):
        torch.testing.assert_close(
            getattr(fused, field), getattr(plain, field), rtol=1e-5, atol=1e-7, msg=field
        )
    assert torch.equal(fused.valid_mask, plain.valid_mask)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[key], grad, rtol=1e-4, atol=1e-7, msg=key)


def test_fused_head_validation_matches_the_unfused_metrics():
    metrics = []
    for fused in (False, True):
        module = _module(loss=KDLoss(chunk_size=3, divergence="tvd", kd_ratio=0.5),
                         fused_head=fused)  # fmt: skip
        loader = DataLoader(RandomTokens(samples=6), batch_size=4)
        (result,) = _trainer(limit_val_batches=None).validate(module, loader, verbose=False)
        metrics.append(result)
    assert metrics[0].keys() == metrics[1].keys()
    for key, value in metrics[0].items():
        assert metrics[1][key] == pytest.approx(value, rel=1e-5), key


def test_fused_head_needs_models_that_expose_hidden_states_and_head():
    class LogitsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Embedding(37, 37)

        def forward(self, input_ids):
            return self.proj(input_ids)

    _, teacher = make_models()
    module = DistillationModule(LogitsOnly(), teacher, fused_head=True)
    with pytest.raises(ValueError, match=r"student \(LogitsOnly\).*hidden_states.*output_head"):
        module.configure_model()
    with pytest.raises(ValueError, match="fused_head must be a bool"):
        DistillationModule(LogitsOnly(), teacher, fused_head="yes")


def test_kd_ratio_can_be_set_on_the_module_and_0_1_configs_still_load():
    student, teacher = make_models()
    module = DistillationModule(student, teacher, loss=KDLoss(kd_ratio=0.4))
    module.kd_ratio = 0.25  # e.g. a callback annealing the mix
    assert module.kd_loss.kd_ratio == 0.25
    for bad in (2, -0.5, True):
        with pytest.raises(ValueError, match="kd_ratio must be"):
            module.kd_ratio = bad
        with pytest.raises(ValueError, match="kd_ratio must be"):
            module.kd_loss.kd_ratio = bad
    # 0.1 configs set kd_ratio on the module next to a loss left at its default: still taken,
    # with a DeprecationWarning, on a copy of the loss.
    loss = KDLoss(temperature=2.0)
    with pytest.warns(DeprecationWarning, match=r"kd_ratio=0\.5.*belongs to the loss"):
        module = DistillationModule(student, teacher, loss=loss, kd_ratio=0.5)
    assert module.kd_ratio == 0.5 and module.kd_loss.temperature == 2.0
    assert loss.kd_ratio == 1.0 and module.kd_loss is not loss


def test_fused_head_warns_when_run_student_is_overridden():
    class OwnStudent(DistillationModule):
        def run_student(self, batch):
            return self.student(batch["input_ids"])

    student, teacher = make_models()
    with pytest.warns(UserWarning, match=r"OwnStudent\.run_student is overridden"):
        OwnStudent(student, teacher, fused_head=True).configure_model()


def test_a_live_teacher_or_a_teacher_cache_exactly_one(tmp_path):
    student, teacher = make_models()
    with pytest.raises(ValueError, match=r"exactly one of teacher .* and teacher_cache"):
        DistillationModule(student)
    with pytest.raises(ValueError, match=r"exactly one of teacher .* and teacher_cache"):
        DistillationModule(student, teacher, teacher_cache=str(tmp_path))
    with pytest.raises(ValueError, match="teacher_checkpoint has no use with teacher_cache"):
        DistillationModule(student, teacher_cache=str(tmp_path),
                           teacher_checkpoint=str(tmp_path / "t.pt"))  # fmt: skip
    with pytest.raises(ValueError, match=r"fused_head=True needs the teacher's lm_head"):
        DistillationModule(student, teacher_cache=str(tmp_path), fused_head=True)
