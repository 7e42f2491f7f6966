"""``lightning_kd.generation`` (the reference sampler) and ``lightning-kd generate`` on a
checkpoint (with a config written by ``--print_config``) and on its exported directory."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_kd.cli import main
from lightning_kd.generation import next_token_probs, sample

ROOT = Path(__file__).resolve().parents[1]
TEACHER = str(ROOT / "configs" / "teacher.yaml")
EOS = 7


class Scripted(nn.Module):
    """Logits that pick token 1 until row r has ``stops[r]`` new tokens, then EOS."""

    def __init__(self, prompt_len: int, stops: list[int], vocab: int = 10) -> None:
        super().__init__()
        self.prompt_len, self.stops, self.vocab = prompt_len, stops, vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        new = ids.shape[1] - self.prompt_len
        for row, stop in enumerate(self.stops):
            logits[row, -1, EOS if new + 1 >= stop else 1] = 10.0
        return logits


def test_next_token_probs_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert next_token_probs(logits, temperature=0).tolist() == [[0, 0, 0, 1]]
    top2 = next_token_probs(logits, top_k=2)
    assert (top2[0, :2] == 0).all() and torch.allclose(top2.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)[0]  # 0.032, 0.087, 0.237, 0.644
    nucleus = next_token_probs(logits, top_p=0.8)  # 0.644 < 0.8: keeps the two likeliest
    assert (nucleus[0, :2] == 0).all() and (nucleus[0, 2:] > 0).all()
    torch.testing.assert_close(nucleus[0, 2:], full[2:] / full[2:].sum())
    assert next_token_probs(logits, top_p=0.5)[0].tolist() == [0, 0, 0, 1]
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}):
        with pytest.raises(ValueError):
            next_token_probs(logits, **bad)


def test_sample_stops_each_row_at_eos_and_pads_with_it():
    prompt = torch.tensor([[3, 4], [5, 6]])
    out = sample(Scripted(2, [2, 4]), prompt, 50, temperature=0.0, eos_token_id=EOS)
    assert out.tolist() == [[3, 4, 1, EOS, EOS, EOS], [5, 6, 1, 1, 1, EOS]]
    # without an EOS it runs to max_new_tokens
    assert sample(Scripted(2, [2, 4]), prompt, 5, temperature=0.0).shape == (2, 7)
    with pytest.raises(ValueError, match="input_ids"):
        sample(Scripted(2, [1]), torch.zeros(2), 3)


def test_sample_is_reproducible_with_a_seeded_generator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    prompt = torch.tensor([[1, 2, 3]])

    def draw(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return sample(model, prompt, 30, temperature=1.5, generator=gen)[0].tolist()

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def _cli_out(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = main(args)
        except SystemExit as stop:  # --print_config exits
            status = stop.code or 0
    assert status == 0, out.getvalue()[-2000:]
    return out.getvalue()


@pytest.mark.slow  # a 2-step fit, an export and three generations (~1 min on 2 cores)
def test_generate_on_a_checkpoint_and_its_export(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    data = ["--data.init_args.synthetic_chars", "30000", "--data.init_args.batch_size", "4"]
    printed = _cli_out(["fit", "--config", TEACHER, "--print_config"])
    assert "ckpt_path" in printed
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    run = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
           "--trainer.limit_val_batches", "1"]  # fmt: skip
    assert main(["fit", "--config", TEACHER, *run, *data]) == 0
    ckpt = "runs/teacher/checkpoints/last.ckpt"
    greedy = ["--prompt", "Once upon", "--max_new_tokens", "12", "--temperature", "0"]
    from_ckpt = _cli_out(["generate", "--config", str(config), "--ckpt_path", ckpt, *greedy, *data])
    assert from_ckpt.startswith("Once upon")

    assert main(["export", "--config", str(config), "--ckpt_path", ckpt, "--output_dir", "hf",
                 *data]) == 0  # fmt: skip
    for name in ("config.json", "generation_config.json"):
        fields = json.loads((tmp_path / "hf" / name).read_text())
        assert fields["eos_token_id"] == 256 and fields["pad_token_id"] == 257, name
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.generation_config.eos_token_id == 256
    from_dir = _cli_out(["generate", "--model_dir", "hf", *greedy])
    assert from_dir == from_ckpt  # same weights, same tokenizer, greedy

    sampled = ["--prompt", "Once", "--num_samples", "2", "--seed", "3", "--top_k", "20"]
    assert _cli_out(["generate", "--model_dir", "hf", *sampled]) == _cli_out(
        ["generate", "--model_dir", "hf", *sampled]
    )


def test_generate_refuses_a_missing_source(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--prompt", "x"])
    assert stop.value.code == 2
    assert "--model_dir" in capsys.readouterr().err
    pytest.importorskip("transformers")
    assert main(["generate", "--model_dir", "no/such/dir", "--prompt", "x"]) == 1
    assert "no config.json" in capsys.readouterr().err
