"""Offline teacher: the teacher's (top-k) distribution over a data set, written once and read
by any number of distillation runs without the teacher in memory.

- :func:`write_teacher_cache` (``lightning-kd cache-teacher``) runs the config's teacher under
  its strategy and writes checksummed shards (:mod:`.format`, :mod:`.codec`).
- :class:`TeacherCache` validates a cache and reads batches of it as :class:`CachedTeacher`.
- :func:`data_fingerprint` ties a cache to the data it was made from.
"""

from lightning_kd.teacher_cache.codec import EXACT_CODEC, TOPK_CODEC
from lightning_kd.teacher_cache.fingerprint import data_fingerprint
from lightning_kd.teacher_cache.format import FORMAT_VERSION, CacheMetadata
from lightning_kd.teacher_cache.reader import CachedTeacher, TeacherCache
from lightning_kd.teacher_cache.topk import exact_logprobs, topk_logprobs
from lightning_kd.teacher_cache.writer import (
    describe_teacher,
    describe_tokenizer,
    write_teacher_cache,
)

__all__ = [
    "EXACT_CODEC",
    "FORMAT_VERSION",
    "TOPK_CODEC",
    "CacheMetadata",
    "CachedTeacher",
    "TeacherCache",
    "data_fingerprint",
    "describe_teacher",
    "describe_tokenizer",
    "exact_logprobs",
    "topk_logprobs",
    "write_teacher_cache",
]
