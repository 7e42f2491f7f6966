"""``ByteTokenizer``: the byte-level tokenizer of the demo data pipeline.

Token ids 0..255 are the bytes of the UTF-8 encoding of the text, 256 is EOS (the separator
written after every document) and 257 is PAD (fills short sequences when documents are not
packed). It needs no vocabulary file and no download, every string round-trips exactly, and
its 258-entry vocabulary keeps the demo's embedding and lm_head tiny.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


class ByteTokenizer:
    """Byte-level tokenizer with two special tokens (EOS = 256, PAD = 257).

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        [104, 195, 169]
        >>> tok.decode([104, 195, 169, tok.eos_id])
        'hé'
    """

    #: Number of byte ids; the special tokens follow them.
    NUM_BYTES = 256

    @property
    def eos_id(self) -> int:
        """Id of the end-of-document token (256)."""
        return self.NUM_BYTES

    @property
    def pad_id(self) -> int:
        """Id of the padding token (257)."""
        return self.NUM_BYTES + 1

    @property
    def vocab_size(self) -> int:
        """Number of token ids, bytes and specials together (258)."""
        return self.NUM_BYTES + 2

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: its UTF-8 bytes, without special tokens.

        Args:
            text: any string.

        Returns:
            One id in [0, 256) per byte of ``text.encode("utf-8")``.
        """
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens are skipped.

        Args:
            ids: token ids (ints, or anything ``int()`` accepts, such as 0-dim tensors).

        Returns:
            The UTF-8 decoding of the byte ids; invalid byte sequences (e.g. a multi-byte
            character cut in half) become U+FFFD.

        Raises:
            ValueError: for an id outside [0, vocab_size).
        """
        data = bytearray()
        for token in ids:
            token = int(token)
            if 0 <= token < self.NUM_BYTES:
                data.append(token)
            elif not self.NUM_BYTES <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside [0, {self.vocab_size}).")
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory, with ByteTokenizer's interface.

    ``transformers`` (the ``hf`` extra) is imported only when one is built; nothing is
    downloaded (``local_files_only``).

    Args:
        path: directory written by ``tokenizer.save_pretrained``.

    Raises:
        ValueError: when ``path`` is not a directory or the tokenizer has no EOS token.
    """

    def __init__(self, path: str) -> None:
        from lightning_kd.models.hf.loading import local_directory, require_transformers

        directory = local_directory(path, "tokenizer path")
        self.path = str(directory)
        self._tok = require_transformers().AutoTokenizer.from_pretrained(
            directory, local_files_only=True
        )
        if self._tok.eos_token_id is None:
            raise ValueError(f"the tokenizer at {path!r} has no EOS token; set eos_token.")
        self._fingerprint = hashlib.sha256(_serialise(self._tok).encode()).hexdigest()[:16]

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped ``transformers`` tokenizer (chat templates, offsets)."""
        return self._tok

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self._tok.pad_token_id
        return int(pad if pad is not None else self._tok.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:  # part of the data cache key
        return f"HFTokenizer(vocab={self.vocab_size}, sha={self._fingerprint})"


def _serialise(tok: Any) -> str:
    """Everything of a ``transformers`` tokenizer that decides its tokens, as one string: the
    backend's full serialisation (vocabulary, merges, normalizer, pre-tokenizer, added tokens
    with their ``special`` flags, ...; without the per-call truncation and padding state), the
    special tokens (``eos_token``, ``bos_token``, ... that chat templates render) and the
    added tokens' flags. A slow tokenizer without a backend contributes its vocabulary."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
    else:
        pipeline = sorted(tok.get_vocab().items())
    added = sorted(
        (int(i), str(t.content), bool(t.special), bool(t.lstrip), bool(t.rstrip),
         bool(t.normalized), bool(t.single_word))
        for i, t in tok.added_tokens_decoder.items()
    )  # fmt: skip
    special = {str(k): str(v) for k, v in tok.special_tokens_map.items()}
    return json.dumps(
        {"pipeline": pipeline, "special": special, "all_special": sorted(tok.all_special_tokens),
         "added": added},
        sort_keys=True, default=str,
    )  # fmt: skip
