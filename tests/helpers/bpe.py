"""A small byte-level BPE trained with the ``tokenizers`` library on the story corpus (well
under a second): the third real tokenizer of the cross-tokenizer tests, beside SmolLM2's and
the byte tokenizer."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4)
def trained_bpe(vocab_size: int = 512, seed: int = 0):
    """A ``tokenizers.Tokenizer`` (byte-level BPE, ``vocab_size`` tokens incl. the byte
    alphabet and ``<|im_start|>`` / ``<|im_end|>`` / ``<eos>`` specials) trained on 40k characters
    of the generated corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lightning_kd.data.corpus import generate_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generate_corpus(40_000, seed=seed), trainer=trainer)
    return tok


def save_bpe_directory(directory, vocab_size: int = 512):
    """:func:`trained_bpe` saved as a Hugging Face tokenizer directory (``<eos>`` as EOS and
    PAD), which ``tokenizer=DIR`` options load. Returns the directory as a string."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=trained_bpe(vocab_size), eos_token="<eos>", pad_token="<eos>"
    )
    tok.save_pretrained(str(directory))
    return str(directory)
