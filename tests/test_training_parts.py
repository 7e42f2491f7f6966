"""The parts DistillationModule composes, each on its own, plus the layout's promises: the loss
package imports no Lightning, 0.1 module paths still resolve, and evaluation uses the training
objective."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule, LossTerms, TinyLlama
from lightning_kd.models import (
    CausalLM,
    SupportsFSDP,
    SupportsTensorParallel,
    SupportsUntiedHead,
    SupportsVocabulary,
)
from lightning_kd.training.checkpoint_policy import check_settings, record_settings
from lightning_kd.training.eval_metrics import EvalSums
from lightning_kd.training.teacher import TeacherSource, read_state_dict
from lightning_kd.training.token_window import TokenWindow
from lightning_kd.training.vocabulary import reconcile_vocabularies
from tests.scripts.fit_run import RandomTokens, make_models

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- layout
def test_losses_package_imports_no_lightning():
    """A fresh interpreter in which importing Lightning fails can still use KDLoss,
    LinearKDLoss and TopKKDLoss."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "import lightning_kd.losses as losses\n"
        "from lightning_kd import KDLoss, TinyLlama\n"
        "s = torch.randn(3, 5, requires_grad=True)\n"
        "KDLoss()(s, torch.randn(3, 5), torch.tensor([1, 2, -100])).backward()\n"
        "assert s.grad is not None and losses.ForwardKL\n"
        "h = torch.randn(3, 4, requires_grad=True)\n"
        "losses.LinearKDLoss()(h, torch.randn(5, 4), torch.randn(3, 4), torch.randn(5, 4),\n"
        "                      torch.tensor([1, 2, -100])).backward()\n"
        "ids, lp = torch.tensor([[0, 1]] * 3), torch.log(torch.full((3, 2), 0.3))\n"
        "t = torch.randn(3, 5, requires_grad=True)\n"
        "losses.TopKKDLoss()(t, ids, lp, torch.tensor([1, 2, -100])).backward()\n"
        "assert h.grad is not None and t.grad is not None\n"
        "assert not any(m.split('.')[0] == 'lightning' for m in sys.modules), 'lightning loaded'\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("lightning_kd.hf", "lightning_kd.models.hf", "HFCausalLM"),
        ("lightning_kd.module", "lightning_kd.training.distillation", "DistillationModule"),
        ("lightning_kd.kd_loss", "lightning_kd.losses.kd_loss", "KDLoss"),
        ("lightning_kd.tensor_parallel", "lightning_kd.losses.vocab_parallel",
         "find_vocab_tp_group"),
    ],
)  # fmt: skip
def test_old_module_paths_still_import_with_a_deprecation_warning(old, new, name):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        f"assert getattr(old, {name!r}) is getattr(new, {name!r})\n"
        f"assert any({new!r} in str(w.message) and w.category is DeprecationWarning "
        "for w in caught), [str(w.message) for w in caught]\n"
        # The new module keeps its own spec (importlib sets the old one), so reload works.
        f"assert new.__spec__.name == {new!r}, new.__spec__\n"
        "importlib.reload(new)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tiny_llama_follows_the_model_contract():
    model = TinyLlama()
    assert isinstance(model, CausalLM) and isinstance(model, SupportsTensorParallel)
    assert isinstance(model, SupportsFSDP) and isinstance(model, SupportsVocabulary)
    assert not isinstance(model, SupportsUntiedHead)
    assert not isinstance(nn.Linear(2, 2), SupportsVocabulary)


def test_tiny_llama_restrict_vocab_keeps_the_first_rows():
    model = TinyLlama(vocab_size=12, dim=8, n_heads=2, n_kv_heads=1, hidden_dim=8)
    ids = torch.randint(0, 7, (2, 5))
    before = model(ids)
    model.restrict_vocab(7)
    assert model.vocab_size == 7 and model.embed.weight.shape[0] == 7
    torch.testing.assert_close(model(ids), before[..., :7])
    with pytest.raises(ValueError, match="cannot restrict vocab 7 to 9"):
        model.restrict_vocab(9)


# ---------------------------------------------------------------------------- token window
def test_token_window_scale_is_accumulate_times_dp_over_window_tokens():
    window = TokenWindow()
    window.add(30)
    window.add(10)
    scale, tokens = window.close(accumulate=2, group=None, device=torch.device("cpu"))
    assert (scale, tokens) == (2 / 40, 40.0)
    assert window.close(1, None, torch.device("cpu")) == (1.0, 0.0)  # restarted; no div by 0


# ---------------------------------------------------------------------------- eval sums
def test_eval_sums_are_token_weighted_and_reset():
    sums = EvalSums()
    one = torch.tensor(1.0)
    sums.add(one * 2, one, student_ce=one * 30, teacher_ce=one * 10, tokens=10)
    sums.add(one * 4, one * 3, student_ce=one * 90, teacher_ce=one * 30, tokens=30)
    means = sums.compute(None, torch.device("cpu"))
    assert means["loss"] == pytest.approx((2 * 10 + 4 * 30) / 40)
    assert means["kd_loss"] == pytest.approx((10 + 90) / 40)
    assert means["student_ce"] == pytest.approx(3.0) and means["teacher_ce"] == pytest.approx(1.0)
    assert means["student_ppl"] == pytest.approx(torch.e**3)
    assert sums.compute(None, torch.device("cpu")) == {}  # reset; nothing seen


# ---------------------------------------------------------------------------- checkpoints
def test_settings_are_recorded_and_differences_named():
    checkpoint: dict = {}
    record_settings(checkpoint, {"kd_ratio": 1.0, "temperature": 2.0})
    messages: list[str] = []
    changed = check_settings(checkpoint, {"kd_ratio": 1.0, "temperature": 1.0}, messages.append)
    assert changed == ["temperature: saved 2.0, now 1.0"]
    assert "not the teacher's weights" in messages[0]
    assert check_settings({}, {"kd_ratio": 0.5}, messages.append) == []  # nothing recorded


# ---------------------------------------------------------------------------- teacher
def test_teacher_source_loads_freezes_and_names_bad_files(tmp_path):
    _, teacher = make_models()
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in teacher.state_dict().items()}}, path)
    _, fresh = make_models(seed=1)
    built = TeacherSource(fresh, str(path), "model.").build()
    assert built is fresh and not built.training
    assert not any(p.requires_grad for p in built.parameters())
    torch.testing.assert_close(built.state_dict(), teacher.state_dict(), rtol=0, atol=0)

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes\.txt' is not a readable PyTorch checkpoint"):
        read_state_dict(str(text))
    with pytest.raises(ValueError, match=r"teacher_checkpoint_prefix='teacher\.'"):
        read_state_dict(str(path), "teacher.")
    with pytest.raises(ValueError, match="neither a file nor a distributed checkpoint"):
        TeacherSource(fresh, str(tmp_path / "missing.pt"))


def test_vocabularies_are_restricted_to_the_shared_size():
    student = TinyLlama(vocab_size=10, dim=8, n_heads=2, n_kv_heads=1, hidden_dim=8)
    teacher = TinyLlama(vocab_size=12, dim=8, n_heads=2, n_kv_heads=1, hidden_dim=8)
    with pytest.raises(ValueError, match="set shared_vocab_size"):
        reconcile_vocabularies(student, teacher)
    reconcile_vocabularies(student, teacher, shared_vocab_size=10)
    assert teacher.vocab_size == 10 and student.vocab_size == 10


# ---------------------------------------------------------------------------- evaluation
class ExtraTerm(DistillationModule):
    """A subclass whose objective adds a constant: it must show up in ``val/loss``."""

    def compute_loss(self, student_output, teacher_output, batch) -> LossTerms:
        terms = super().compute_loss(student_output, teacher_output, batch)
        return terms._replace(loss=terms.loss + 5.0)


def test_evaluation_uses_the_training_objective():
    student, teacher = make_models()
    module = ExtraTerm(student, teacher)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (metrics,) = trainer.validate(module, DataLoader(RandomTokens(samples=4), batch_size=2),
                                      verbose=False)  # fmt: skip
    assert metrics["val/loss"] == pytest.approx(metrics["val/kd_loss"] + 5.0, rel=1e-6)
