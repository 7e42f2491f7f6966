"""The data side of lightning_kd: a byte tokenizer, text sources (files or a generated story
corpus) and ``TextDataModule``, which turns them into resumable, data-parallel next-token
batches for :class:`~lightning_kd.DistillationModule`; and for chat/instruction data
``ChatDataModule``: chat templates, completion-only labels and packed rows with position ids;
``CrossTokenizerDataModule``: each document in the student's and the teacher's tokens with the
spans where they agree (cross-tokenizer distillation).
Both build on ``SplitDataModule`` (shared options, split and loaders)."""

from lightning_kd.data.chat_datamodule import ChatDataModule
from lightning_kd.data.chat_records import read_chat_records
from lightning_kd.data.chat_template import BYTE_CHAT_TEMPLATE, ChatEncoder
from lightning_kd.data.corpus import generate_corpus, read_documents
from lightning_kd.data.cross_tokenizer_datamodule import CrossTokenizerDataModule
from lightning_kd.data.instructions import generate_instructions
from lightning_kd.data.sampler import ResumableDataLoader, ResumableSampler
from lightning_kd.data.split_datamodule import SplitDataModule
from lightning_kd.data.text_datamodule import TextDataModule
from lightning_kd.data.tokenizer import ByteTokenizer

__all__ = [
    "BYTE_CHAT_TEMPLATE",
    "ByteTokenizer",
    "ChatDataModule",
    "ChatEncoder",
    "CrossTokenizerDataModule",
    "ResumableDataLoader",
    "ResumableSampler",
    "SplitDataModule",
    "TextDataModule",
    "generate_corpus",
    "generate_instructions",
    "read_chat_records",
    "read_documents",
]
