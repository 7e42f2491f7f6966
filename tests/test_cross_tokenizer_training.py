"""Cross-tokenizer distillation end to end: CrossTokenizerDataModule's paired batches, a
DistillationModule fit with a teacher on its own tokenizer, and the clear refusals."""

from __future__ import annotations

import pytest
import torch

from lightning_kd import DistillationModule
from lightning_kd.data.alignment import shared_token_ids, token_strings
from lightning_kd.data.cross_tokenizer_datamodule import CrossTokenizerDataModule
from lightning_kd.data.tokenizer import ByteTokenizer
from lightning_kd.losses import KDLoss
from lightning_kd.losses.cross_tokenizer_loss import HybridKDLoss, ULDLoss
from lightning_kd.losses.vocab_map import VocabMap
from lightning_kd.models import TinyLlama
from lightning_kd.training.teachers.cross_tokenizer import CrossTokenizerTeacher
from tests.helpers.bpe import save_bpe_directory, trained_bpe
from tests.helpers.trainer import cpu_trainer


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    directory = save_bpe_directory(tmp_path_factory.mktemp("bpe"))
    dm = CrossTokenizerDataModule(
        tokenizer=directory, teacher_tokenizer="byte", seq_len=24, teacher_seq_len=80,
        batch_size=4, val_fraction=0.2, synthetic_chars=3000,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )  # fmt: skip
    dm.setup("fit")
    return dm


def test_paired_batches_align_the_same_text(datamodule):
    bpe, byte = datamodule.tokenizer.hf_tokenizer, ByteTokenizer()
    example = datamodule.train_dataset[0]
    spans = example["xtok_spans"]
    kept = spans[spans[:, 0] >= 0]
    assert len(kept) > 5
    s_tokens = torch.cat([example["input_ids"][:1], example["labels"]])
    t_tokens = torch.cat([example["teacher_input_ids"][:1], example["teacher_labels"]])
    for s0, s1, t0, t1 in kept.tolist():
        # Rows [a, b) predict tokens [a + 1, b + 1).
        student_text = bpe.decode(s_tokens[s0 + 1 : s1 + 1].tolist())
        teacher_text = byte.decode(t_tokens[t0 + 1 : t1 + 1].tolist())
        assert student_text == teacher_text and student_text
        assert (example["labels"][s0:s1] >= 0).all() and (
            example["teacher_labels"][t0:t1] >= 0
        ).all()


def _module(datamodule, loss, **kwargs):
    torch.manual_seed(0)
    student = TinyLlama(vocab_size=datamodule.vocab_size, dim=32, n_layers=1, n_heads=2,
                        n_kv_heads=1, hidden_dim=64)  # fmt: skip
    teacher = TinyLlama(vocab_size=datamodule.teacher_vocab_size, dim=32, n_layers=1,
                        n_heads=2, n_kv_heads=1, hidden_dim=64)  # fmt: skip
    return DistillationModule(student, teacher, loss=loss, **kwargs)


def test_fit_with_a_teacher_on_its_own_tokenizer(datamodule):
    s_ids, t_ids = shared_token_ids(token_strings(trained_bpe()), token_strings(ByteTokenizer()))
    vmap = VocabMap(s_ids, t_ids, datamodule.vocab_size, datamodule.teacher_vocab_size)
    module = _module(datamodule, HybridKDLoss(vmap, chunk_size=16, kd_ratio=0.5))
    before = [p.detach().clone() for p in module.student.parameters()]
    trainer = cpu_trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(module, datamodule=datamodule)
    assert isinstance(module.teacher_backend, CrossTokenizerTeacher)
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/kd_loss"]) and logged["train/kd_loss"] > 0
    assert torch.isfinite(logged["val/loss"])
    assert any(
        not torch.equal(a, b) for a, b in zip(before, module.student.parameters(), strict=True)
    )
    assert all(not p.requires_grad for p in module.teacher.parameters())


def test_a_kd_loss_still_refuses_different_vocabularies(datamodule):
    module = _module(datamodule, KDLoss())
    with pytest.raises(ValueError, match="vocab"):
        module.configure_model()


def test_cross_tokenizer_losses_refuse_what_cannot_serve_them(datamodule, tmp_path):
    with pytest.raises(ValueError, match="fused_head"):
        _module(datamodule, ULDLoss(), fused_head=True)
    student = TinyLlama(vocab_size=datamodule.vocab_size, dim=32, n_layers=1, n_heads=2,
                        n_kv_heads=1, hidden_dim=64)  # fmt: skip
    (tmp_path / "cache").mkdir()
    with pytest.raises(ValueError, match="teacher cache"):
        DistillationModule(student, teacher_cache=str(tmp_path / "cache"), loss=ULDLoss())


def test_cache_teacher_refuses_a_cross_tokenizer_loss(datamodule, tmp_path):
    from lightning_kd.teacher_cache import write_teacher_cache

    module = _module(datamodule, ULDLoss())
    with pytest.raises(ValueError, match="do not support cross-tokenizer"):
        write_teacher_cache(module, datamodule, cpu_trainer(), tmp_path / "out", top_k=0)


def test_a_batch_without_teacher_tokens_is_refused(datamodule):
    module = _module(datamodule, ULDLoss())
    module.configure_model()
    batch = {
        k: v.unsqueeze(0)
        for k, v in datamodule.train_dataset[0].items()
        if k in ("input_ids", "labels")
    }
    with pytest.raises(ValueError, match="teacher_input_ids"):
        module.training_step(batch, 0)
