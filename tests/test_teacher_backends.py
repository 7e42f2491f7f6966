"""Teacher backends behind one interface, the losses' shared options, the sequence source."""

from __future__ import annotations

import dataclasses
import logging
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule, KDLoss
from lightning_kd.losses import JSD, KDOptions, LinearKDLoss, TopKKDLoss
from lightning_kd.losses.loss_base import KDLossBase
from lightning_kd.teacher_cache import CachedTeacher
from lightning_kd.training.fused_head import FusedHeadOutput
from lightning_kd.training.loss_terms import logits_of
from lightning_kd.training.teacher import TeacherSource
from lightning_kd.training.teachers import (
    CacheTeacher,
    FusedHeadTeacher,
    LiveTeacher,
    TeacherBackend,
)
from tests.scripts.fit_run import VOCAB, RandomTokens, make_models


def _batch(samples: int = 3) -> dict[str, torch.Tensor]:
    return next(iter(DataLoader(RandomTokens(samples=samples), batch_size=samples)))


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, deterministic=True)  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _terms_and_grads(module: DistillationModule, batch):
    module.configure_model()
    with torch.no_grad():
        teacher_output = module.run_teacher(batch)
    terms = module.compute_loss(module.run_student(batch), teacher_output, batch)
    terms.loss.backward()
    return terms, {n: p.grad.clone() for n, p in module.student.named_parameters()}


# ---------------------------------------------------------------------- options
def test_options_are_one_frozen_value_checked_once_and_derived():
    loss = KDLoss(temperature=2.0, chunk_size=7, divergence="jsd", kd_ratio=0.25)
    options = loss.options
    assert options == KDOptions(-100, 2.0, True, None, 7, divergence=JSD(), kd_ratio=0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.temperature = 3.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        loss.temperature = 3.0  # only kd_ratio is assignable on a loss
    with pytest.raises(ValueError, match="unknown loss options"):
        options.replace(temprature=1.0)
    with pytest.raises(ValueError, match="kd_ratio must be in"):
        options.replace(kd_ratio=2.0)
    # A value: a snapshot. A loss: followed (its kd_ratio assigned later reaches the copy).
    snapshot = LinearKDLoss.from_options(options, chunk_size=3)
    linked = LinearKDLoss.from_options(loss, chunk_size=3)
    ce = KDLoss.from_options(loss, kd_ratio=0.0)
    assert (snapshot.chunk_size, linked.chunk_size, ce.chunk_size) == (3, 3, 7)
    assert linked.divergence == JSD() and linked.temperature == 2.0
    loss.kd_ratio = 0.75
    assert (snapshot.kd_ratio, linked.kd_ratio, ce.kd_ratio) == (0.25, 0.75, 0.0)
    linked.kd_ratio = 0.5  # its own assignment wins from now on
    loss.kd_ratio = 0.1
    assert linked.kd_ratio == 0.5 and linked.temperature == 2.0
    assert TopKKDLoss.from_options(loss).divergence == JSD()  # every divergence has a top-k form
    with pytest.raises(ValueError, match="source must be a KDOptions"):
        KDLoss.from_options({"kd_ratio": 0.5})


def test_derived_losses_compute_what_a_loss_built_from_scratch_does():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    source = KDLoss(temperature=1.5, divergence="reverse_kl", kd_ratio=0.4)
    derived = KDLoss.from_options(source)
    source.kd_ratio = 0.9
    reference = KDLoss(temperature=1.5, divergence="reverse_kl", kd_ratio=0.9)
    torch.testing.assert_close(
        derived(student, teacher, labels), reference(student, teacher, labels)
    )


# ---------------------------------------------------------------------- backends
@pytest.mark.parametrize("kd_ratio", [1.0, 0.4])
def test_fused_backend_equals_the_live_backend_on_the_same_models(kd_ratio):
    batch, results = _batch(), []
    for fused in (False, True):
        student, teacher = make_models()
        loss = KDLoss(temperature=2.0, chunk_size=5, kd_ratio=kd_ratio)
        module = DistillationModule(student, teacher, loss=loss, fused_head=fused)
        assert isinstance(module.teacher_backend, FusedHeadTeacher if fused else LiveTeacher)
        results.append(_terms_and_grads(module, batch))
        ce = module.teacher_backend.teacher_cross_entropy(module.run_teacher(batch), batch)
        results[-1] += (ce,)
    (live, live_grads, live_ce), (fused, fused_grads, fused_ce) = results
    for field in ("loss", "kd_loss", "ce_loss", "per_token_div"):
        torch.testing.assert_close(getattr(fused, field), getattr(live, field), rtol=1e-5,
                                   atol=1e-7, msg=field)  # fmt: skip
    for key, grad in live_grads.items():
        torch.testing.assert_close(fused_grads[key], grad, rtol=1e-4, atol=1e-7, msg=key)
    torch.testing.assert_close(fused_ce, live_ce, rtol=1e-5, atol=1e-6)
    # The teacher's CE summed over the valid tokens, at temperature 1.
    student, teacher = make_models()
    logits = teacher(batch["input_ids"])
    valid = batch["labels"] != -100
    expected = torch.nn.functional.cross_entropy(
        logits[valid], batch["labels"][valid], reduction="sum"
    )
    torch.testing.assert_close(live_ce, expected.detach(), rtol=1e-5, atol=1e-5)


def _fake_cache(top_k: int) -> CacheTeacher:
    """A cache backend whose reader is a stand-in (the loss needs only the metadata's top_k)."""
    backend = CacheTeacher.__new__(CacheTeacher)
    metadata = SimpleNamespace(top_k=top_k, teacher="fake")
    backend.reader = SimpleNamespace(cache=SimpleNamespace(metadata=metadata), directory="d",
                                     check_loss=lambda loss: None)  # fmt: skip
    backend._checked_splits = set()
    return backend


@pytest.mark.parametrize("top_k", [0, 4])
def test_cache_backend_loss_is_kd_loss_or_topk_loss_and_follows_kd_ratio(top_k):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 6, VOCAB, generator=gen, requires_grad=True)
    teacher_logp = torch.log_softmax(torch.randn(2, 6, VOCAB, generator=gen) / 2.0, -1)
    labels = torch.randint(0, VOCAB, (2, 6), generator=gen)
    labels[:, 0] = -100
    loss = KDLoss(temperature=2.0, chunk_size=4, kd_ratio=0.8)
    backend = _fake_cache(top_k)
    backend.setup(loss)
    loss.kd_ratio = 0.3  # annealed after the backend was set up
    if top_k:
        values, ids = teacher_logp.topk(top_k, -1)
        cached = CachedTeacher(ids, values)
        reference = TopKKDLoss(temperature=2.0, chunk_size=4, kd_ratio=0.3)(
            student, ids, values, labels, return_per_token=True
        )
    else:
        cached = CachedTeacher(None, teacher_logp)
        reference = KDLoss(temperature=2.0, chunk_size=4, kd_ratio=0.3)(
            student, teacher_logp * 2.0, labels, return_per_token=True
        )
    out = backend.loss(student, cached, {"labels": labels})
    for field in ("loss", "div_loss", "ce_loss", "per_token_div"):
        torch.testing.assert_close(getattr(out, field), getattr(reference, field), msg=field)
    ce = backend.teacher_cross_entropy(cached, {"labels": labels})
    assert (ce is None) == bool(top_k)


def test_losses_are_built_once_and_the_annealed_kd_ratio_reaches_them(monkeypatch):
    student, teacher = make_models()
    module = DistillationModule(student, teacher, loss=KDLoss(chunk_size=5), fused_head=True,
                                optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # fmt: skip
    backend = module.teacher_backend
    built = []
    original = KDLossBase.__init__

    def counting(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(KDLossBase, "__init__", counting)
    linear, linear_ce, ce = backend._linear, backend._linear_cross_entropy, backend._cross_entropy

    class Anneal(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.kd_ratio = 1.0 - 0.25 * batch_idx

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((backend._linear.kd_ratio, backend._linear_cross_entropy.kd_ratio))

    seen: list[tuple[float, float]] = []
    loader = DataLoader(RandomTokens(samples=12), batch_size=4)
    _trainer(max_steps=3, callbacks=[Anneal()], limit_val_batches=1).fit(module, loader, loader)
    assert built == []  # no loss object was made during the steps or the validation
    assert module.teacher_backend is backend
    assert (backend._linear, backend._linear_cross_entropy, backend._cross_entropy) == (
        linear, linear_ce, ce)  # fmt: skip
    assert seen == [(1.0, 0.0), (0.75, 0.0), (0.5, 0.0)]
    assert module.kd_loss is module.loss  # the deprecated name of the loss object


def test_fused_head_can_be_switched_off_to_read_the_teachers_logits():
    """What the teacher-cache writer does: ``module.fused_head = False`` before predict."""
    student, teacher = make_models()
    module = DistillationModule(student, teacher, fused_head=True)
    assert module.fused_head and isinstance(module.teacher_backend, FusedHeadTeacher)
    module.fused_head = False
    assert isinstance(module.teacher_backend, LiveTeacher) and not module.fused_head
    module.configure_model()
    logits = module.run_teacher(_batch())
    assert logits.shape == (3, 12, VOCAB)
    module.fused_head = True
    assert isinstance(module.run_teacher(_batch()), FusedHeadOutput)


# ---------------------------------------------------------------------- a fourth kind
class UniformTeacher(TeacherBackend):
    """A toy kind: a teacher that always says "uniform" (no model, no file)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def setup(self, loss: KDLoss) -> None:
        self._loss = loss

    def run_teacher(self, module, batch):
        return torch.zeros(*batch["input_ids"].shape, self.vocab_size)

    def loss(self, student_output, teacher_output, batch):
        return self._loss(logits_of(student_output), teacher_output, batch["labels"],
                          return_per_token=True)  # fmt: skip

    def teacher_cross_entropy(self, teacher_output, batch):
        tokens = int((batch["labels"] != self._loss.ignore_index).sum())
        return torch.tensor(math.log(self.vocab_size) * tokens)

    def settings(self):
        return {"uniform_teacher": self.vocab_size}

    def describe(self):
        return f"distilling from a uniform teacher over {self.vocab_size} tokens"


def test_a_fourth_teacher_kind_plugs_in_without_editing_the_module(caplog, tmp_path):
    student, _ = make_models()
    module = DistillationModule(student, teacher_backend=UniformTeacher(VOCAB),
                                optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # fmt: skip
    loader = DataLoader(RandomTokens(samples=8), batch_size=4)
    trainer = _trainer(max_steps=2, limit_val_batches=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, loader, loader)
    assert "uniform teacher over 37 tokens" in caplog.text
    metrics = trainer.callback_metrics
    assert float(metrics["val/teacher_ce"]) == pytest.approx(math.log(VOCAB), rel=1e-6)
    # The objective is KL(uniform ‖ student), from the backend's loss.
    batch = _batch(4)
    logits = module.student(batch["input_ids"])
    valid = batch["labels"] != -100
    log_q = torch.log_softmax(logits[valid], -1)
    expected = (-math.log(VOCAB) - log_q).mean(-1).mean()
    terms = module.compute_loss(logits, module.run_teacher(batch), batch)
    torch.testing.assert_close(terms.loss, expected, rtol=1e-5, atol=1e-6)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert any(v == {"uniform_teacher": VOCAB} or "uniform_teacher" in str(v)
               for v in checkpoint.values())  # fmt: skip
    assert module.teacher is None and not any(k.startswith("teacher.") for k in module.state_dict())
    with pytest.raises(ValueError, match="exactly one of teacher"):
        DistillationModule(student, make_models()[1], teacher_backend=UniformTeacher(VOCAB))
    with pytest.raises(ValueError, match="must be a TeacherBackend"):
        DistillationModule(student, teacher_backend=object())
    with pytest.raises(ValueError, match="does not fuse the heads"):
        DistillationModule(student, teacher_backend=UniformTeacher(VOCAB), fused_head=True)


# ---------------------------------------------------------------------- sequence source
def test_the_sequence_source_gives_the_batch_of_every_step():
    calls: list[str] = []

    class FirstHalf:
        """Distil on the first half of each sequence only."""

        def __call__(self, module, batch, stage):
            calls.append(stage)
            labels = batch["labels"].clone()
            labels[:, labels.shape[1] // 2 :] = -100
            return {**batch, "labels": labels}

    student, teacher = make_models()
    module = DistillationModule(student, teacher, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    module.sequence_source = FirstHalf()
    tokens = []

    class Tokens(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tokens.append(int(outputs["valid_mask"].sum()))

    loader = DataLoader(RandomTokens(samples=8), batch_size=4)
    _trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0,
             callbacks=[Tokens()]).fit(module, loader, loader)  # fmt: skip
    assert calls == ["train", "train", "val"]
    assert tokens == [4 * 4, 4 * 4]  # 12 positions, the first 2 ignored, the last 6 cut


def test_a_users_fused_backend_cannot_be_switched_off():
    """The teacher-cache writer turns ``fused_head`` off to read logits; a teacher backend of
    the user's cannot switch kind, so that is an error, not a silent no-op."""
    student, teacher = make_models()
    backend = FusedHeadTeacher(TeacherSource(teacher))
    module = DistillationModule(student, teacher_backend=backend)
    assert module.fused_head
    with pytest.raises(ValueError, match="FusedHeadTeacher teacher backend has fused_head=True"):
        module.fused_head = False
    assert module.teacher_backend is backend
