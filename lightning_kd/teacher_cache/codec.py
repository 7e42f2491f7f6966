"""Compression of one sequence's teacher distributions: the bytes of one shard record.

Two codecs; a cache uses one (``CacheMetadata.codec``).

``"f32"`` (``top_k = 0``, exact): the record is the ``[n, V]`` float32 log-probabilities of
the sequence's ``n`` valid tokens, little-endian, row after row. Nothing is lost.

``"q8rice"`` (``top_k = k > 0``): per token, the ``k`` ids are sorted ascending and stored as
Rice-coded gaps, the ``k`` log-probabilities as 8-bit codes in the same (id) order, and the
log of the top-k mass exactly, and (format version 2) the log of the tail's mass exactly. All
numbers little-endian; a record is::

    flag       1 byte           bit 0: the body is zlib-compressed; bit 1: the body holds
                                log_tail (format version 2 writes it, version 1 did not)
    body:
      log_mass   n × float32    logsumexp of the token's k log-probabilities
      log_tail   n × float32    (bit 1) log of the teacher's mass outside the top-k, from its
                                logits (a log-sum-exp: exact for tails far below 1e-7)
      step       n × float16    quantisation step of the token's log-probabilities
      rice_b     n × uint8      Rice parameter b of the token's id gaps (0..17)
      codes      n × k uint8    u = round((v − v_min) / step), v clamped to ≥ v_max − 30
      remainders bit-packed, MSB first: per token, its k gaps' low b bits (b bits each);
                 zero-padded to a whole byte
      unary      bit-packed, MSB first: per entry, (gap >> b) one-bits then a zero-bit;
                 padded with one-bits to a whole byte

The gaps of the sorted ids ``i_0 < i_1 < … < i_{k−1}`` are ``g_0 = i_0`` and
``g_j = i_j − i_{j−1} − 1`` (non-negative). Each token's ``b`` minimises its coded size. The
unary stream is kept apart from the remainders so that decoding is vectorised (the zero-bits
delimit the entries). zlib is used when it makes the body smaller.

Decoding gives ``v = u · step`` shifted by a per-token constant so that
``logsumexp(v) = log_mass``: the value of ``v_min`` is not needed, and the implied tail mass
``1 − Σ exp(v)`` equals the teacher's to float32 (about 1e-7 absolute), whatever the rounding
of the codes; ``log_tail`` keeps smaller tails, which reverse KL and the other divergences of
the buckets need (``log(1 − Σ P_i)`` is ``−inf`` or noise below 1e-7).
The quantisation moves each log-probability by at most ``step / 2`` before that shift
(``step = range / 255``; a range of 8 nats gives ±0.016). Log-probabilities more than 30
nats below the token's largest (``exp(−30) ≈ 1e−13`` each, e.g. ``−inf`` from a masked
vocabulary) are stored as 30 nats below it.

Size: 8 bits per value plus about ``log2(V / k) + 1.5`` bits per id, plus 7 bytes per token;
for ``V = 151,936, k = 64`` about 2.6 bytes per (id, value) entry (see
``benchmarks/teacher_cache.py``).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

#: The exact codec (top_k = 0) and the compressed top-k codec.
EXACT_CODEC, TOPK_CODEC = "f32", "q8rice"
#: How far below a token's largest log-probability values are clamped (nats).
CLAMP_RANGE = 30.0
_LEVELS = 255
_ZLIB_FLAG, _TAIL_FLAG = 1, 2
_MAX_B = 18  # ids < 2**18 = 262,144 need at most 18 remainder bits; larger vocabularies widen


def encode_exact(logprobs: Tensor) -> bytes:
    """The ``"f32"`` record of ``logprobs`` [n, V] (any float dtype; stored as float32)."""
    return logprobs.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


def decode_exact(record: bytes, n: int, vocab_size: int) -> Tensor:
    """[n, V] float32 log-probabilities from an ``"f32"`` record.

    Raises:
        ValueError: when the record does not hold ``n × V`` floats.
    """
    if len(record) != 4 * n * vocab_size:
        raise ValueError(f"record of {len(record)} bytes, expected {4 * n * vocab_size}.")
    return torch.from_numpy(np.frombuffer(record, dtype="<f4").astype(np.float32)).view(
        n, vocab_size
    )


def _max_b(vocab_size: int) -> int:
    return max(_MAX_B, int(vocab_size).bit_length())


def _pack_fixed(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Bit-pack ``values[i]`` in ``widths[i]`` bits each (MSB first), zero-padded."""
    total = int(widths.sum())
    bits = np.zeros(total, dtype=np.uint8)
    starts = np.cumsum(widths) - widths
    for j in range(int(widths.max(initial=0))):
        has = widths > j
        shift = (widths[has] - 1 - j).astype(np.int64)
        bits[starts[has] + j] = (values[has] >> shift) & 1
    return np.packbits(bits).tobytes()


def _unpack_fixed(data: np.ndarray, widths: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(data)
    starts = np.cumsum(widths) - widths
    out = np.zeros(len(widths), dtype=np.int64)
    for j in range(int(widths.max(initial=0))):
        has = widths > j
        out[has] = (out[has] << 1) | bits[starts[has] + j]
    return out


def encode_topk(
    ids: Tensor, logprobs: Tensor, vocab_size: int, tail_logprob: Tensor | None = None
) -> bytes:
    """The ``"q8rice"`` record of one sequence's top-k entries.

    Args:
        ids: [n, k] integer token ids, distinct within a row, in [0, V).
        logprobs: [n, k] float log-probabilities of those ids (any order, same as ``ids``).
        vocab_size: V.
        tail_logprob: [n] float log of each token's mass outside the top-k (stored as
            float32), or None for a record without it (format version 1).

    Returns:
        The record's bytes (see the module docstring).
    """
    ids_np = ids.detach().cpu().numpy().astype(np.int64)
    lp = logprobs.detach().cpu().to(torch.float64).numpy()
    n, k = ids_np.shape
    order = np.argsort(ids_np, axis=1, kind="stable")
    ids_np = np.take_along_axis(ids_np, order, 1)
    lp = np.take_along_axis(lp, order, 1)
    # Exact log of the top-k mass (float64 logsumexp, -inf entries contribute nothing).
    top = lp.max(axis=1, keepdims=True) if k else np.zeros((n, 1))
    safe_top = np.where(np.isfinite(top), top, 0.0)
    log_mass = (np.log(np.exp(lp - safe_top).sum(axis=1)) + safe_top[:, 0]).astype(np.float32)
    clamped = np.maximum(lp, safe_top - CLAMP_RANGE)
    low = clamped.min(axis=1, keepdims=True)
    step = ((safe_top - low) / _LEVELS).astype(np.float16)
    step = np.where(np.isfinite(step), step, np.float16(0))
    step64 = step.astype(np.float64)
    codes = np.where(step64 > 0, np.rint((clamped - low) / np.where(step64 > 0, step64, 1)), 0)
    codes = np.clip(codes, 0, _LEVELS).astype(np.uint8)
    # Id gaps and the best Rice parameter per token.
    gaps = np.diff(ids_np, axis=1, prepend=-1) - 1
    candidates = np.arange(_max_b(vocab_size) + 1)
    cost = k * candidates[None, :] + (gaps[:, :, None] >> candidates).sum(axis=1)
    rice_b = cost.argmin(axis=1).astype(np.uint8)
    widths = np.repeat(rice_b.astype(np.int64), k)
    flat = gaps.reshape(-1)
    remainders = _pack_fixed(flat & ((1 << widths) - 1), widths)
    quotients = flat >> widths
    unary_bits = np.ones(int(quotients.sum()) + flat.size, dtype=np.uint8)
    unary_bits[np.cumsum(quotients + 1) - 1] = 0
    pad = (-unary_bits.size) % 8
    unary = np.packbits(np.concatenate([unary_bits, np.ones(pad, np.uint8)])).tobytes()
    tail = b""
    if tail_logprob is not None:
        tail = tail_logprob.detach().cpu().to(torch.float32).numpy().astype("<f4").tobytes()
    body = b"".join((log_mass.astype("<f4").tobytes(), tail, step.astype("<f2").tobytes(),
                     rice_b.tobytes(), codes.tobytes(), remainders, unary))  # fmt: skip
    packed = zlib.compress(body, 6)
    flag = _TAIL_FLAG if tail else 0
    if len(packed) < len(body):
        return bytes([flag | _ZLIB_FLAG]) + packed
    return bytes([flag]) + body


def decode_topk(record: bytes, n: int, k: int) -> tuple[Tensor, Tensor]:
    """``(ids [n, k] int64, logprobs [n, k] float32)`` from a ``"q8rice"`` record, ids sorted
    ascending within each row (:func:`decode_topk_with_tail` also returns the tail).

    Raises:
        ValueError: when the record is malformed (a wrong flag, too short, or not ``n × k``
            entries).
    """
    ids, logprobs, _ = decode_topk_with_tail(record, n, k)
    return ids, logprobs


def decode_topk_with_tail(record: bytes, n: int, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`decode_topk` and the stored ``log_tail`` [n] float32 (None in a record without
    it).

    Raises:
        ValueError: when the record is malformed.
    """
    if not record or record[0] & ~(_ZLIB_FLAG | _TAIL_FLAG):
        raise ValueError("record has an unknown flag byte.")
    try:
        body = zlib.decompress(record[1:]) if record[0] & _ZLIB_FLAG else record[1:]
    except zlib.error as error:
        raise ValueError(f"record does not decompress ({error}).") from None
    tail = None
    if record[0] & _TAIL_FLAG:
        if len(body) < 8 * n:
            raise ValueError(f"record body of {len(body)} bytes, expected at least {8 * n}.")
        tail_bytes = body[4 * n : 8 * n]
        tail = torch.from_numpy(np.frombuffer(tail_bytes, dtype="<f4").astype(np.float32))
        body = body[: 4 * n] + body[8 * n :]
    buf = np.frombuffer(body, dtype=np.uint8)
    head = 4 * n + 2 * n + n + n * k
    if len(buf) < head:
        raise ValueError(f"record body of {len(buf)} bytes, expected at least {head}.")
    log_mass = np.frombuffer(body, dtype="<f4", count=n, offset=0).astype(np.float64)
    step = np.frombuffer(body, dtype="<f2", count=n, offset=4 * n).astype(np.float64)
    rice_b = buf[6 * n : 7 * n].astype(np.int64)
    codes = buf[7 * n : head].reshape(n, k).astype(np.float64)
    widths = np.repeat(rice_b, k)
    rem_bytes = (int(widths.sum()) + 7) // 8
    if len(buf) < head + rem_bytes:
        raise ValueError("record is too short for its id remainders.")
    remainders = _unpack_fixed(buf[head : head + rem_bytes], widths)
    zeros = np.flatnonzero(np.unpackbits(buf[head + rem_bytes :]) == 0)
    if len(zeros) != n * k:
        raise ValueError(f"record holds {len(zeros)} ids, expected {n * k}.")
    quotients = np.diff(zeros, prepend=-1) - 1
    gaps = ((quotients << widths) | remainders).reshape(n, k)
    ids = np.cumsum(gaps + 1, axis=1) - 1
    values = codes * step[:, None]
    top = values.max(axis=1, keepdims=True) if k else np.zeros((n, 1))
    lse = np.log(np.exp(values - top).sum(axis=1, keepdims=True)) + top
    logprobs = values - lse + log_mass[:, None]
    return torch.from_numpy(ids), torch.from_numpy(logprobs.astype(np.float32)), tail
