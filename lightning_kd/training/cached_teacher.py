"""Opening, checking and reading the teacher cache of ``DistillationModule(teacher_cache=DIR)``.

A cache written once by ``lightning-kd cache-teacher`` (:mod:`lightning_kd.teacher_cache`)
holds, for every sequence of each split, the teacher's log-probabilities at the run's
temperature: its top-k tokens, or (``top_k=0``) the whole distribution. Training from it builds
no teacher. This module opens the cache, checks that it matches the run (vocabulary,
temperature, tokenizer, the data of every split it is read for), reads the rows of a batch by
their ``index``. The loss against it is the cache teacher's
(:mod:`lightning_kd.training.teachers.cached`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_kd.losses.kd_loss import KDLoss
from lightning_kd.teacher_cache import (
    CachedTeacher,
    TeacherCache,
    data_fingerprint,
    describe_tokenizer,
)

#: The cache split each trainer stage reads (the data modules' test split is their val split).
SPLIT_OF_STAGE = {"train": "train", "sanity_check": "val", "validate": "val", "test": "val"}


class CachedTeacherSource:
    """Opens a teacher cache and reads batches from it.

    Args:
        directory: the cache written by ``lightning-kd cache-teacher``.
    """

    def __init__(self, directory: str) -> None:
        self.directory = str(directory)
        self.cache = TeacherCache(self.directory)  # fails now on a missing or malformed cache

    def check_loss(self, loss: KDLoss) -> None:
        """A top-k cache of format version 1 stores no tail log-mass: its tail is known to
        fp32 only (a tail below ~1e-7 reads as 0, where reverse KL and the divergences that
        weigh the tail by the student's mass are infinite or wrong), so it trains forward KL
        only. Version 2 caches train every divergence on the (k+1) buckets.

        Raises:
            ValueError: for another divergence than forward KL with a version 1 top-k cache.
        """
        meta = self.cache.metadata
        name = loss.divergence.name
        if meta.top_k > 0 and meta.format_version < 2 and name != "forward_kl":
            raise ValueError(
                f"teacher cache {self.directory} (format version {meta.format_version}) holds "
                f"the teacher's top-{meta.top_k} without the tail's log-mass: it trains "
                f"forward_kl only (got {name}). Write it again with this version's "
                "cache-teacher to train any divergence on the top-k buckets."
            )

    def check(
        self, datamodule: Any, loss: KDLoss, vocab_size: int | None, splits: tuple[str, ...]
    ) -> None:
        """Refuse a cache written for another run: vocabulary, temperature, tokenizer, or the
        data of ``splits`` (fingerprints of the data module's datasets).

        Raises:
            ValueError: naming every field that differs, or when the data module does not
                expose its datasets (``train_dataset`` / ``val_dataset``).
        """
        datasets = {}
        for split in splits:
            dataset = getattr(datamodule, f"{split}_dataset", None)
            if dataset is None:
                raise ValueError(
                    f"teacher_cache needs a data module with a `{split}_dataset` (as "
                    "TextDataModule and ChatDataModule have): the cache is keyed on its "
                    f"sequences, got {type(datamodule).__name__}."
                )
            datasets[split] = dataset
        self.cache.check_compatible(
            vocab_size=vocab_size if vocab_size is not None else self.cache.metadata.vocab_size,
            # (a student that does not declare its lm_head width cannot be checked here; the
            # loss still refuses logits narrower than the cached ids)
            temperature=loss.temperature,
            tokenizer=describe_tokenizer(datamodule),
            fingerprints={split: data_fingerprint(d) for split, d in datasets.items()},
        )

    def read(self, batch: Mapping[str, Tensor], split: str, ignore_index: int) -> CachedTeacher:
        """The cached teacher rows of ``batch`` (by its ``index``), on the batch's device.

        Raises:
            ValueError: when the batch carries no ``index`` (the data module must provide it).
        """
        if "index" not in batch:
            raise ValueError(
                "training from a teacher cache needs batches with an `index` (each sequence's "
                "index in its split), as TextDataModule and ChatDataModule yield."
            )
        labels = batch["labels"]
        cached = self.cache.read(split, batch["index"].cpu(), (labels != ignore_index).cpu())
        ids = cached.ids.to(labels.device) if cached.ids is not None else None
        tail = cached.tail_logprob
        tail = tail.to(labels.device) if tail is not None else None
        return CachedTeacher(ids, cached.logprobs.to(labels.device), tail)


def cached_teacher_ce(
    cached: CachedTeacher, labels: Tensor, ignore_index: int, temperature: float
) -> Tensor | None:
    """The teacher's summed cross-entropy on ``labels`` at temperature 1 from an exact cache
    written at ``temperature`` (fp32, 0-dim), or None for a top-k cache, which does not know
    the probability of every label."""
    if cached.ids is not None:
        return None
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).unsqueeze(-1)
    # The cache holds log softmax(z / T); the CE is at temperature 1: log softmax(T · that).
    log_probs = torch.log_softmax(cached.logprobs.float() * temperature, dim=-1)
    picked = log_probs.gather(-1, target).squeeze(-1)
    return -torch.where(valid, picked, 0.0).sum(dtype=torch.float32)
