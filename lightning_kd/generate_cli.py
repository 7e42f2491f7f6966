"""``lightning-kd generate``: sample text from a run's checkpoint or an exported directory.

- ``lightning-kd generate --config C --ckpt_path P --prompt "Once upon"``: the student (or
  model) of checkpoint ``P``, built from config ``C`` (without the teacher, on CPU), with the
  run's tokenizer (its data module's: the byte tokenizer or a Hugging Face one). Every
  argument this command does not take goes to the config, as for ``export``.
- ``lightning-kd generate --model_dir D --prompt "..."``: a directory written by
  ``lightning-kd export`` (or any Hugging Face causal LM), loaded with ``transformers``; its
  tokenizer, or the byte tokenizer when it has none and its vocabulary is the byte
  tokenizer's 258 ids.

Both sample with :func:`lightning_kd.generation.sample` from a generator seeded with
``--seed`` (the same seed gives the same text) and stop at the tokenizer's EOS (a checkpoint)
or the directory's ``generation_config.json`` EOS. ``--chat`` renders each prompt as a user
turn with the chat template (the run's, the directory tokenizer's, or the byte tokenizer's)
and prints the answer only. Without ``--chat``, a prompt starts a new document: the byte
tokenizer (no BOS) puts its document separator (EOS) before it, as in the training data.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

GENERATE = "generate"
#: The checkpoint's model is built on one CPU process, whatever the run's trainer was.
_CPU_TRAINER = ("--trainer.accelerator", "cpu", "--trainer.devices", "1",
                "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
                "--trainer.logger", "false")  # fmt: skip


@dataclass
class Codec:
    """How prompts become token ids and token ids become text, and which tokens end a text."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos: int | list[int] | None


def parser() -> argparse.ArgumentParser:
    """The command's own options (every other argument goes to the config)."""
    p = argparse.ArgumentParser(
        prog=f"lightning-kd {GENERATE}",
        description="Sample text from a checkpoint (--config C --ckpt_path P) or an exported "
        "Hugging Face directory (--model_dir D).",
        allow_abbrev=False,
    )
    p.add_argument("--config", action="append", help="the run's config file (with --ckpt_path)")
    p.add_argument("--ckpt_path", help="checkpoint file or distributed checkpoint directory")
    p.add_argument("--model_dir", help="an exported Hugging Face directory (instead)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user turn")
    p.add_argument("--max_new_tokens", type=int, default=200, help="default: 200")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default: 0.8)")
    p.add_argument("--top_k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass (default 1.0: off)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return p


def _byte_codec(chat: bool, chat_encoder: Any = None) -> Codec:
    from lightning_kd.data.chat_template import ChatEncoder
    from lightning_kd.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    if chat:
        encoder = chat_encoder or ChatEncoder(tok)
        return Codec(lambda text: _chat_ids(encoder, text), tok.decode, tok.eos_id)
    return Codec(lambda text: [tok.eos_id, *tok.encode(text)], tok.decode, tok.eos_id)


def _chat_ids(encoder: Any, prompt: str) -> list[int]:
    text = encoder.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(encoder.tokenize(text)[0])


def _hf_codec(hf: Any, chat: bool, eos: int | list[int] | None) -> Codec:
    def encode(text: str) -> list[int]:
        if chat:
            turn = [{"role": "user", "content": text}]
            return list(hf.apply_chat_template(turn, tokenize=True, add_generation_prompt=True))
        return list(hf.encode(text))  # with the tokenizer's BOS, where it has one

    def decode(ids: Sequence[int]) -> str:
        return hf.decode(list(ids), skip_special_tokens=True)

    return Codec(encode, decode, hf.eos_token_id if eos is None else eos)


def _from_checkpoint(ours: argparse.Namespace, rest: list[str]) -> tuple[nn.Module, Codec]:
    from lightning_kd.cli import KDLightningCLI
    from lightning_kd.data.tokenizer import ByteTokenizer
    from lightning_kd.export import load_student

    ckpt = Path(ours.ckpt_path)
    if not ckpt.exists():
        raise ValueError(f"--ckpt_path {ours.ckpt_path!r} does not exist.")
    configs = [arg for path in ours.config for arg in ("--config", path)]
    cli = KDLightningCLI(args=[*configs, *_CPU_TRAINER, *rest], run=False)
    model = load_student(cli.model, ckpt)
    tokenizer = getattr(cli.datamodule, "tokenizer", None)
    encoder = getattr(cli.datamodule, "encoder", None) if ours.chat else None
    if ours.chat and encoder is None:
        raise ValueError(
            f"--chat needs a chat run (a ChatDataModule); this config's data is "
            f"{type(cli.datamodule).__name__}."
        )
    if isinstance(tokenizer, ByteTokenizer):
        return model, _byte_codec(ours.chat, encoder)
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is None:
        raise ValueError(
            f"the config's data module ({type(cli.datamodule).__name__}) has no tokenizer to "
            "encode the prompts with."
        )
    codec = _hf_codec(hf, False, None)
    if ours.chat:
        codec.encode = lambda text: _chat_ids(encoder, text)
    return model, codec


def _from_directory(ours: argparse.Namespace) -> tuple[nn.Module, Codec]:
    from lightning_kd.data.tokenizer import ByteTokenizer
    from lightning_kd.models.hf.loading import require_transformers

    transformers = require_transformers()
    directory = Path(ours.model_dir)
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"--model_dir {ours.model_dir!r} is not a Hugging Face model directory (no "
            "config.json); write one with `lightning-kd export`."
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    eos = model.generation_config.eos_token_id
    if (directory / "tokenizer_config.json").is_file():
        hf = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return model, _hf_codec(hf, ours.chat, eos)
    if model.config.vocab_size == ByteTokenizer().vocab_size:
        return model, _byte_codec(ours.chat)
    raise ValueError(
        f"--model_dir {ours.model_dir!r} has no tokenizer and its vocabulary "
        f"({model.config.vocab_size}) is not the byte tokenizer's: save the tokenizer in it."
    )


def max_context(model: nn.Module) -> int | None:
    """The longest input ``model`` takes: a TinyLlama's RoPE table length, a Hugging Face
    model's ``max_position_embeddings``; None when unknown."""
    rope = getattr(model, "rope_cos", None)
    if isinstance(rope, torch.Tensor):
        return int(rope.shape[0])
    config = getattr(model, "config", None) or getattr(
        getattr(model, "model", None), "config", None
    )
    return getattr(config, "max_position_embeddings", None)


def generate(args: list[str]) -> list[str]:
    """Run ``lightning-kd generate`` (see the module docstring); prints and returns the texts.

    Raises:
        ValueError: neither or both of ``--ckpt_path`` / ``--model_dir``, a missing
            checkpoint or directory, bad sampling options, or ``--chat`` without a chat run.
    """
    from lightning_kd.generation import sample

    p = parser()
    ours, rest = p.parse_known_args(args)
    if (ours.ckpt_path is None) == (ours.model_dir is None):
        p.error("give either --config C --ckpt_path P (a checkpoint) or --model_dir D")
    if ours.model_dir is not None:
        if rest or ours.config:
            p.error(f"--model_dir takes no config or config overrides: {ours.config or rest}")
        model, codec = _from_directory(ours)
    else:
        if not ours.config:
            p.error("--ckpt_path needs the run's --config")
        model, codec = _from_checkpoint(ours, rest)
    if ours.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {ours.num_samples}.")
    generator = torch.Generator().manual_seed(ours.seed)
    window = max_context(model)
    texts = []
    for prompt in ours.prompt:
        ids = torch.tensor([codec.encode(prompt)], dtype=torch.long)
        for _ in range(ours.num_samples):
            out = sample(model, ids, ours.max_new_tokens, ours.temperature, ours.top_p,
                         ours.top_k, codec.eos, generator, max_context=window)  # fmt: skip
            completion = codec.decode(out[0, ids.shape[1] :].tolist())
            text = completion if ours.chat else prompt + completion
            texts.append(text)
            print(text, end="\n\n" if len(ours.prompt) * ours.num_samples > 1 else "\n")
    return texts
