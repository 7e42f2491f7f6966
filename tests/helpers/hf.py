"""Tiny Hugging Face configs and tokenizers for the tests (built locally, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path


def hf_config(vocab: int, hidden: int = 32, layers: int = 2, model_type: str = "llama") -> dict:
    """A small config of ``model_type`` (untied head, 4 heads, 2 KV heads)."""
    return dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden,
                intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                initializer_range=0.2)  # fmt: skip


def save_tokenizer(directory: Path | str, words: list[str]) -> None:
    """A word-level tokenizer of ``<unk> <eos> <pad> *words`` saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "<pad>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(directory)
