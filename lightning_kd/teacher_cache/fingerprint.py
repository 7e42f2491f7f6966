"""A digest of a dataset's sequences: what ties a teacher cache to the data it was made from."""

from __future__ import annotations

import hashlib
from collections.abc import Sized
from typing import Any

import torch
from tqdm.auto import tqdm

#: The item fields that decide the teacher's output and its valid positions.
FINGERPRINT_FIELDS = ("input_ids", "labels", "position_ids")
_PROGRESS_DELAY_S = 2.0


def data_fingerprint(dataset: Any) -> str:
    """SHA-256 (hex) over every item's ``input_ids``, ``labels`` and (when present)
    ``position_ids``, as int64, in index order, with the number of items.

    Args:
        dataset: a map-style dataset of dicts (``len`` and ``dataset[i]``).

    Returns:
        64 hex digits. Reads every item once (a progress bar appears after 2 s).

    Raises:
        ValueError: when the dataset has no length or an item lacks ``input_ids``/``labels``.
    """
    if not isinstance(dataset, Sized):
        raise ValueError(
            f"data_fingerprint needs a map-style dataset with a length, got {dataset!r}."
        )
    hasher = hashlib.sha256(f"items={len(dataset)}".encode())
    for index in tqdm(range(len(dataset)), desc="Fingerprinting data", unit=" seq",
                      delay=_PROGRESS_DELAY_S):  # fmt: skip
        item = dataset[index]
        if not isinstance(item, dict) or "input_ids" not in item or "labels" not in item:
            raise ValueError(f"item {index} is not a dict with input_ids and labels.")
        for name in FINGERPRINT_FIELDS:
            if name in item:
                value = torch.as_tensor(item[name]).to(torch.int64).contiguous()
                hasher.update(f"{name}{tuple(value.shape)}".encode())
                hasher.update(value.numpy().tobytes())
    return hasher.hexdigest()
