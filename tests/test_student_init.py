"""A student initialised from its teacher (DistilBERT/Minitron): the chosen blocks, embeddings,
final norm and lm_head are the teacher's exactly, the student is a valid shallower model, and it
exports and reloads with the same logits. TinyLlama (``init_from``) and HFCausalLM
(``keep_layers``), from Python and from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_kd import TinyLlama
from lightning_kd.models.init_from_teacher import copy_from_teacher, select_layers, teacher_key
from tests.helpers.real_model import converted_smollm2, needs_real_model

SIZES = {"vocab_size": 64, "dim": 32, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 48}


def test_select_layers_stride_and_list():
    assert select_layers(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert select_layers(4, 1) == [0, 1, 2, 3]
    assert select_layers(30, [0, 10, 29]) == [0, 10, 29]


@pytest.mark.parametrize(
    ("layers", "match"),
    [(0, "stride"), ([], "empty"), ([0, 30], r"\[0, 30\)"), ([3, 1], "increasing"),
     ([2, 2], "increasing"), ([-1], r"\[0, 30\)")],
)  # fmt: skip
def test_select_layers_rejects(layers, match):
    with pytest.raises(ValueError, match=match):
        select_layers(30, layers)


def test_teacher_key_renumbers_blocks_only():
    assert teacher_key("model.layers.1.mlp.w1.weight", [0, 5]) == "model.layers.5.mlp.w1.weight"
    assert teacher_key("embed.weight", [0, 5]) == "embed.weight"
    with pytest.raises(ValueError, match="depth must equal"):
        teacher_key("layers.2.attn.wq.weight", [0, 5])


def _teacher_file(
    tmp_path: Path, n_layers: int = 4, prefix: str = "model."
) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    teacher = TinyLlama(n_layers=n_layers, **SIZES)
    path = tmp_path / "teacher.ckpt"
    state = {f"{prefix}{k}": v for k, v in teacher.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    return teacher, path


def _assert_copied(student: nn.Module, teacher: nn.Module, layers: list[int]) -> None:
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(value, teacher_state[teacher_key(key, layers)]), key


def test_tiny_llama_init_from_teacher_copies_exactly(tmp_path):
    teacher, path = _teacher_file(tmp_path)
    student = TinyLlama(n_layers=2, init_from=str(path), init_from_prefix="model.",
                        init_layers=[1, 3], **SIZES)  # fmt: skip
    _assert_copied(student, teacher, [1, 3])
    # Not the first blocks: block 0 of the student is the teacher's block 1.
    assert not torch.equal(student.layers[0].attn.wq.weight, teacher.layers[0].attn.wq.weight)
    stride = TinyLlama(n_layers=2, init_from=str(path), init_from_prefix="model.",
                       init_layers=2, **SIZES)  # fmt: skip
    _assert_copied(stride, teacher, [0, 2])
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12))
    logits = student(ids)
    assert logits.shape == (2, 12, SIZES["vocab_size"]) and torch.isfinite(logits).all()


def test_tiny_llama_init_from_teacher_errors(tmp_path):
    _, path = _teacher_file(tmp_path)
    with pytest.raises(ValueError, match="n_layers=3"):
        TinyLlama(n_layers=3, init_from=str(path), init_from_prefix="model.",
                  init_layers=[0, 1], **SIZES)  # fmt: skip
    with pytest.raises(ValueError, match="teacher's width"):
        TinyLlama(n_layers=2, init_from=str(path), init_from_prefix="model.",
                  **{**SIZES, "dim": 64})  # fmt: skip
    with pytest.raises(ValueError, match="starts with prefix"):
        TinyLlama(n_layers=2, init_from=str(path), init_from_prefix="student.", **SIZES)
    with pytest.raises(ValueError, match="needs init_from"):
        TinyLlama(n_layers=2, init_layers=[0, 1], **SIZES)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        TinyLlama(n_layers=2, init_from=str(tmp_path / "junk.ckpt"), **SIZES)


def test_copy_from_teacher_refuses_missing_blocks():
    teacher, student = TinyLlama(n_layers=2, **SIZES), TinyLlama(n_layers=2, **SIZES)
    with pytest.raises(ValueError, match="no teacher key"):
        copy_from_teacher(student, teacher.state_dict(), [0, 5])


def test_tiny_llama_student_exports_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_kd.export import export_student

    _, path = _teacher_file(tmp_path)
    student = TinyLlama(n_layers=2, init_from=str(path), init_from_prefix="model.",
                        init_layers=[0, 3], **SIZES).eval()  # fmt: skip
    out = export_student(student, student.state_dict(), tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 2
    ids = torch.randint(0, SIZES["vocab_size"], (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids), rtol=1e-5, atol=1e-5)


def _hf_teacher(tmp_path: Path, layers: int = 6) -> Path:
    from lightning_kd.models.hf import HFCausalLM

    torch.manual_seed(0)
    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
              "intermediate_size": 48, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
    HFCausalLM(config=config).model.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_hf_keep_layers_copies_exactly_and_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_kd.models.hf import HFCausalLM

    directory = _hf_teacher(tmp_path)
    teacher = HFCausalLM(pretrained_path=str(directory)).eval()
    student = HFCausalLM(pretrained_path=str(directory), keep_layers=[1, 4, 5]).eval()
    assert student.kept_layers == [1, 4, 5]
    assert student.model.config.num_hidden_layers == 3 and len(student.model.model.layers) == 3
    assert [b.self_attn.layer_idx for b in student.model.model.layers] == [0, 1, 2]
    _assert_copied(student, teacher, [1, 4, 5])
    assert HFCausalLM(pretrained_path=str(directory), keep_layers=2).kept_layers == [0, 2, 4]
    student.model.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = student(ids)
        assert not torch.allclose(expected, teacher(ids))  # a different (shallower) model
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


def test_hf_keep_layers_errors(tmp_path):
    from lightning_kd.models.hf import HFCausalLM

    with pytest.raises(ValueError, match="needs pretrained_path"):
        HFCausalLM(config={"model_type": "llama", "num_hidden_layers": 2}, keep_layers=1)
    directory = _hf_teacher(tmp_path, layers=2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        HFCausalLM(pretrained_path=str(directory), keep_layers=[0, 2])
    with torch.device("meta"), pytest.raises(ValueError, match="sharded"):
        HFCausalLM(pretrained_path=str(directory), keep_layers=[0])


def test_student_from_teacher_in_yaml(tmp_path):
    """Both options parse and instantiate from a YAML model definition (jsonargparse)."""
    from jsonargparse import ArgumentParser

    _, path = _teacher_file(tmp_path)
    directory = _hf_teacher(tmp_path)
    parser = ArgumentParser()
    parser.add_argument("--tiny", type=nn.Module)
    parser.add_argument("--hf", type=nn.Module)
    config = parser.parse_string(f"""
tiny:
  class_path: lightning_kd.TinyLlama
  init_args: {{vocab_size: 64, dim: 32, n_heads: 4, n_kv_heads: 2, hidden_dim: 48,
              n_layers: 2, init_from: {path}, init_from_prefix: model., init_layers: 2}}
hf:
  class_path: lightning_kd.models.hf.HFCausalLM
  init_args: {{pretrained_path: {directory}, keep_layers: [0, 5]}}
""")
    built = parser.instantiate(config)
    assert len(built.tiny.layers) == 2 and built.hf.kept_layers == [0, 5]


@pytest.mark.real_model
@needs_real_model
def test_smollm2_student_from_its_teacher():
    """The real teacher's 30 blocks → a 6-block student (every 6th block, and the last)."""
    from lightning_kd.models.hf import HFCausalLM

    directory = converted_smollm2()
    layers = [0, 6, 12, 18, 24, 29]
    student = HFCausalLM(pretrained_path=str(directory), keep_layers=layers).eval()
    teacher = HFCausalLM(pretrained_path=str(directory)).eval()
    _assert_copied(student, teacher, layers)
    assert sum(p.numel() for p in student.parameters()) < 0.5 * sum(
        p.numel() for p in teacher.parameters()
    )
