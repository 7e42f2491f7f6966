"""The data side of lightning_kd: a byte tokenizer, text sources (files or a generated story
corpus) and ``TextDataModule``, which turns them into resumable, data-parallel next-token
batches for :class:`~lightning_kd.DistillationModule`."""

from lightning_kd.data.corpus import generate_corpus, read_documents
from lightning_kd.data.datamodule import TextDataModule
from lightning_kd.data.sampler import ResumableDataLoader, ResumableSampler
from lightning_kd.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "ResumableDataLoader",
    "ResumableSampler",
    "TextDataModule",
    "generate_corpus",
    "read_documents",
]
