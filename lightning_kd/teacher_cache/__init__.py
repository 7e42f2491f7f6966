"""Offline teacher: the teacher's (top-k) distribution over a data set, written once and read
by any number of distillation runs without the teacher in memory.

- :func:`write_teacher_cache` (``lightning-kd cache-teacher``) runs the config's teacher under
  its strategy and writes checksummed shards (:mod:`.format`, :mod:`.codec`).
- :class:`TeacherCache` validates a cache and reads batches of it as :class:`CachedTeacher`.
- :func:`data_fingerprint` ties a cache to the data it was made from.
"""

from lightning_kd.teacher_cache.codec import EXACT_CODEC as EXACT_CODEC
from lightning_kd.teacher_cache.codec import TOPK_CODEC as TOPK_CODEC
from lightning_kd.teacher_cache.fingerprint import data_fingerprint
from lightning_kd.teacher_cache.format import FORMAT_VERSION as FORMAT_VERSION
from lightning_kd.teacher_cache.format import CacheMetadata
from lightning_kd.teacher_cache.reader import CachedTeacher, TeacherCache
from lightning_kd.teacher_cache.topk import exact_logprobs as exact_logprobs
from lightning_kd.teacher_cache.topk import topk_logprobs as topk_logprobs
from lightning_kd.teacher_cache.topk import topk_with_tail as topk_with_tail
from lightning_kd.teacher_cache.writer import describe_teacher as describe_teacher
from lightning_kd.teacher_cache.writer import describe_tokenizer as describe_tokenizer
from lightning_kd.teacher_cache.writer import write_teacher_cache

# The public names (README "Public API"); the others stay importable for the CLI and tests.
__all__ = [
    "CacheMetadata",
    "CachedTeacher",
    "TeacherCache",
    "data_fingerprint",
    "write_teacher_cache",
]
