"""The on-disk cache of a tokenised corpus: written atomically, checksummed, verified on load.

A cache file holds ``tokens`` ([T] int16/int32), ``offsets`` ([D + 1] int64 document
boundaries) and the SHA-256 of both. Its name carries two digests: one of the *source* (the
input paths or the generator's settings, the text field, the encoding and the tokenizer: for a
Hugging Face one its full serialisation, so vocabulary, merges, normalizer, pre-tokenizer, added
tokens and their ``special`` flags, and its special tokens such as ``eos_token``; for chat data
also the chat template and the end-of-turn texts) and one of the *content key* (the source plus
each file's size and modification time). So:

- a changed input file gets a new cache file, and writing it removes the stale files of the
  same source (they would never be read again);
- a cache file whose bytes were altered, truncated or replaced fails its checksum (or cannot
  be read at all) when it is opened, once per process: it is removed and rebuilt from the
  source with a warning that names it, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_kd.io import atomic_write

#: Bump when the layout or content of the token cache changes.
CACHE_FORMAT = 2


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]


def checksum(tokens: Tensor, offsets: Tensor) -> str:
    """SHA-256 of the token and offset bytes (reads each once; works on memory-mapped data)."""
    hasher = hashlib.sha256()
    for tensor in (tokens, offsets):
        hasher.update(tensor.contiguous().numpy().data)
    return hasher.hexdigest()


class TokenCache:
    """One tokenised corpus under ``directory``.

    Args:
        directory: the cache directory (created on first write).
        source: what identifies the corpus regardless of file times (JSON-serialisable).
        content: what else decides the tokens, e.g. file sizes and modification times.
    """

    def __init__(
        self, directory: str | os.PathLike, source: Mapping[str, Any], content: Mapping[str, Any]
    ) -> None:
        self.directory = Path(directory)
        self._source = _digest({"format": CACHE_FORMAT, **source})
        self._content = _digest({"source": self._source, **content})

    @property
    def path(self) -> Path:
        """The cache file of this corpus."""
        return self.directory / f"tokens-{self._source}-{self._content}.pt"

    def write(self, tokens: Tensor, offsets: Tensor) -> None:
        """Store the corpus atomically (temporary file, then rename) and remove stale files of
        the same source."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {"tokens": tokens, "offsets": offsets, "sha256": checksum(tokens, offsets)}
        atomic_write(self.path, lambda handle: torch.save(data, handle))
        for stale in self.directory.glob(f"tokens-{self._source}-*.pt"):
            if stale != self.path:
                stale.unlink(missing_ok=True)
                warnings.warn(f"removed the stale token cache {stale} (its input changed).",
                              stacklevel=2)  # fmt: skip

    def read(self) -> dict[str, Tensor] | None:
        """The cached ``tokens`` and ``offsets`` (memory-mapped), or None when there is no
        cache file or it fails verification (then it is removed, with a warning naming it)."""
        path = self.path
        if not path.is_file():
            return None
        problem = None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # truncated or garbage files raise many types
            problem = f"cannot be read ({type(error).__name__}: {error})"
        else:
            if not isinstance(data, dict) or not {"tokens", "offsets", "sha256"} <= set(data):
                problem = "does not hold tokens, offsets and a checksum"
            elif checksum(data["tokens"], data["offsets"]) != data["sha256"]:
                problem = "fails its checksum (its bytes were altered)"
        if problem is None:
            return {"tokens": data["tokens"], "offsets": data["offsets"]}
        warnings.warn(
            f"the token cache {path} {problem}; removing it and tokenising the source again.",
            stacklevel=2,
        )
        path.unlink(missing_ok=True)
        return None

    def load_or_build(self, build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """The verified cache, after (re)building it with ``build()`` when needed."""
        data = self.read()
        if data is None:
            built = build()
            self.write(built["tokens"], built["offsets"])
            data = self.read()
            if data is None:  # pragma: no cover - only if the disk corrupts what we just wrote
                raise ValueError(f"the token cache {self.path} could not be written and read back.")
        return data
