"""``SplitDataModule``: what :class:`~lightning_kd.data.TextDataModule` and
:class:`~lightning_kd.data.ChatDataModule` share.

The tokenizer and the options both take (checked here, once), the seeded train/val split by
document, the ``train_dataset`` / ``val_dataset`` a subclass's ``setup`` builds, and the
loaders: a :class:`~lightning_kd.data.sampler.ResumableDataLoader` for training (per-epoch
shuffle, one shard per data-parallel rank, a position Lightning checkpoints) and sequential,
data-parallel-sharded evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_kd.checks import check_int
from lightning_kd.data.sampler import ResumableDataLoader, ResumableSampler
from lightning_kd.data.text_files import expand_paths
from lightning_kd.data.tokenizer import ByteTokenizer, HFTokenizer


def check_paths(paths: object, extensions: Sequence[str]) -> list[str] | None:
    """``paths`` as a list of strings (None stays None), each matching at least one file.

    Raises:
        ValueError: for a string or another non-list, or a path or glob that matches no file
            with one of ``extensions`` (the message names it).
    """
    if paths is None:
        return None
    if isinstance(paths, str) or not isinstance(paths, (list, tuple)):
        raise ValueError(f"paths must be a list of paths or globs or None, got {paths!r}.")
    paths = [str(p) for p in paths]
    expand_paths(paths, extensions=extensions)  # fail now, naming the path
    return paths


class SplitDataModule(LightningDataModule):
    """The base of the data modules: subclasses tokenise in ``prepare_data`` and set
    ``self._train`` / ``self._val`` (datasets of dicts of int64 tensors) in ``setup``.

    Args:
        tokenizer: ``"byte"`` or a local directory with a Hugging Face tokenizer.
        seq_len: tokens per sequence, S (>= 1).
        batch_size: sequences per batch on each data-parallel rank (>= 1).
        val_fraction: the fraction of documents held out, in [0, 1).
        seed: seeds the split and the per-epoch shuffle.
        cache_dir: where the tokenised data is cached.
        num_workers: DataLoader worker processes (>= 0).
        ignore_index: the label of positions that are not targets; not a token id.

    Raises:
        ValueError: for an argument of the wrong type or range.
    """

    def __init__(
        self,
        tokenizer: str,
        seq_len: int,
        batch_size: int,
        val_fraction: float,
        seed: int,
        cache_dir: str,
        num_workers: int,
        ignore_index: int,
    ) -> None:
        super().__init__()
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"tokenizer must be 'byte' or a local directory, got {tokenizer!r}.")
        self._tokenizer = ByteTokenizer() if tokenizer == "byte" else HFTokenizer(tokenizer)
        check_int("seq_len", seq_len, 1)
        check_int("batch_size", batch_size, 1)
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not 0.0 <= val_fraction < 1.0
        ):
            raise ValueError(f"val_fraction must be a float in [0, 1), got {val_fraction!r}.")
        check_int("seed", seed)
        if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
            raise ValueError(f"cache_dir must be a non-empty path, got {cache_dir!r}.")
        check_int("num_workers", num_workers, 0)
        vocab = self._tokenizer.vocab_size
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}.")
        if 0 <= ignore_index < vocab:
            raise ValueError(
                f"ignore_index={ignore_index} is a token id; expected a value outside "
                f"[0, {vocab}), e.g. -100."
            )
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_fraction = float(val_fraction)
        self.seed, self.cache_dir = seed, str(cache_dir)
        self.num_workers, self.ignore_index = num_workers, ignore_index
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> ByteTokenizer | HFTokenizer:
        """The tokenizer of the batches (available before ``setup``)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The number of token ids (258 for the byte tokenizer), for sizing the embeddings."""
        return self._tokenizer.vocab_size

    # ------------------------------------------------------------------ split
    def _held_out(self, num_documents: int) -> Tensor:
        """[D] bool, True for the held-out documents: a seeded random subset."""
        is_val = torch.zeros(num_documents, dtype=torch.bool)
        if self.val_fraction == 0.0 or num_documents < 2:
            return is_val
        count = min(max(round(num_documents * self.val_fraction), 1), num_documents - 1)
        order = torch.randperm(num_documents, generator=torch.Generator().manual_seed(self.seed))
        is_val[order[:count]] = True
        return is_val

    @property
    def train_dataset(self) -> Dataset:
        """The training sequences (after ``setup``)."""
        if self._train is None:
            self.setup("fit")
        return self._train  # type: ignore[return-value]

    @property
    def val_dataset(self) -> Dataset:
        """The validation sequences (after ``setup``)."""
        if self._val is None:
            self.setup("fit")
        return self._val  # type: ignore[return-value]

    # ------------------------------------------------------------------ loaders
    def _data_parallel(self) -> tuple[int, int]:
        """(size, rank) of data parallelism: from the trainer's strategy in distributed runs
        (for ``ModelParallelStrategy`` the data-parallel mesh dimension), else (1, 0)."""
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None)
        if kwargs:
            return int(kwargs["num_replicas"]), int(kwargs["rank"])
        return 1, 0

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled, DP-sharded, resumable batches; the last incomplete batch of each epoch
        is dropped so every batch is [batch_size, seq_len]."""
        dataset = self.train_dataset
        size, rank = self._data_parallel()
        sampler = ResumableSampler(dataset, num_replicas=size, rank=rank, seed=self.seed)
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"the training set has {len(dataset)} sequences, {len(sampler)} per "
                f"data-parallel rank ({size} ranks): fewer than batch_size={self.batch_size}. "
                "Lower batch_size or seq_len, or add data."
            )
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Sequential batches, sharded over data-parallel ranks (each rank gets the same
        number of sequences; the < size left over are dropped); ``[]`` without validation
        data."""
        dataset = self.val_dataset
        if len(dataset) == 0:  # type: ignore[arg-type]
            return []
        size, rank = self._data_parallel()
        sampler = DistributedSampler(
            dataset, num_replicas=size, rank=rank, shuffle=False, drop_last=size > 1
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def test_dataloader(self) -> DataLoader | list:
        """The held-out split again (there is no separate test split), for ``lightning-kd
        test``."""
        return self.val_dataloader()
