"""``lightning-kd evaluate``: the metrics against a plain reference, the greedy decoder, the
report, and the command on a checkpoint and on its exported Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd import TinyLlama
from lightning_kd.cli import main
from lightning_kd.evaluation import TokenMetrics, evaluate_models, format_table, greedy_generate

V = 11


def test_token_metrics_match_a_plain_reference():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 7, V), torch.randn(3, 7, V)
    labels = torch.randint(0, V, (3, 7))
    labels[0, :3] = -100
    labels[2] = -100
    metrics = TokenMetrics()
    metrics.add(student[:2], labels[:2], teacher[:2])
    metrics.add(student[2:], labels[2:], teacher[2:])  # a batch without targets
    got = metrics.compute()
    keep = labels != -100
    s, t, y = student[keep], teacher[keep], labels[keep]
    assert got["tokens"] == int(keep.sum())
    ce = F.cross_entropy(s, y).item()
    assert got["ce"] == pytest.approx(ce, rel=1e-5)
    assert got["perplexity"] == pytest.approx(torch.tensor(ce).exp().item(), rel=1e-5)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                  reduction="batchmean").item()  # fmt: skip
    assert got["kl_to_teacher"] == pytest.approx(kl, rel=1e-5)
    assert got["accuracy"] == pytest.approx((s.argmax(-1) == y).float().mean().item())
    assert got["top1_agreement"] == pytest.approx(
        (s.argmax(-1) == t.argmax(-1)).float().mean().item()
    )


def test_token_metrics_teacher_against_itself_and_without_teacher():
    logits, labels = torch.randn(2, 5, V), torch.randint(0, V, (2, 5))
    same = TokenMetrics()
    same.add(logits, labels, logits)
    result = same.compute()
    assert result["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert result["top1_agreement"] == 1.0
    alone = TokenMetrics()
    alone.add(logits, labels)
    assert alone.compute()["kl_to_teacher"] is None
    with pytest.raises(ValueError, match="no valid tokens"):
        TokenMetrics().compute()
    with pytest.raises(ValueError, match="do not match"):
        same.add(logits, labels[:, :3])


class _Successor(nn.Module):
    """Logits that favour token (last input + 1) % V at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.lengths: list[int] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.lengths.append(ids.shape[1])
        return F.one_hot((ids + 1) % V, V).float() + self.dummy


def test_greedy_generate_follows_the_argmax_and_stops():
    model = _Successor()
    assert greedy_generate(model, [3], 4) == [4, 5, 6, 7]
    assert greedy_generate(model, [8], 10, eos_id=10) == [9, 10]
    model.lengths.clear()
    assert greedy_generate(model, [1, 2, 3], 3, max_context=2) == [4, 5, 6]
    assert model.lengths == [2, 2, 2]
    with pytest.raises(ValueError, match="non-empty"):
        greedy_generate(model, [], 3)


def test_evaluate_models_rows_and_table():
    torch.manual_seed(0)
    teacher, student = TinyLlama(vocab_size=V, n_layers=1), TinyLlama(vocab_size=V, n_layers=1)
    ids = torch.randint(0, V, (2, 9))
    batches = [{"input_ids": ids, "labels": ids.roll(-1, 1)}]
    result = evaluate_models({"student": student}, batches, teacher=teacher)
    names = [row["name"] for row in result["models"]]
    assert names == ["teacher", "student"]
    assert result["models"][0]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert result["models"][1]["kl_to_teacher"] > 0
    table = format_table(result["models"])
    assert "perplexity" in table and table.count("\n") == 3
    with pytest.raises(ValueError, match="teacher's row"):
        evaluate_models({"teacher": student}, batches)


SIZES = {"vocab_size": 258, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "hidden_dim": 48, "max_seq_len": 64}  # fmt: skip


def _config(tmp_path: Path, teacher_ckpt: Path) -> Path:
    corpus = tmp_path / "text.txt"
    corpus.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 60)
    student = json.dumps({"class_path": "lightning_kd.TinyLlama", "init_args": SIZES})
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer: {{accelerator: cpu, devices: 1, logger: false, enable_progress_bar: false}}
model:
  class_path: lightning_kd.DistillationModule
  init_args:
    student: {student}
    teacher: {student}
    teacher_checkpoint: {teacher_ckpt}
data:
  class_path: lightning_kd.data.TextDataModule
  init_args: {{paths: [{corpus}], seq_len: 32, batch_size: 4, val_fraction: 0.2,
              cache_dir: {tmp_path / "cache"}}}
""")
    return config


@pytest.mark.slow
def test_evaluate_command_on_a_checkpoint_and_its_export(tmp_path, capsys):
    from lightning_kd.export import export_student

    torch.manual_seed(0)
    teacher, student = TinyLlama(**SIZES), TinyLlama(**SIZES)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "run.ckpt")
    export_student(student, student.state_dict(), tmp_path / "hf")
    config = _config(tmp_path, tmp_path / "teacher.pt")
    out = tmp_path / "eval"
    code = main(["evaluate", "--config", str(config), "--output_dir", str(out),
                 "--ckpt_path", f"distilled={tmp_path / 'run.ckpt'}",
                 "--hf_dir", str(tmp_path / "hf"), "--max_batches", "2",
                 "--prompt", "Call me", "--max_new_tokens", "5"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "evaluation.json").read_text())
    rows = {row["name"]: row for row in result["models"]}
    assert list(rows) == ["teacher", "distilled", "hf"]
    assert rows["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    # The checkpoint and its export are the same model: the same numbers.
    for key in ("tokens", "ce", "kl_to_teacher", "top1_agreement"):
        assert rows["hf"][key] == pytest.approx(rows["distilled"][key], rel=1e-5), key
    assert rows["distilled"]["kl_to_teacher"] > 0.0
    completions = result["samples"][0]["completions"]
    assert completions["hf"] == completions["distilled"] and set(completions) == set(rows)
    assert "| distilled" in (out / "evaluation.md").read_text()
    assert "perplexity" in capsys.readouterr().out
    code = main(["evaluate", "--config", str(config), "--output_dir", str(out),
                 "--ckpt_path", str(tmp_path / "missing.ckpt")])  # fmt: skip
    assert code == 1
    assert "does not exist" in capsys.readouterr().err
