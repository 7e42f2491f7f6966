"""Teacher-cache codec benchmark (issue 15): bytes per stored (id, value) entry and the KL
error the compression adds, at a real-size vocabulary (V = 151,936, Qwen2's) and k = 64.

Logits, one row per token, in chunks of 128 tokens (nothing ``[N, V]`` is held):

* ``synthetic`` (default): Zipf-shaped distributions, ``logit = −a·log(rank) + noise`` over a
  random permutation of the vocabulary, ``a`` drawn per token in [2, 4] (entropies of a few
  nats, as trained LMs have).
* ``qwen2``: a tiny random Qwen2 model (transformers, hidden 64, 2 layers, V = 151,936,
  ``initializer_range`` 0.5 so its distributions are not flat) over random token ids.

Reported per token: bytes of the q8rice record (:mod:`lightning_kd.teacher_cache.codec`,
the 1-byte flag included), bytes per entry (= bytes per token / k), and the KL error
``KL(P || Q)`` between the fp32 top-k distribution with its tail bucket (P: the k
probabilities and ``1 − Σ``) and the decoded one (Q), mean and max over tokens, in nats.
Goal: ≤ 4.0 bytes per entry (DistillKit ~2.3).

Usage: python benchmarks/teacher_cache.py [--source synthetic|qwen2] [--tokens 2048] [--k 64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lightning_kd.teacher_cache.codec import decode_topk, encode_topk
from lightning_kd.teacher_cache.topk import topk_logprobs

VOCAB = 151_936
CHUNK = 128


def synthetic_chunks(tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    log_rank = torch.arange(1, VOCAB + 1, dtype=torch.float32).log()
    for _ in range(0, tokens, CHUNK):
        rows = []
        for _ in range(CHUNK):
            a = 2.0 + 2.0 * torch.rand((), generator=gen)
            row = (-a * log_rank)[torch.randperm(VOCAB, generator=gen)]
            rows.append(row + 0.5 * torch.randn(VOCAB, generator=gen))
        yield torch.stack(rows)


def qwen2_chunks(tokens: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=0.5, tie_word_embeddings=False)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    for _ in range(0, tokens, CHUNK):
        ids = torch.randint(0, VOCAB, (1, CHUNK))
        with torch.no_grad():
            yield model(ids).logits[0].float()


def bucket_kl(ref: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    """[n] KL(P || Q) over the k entries plus the tail bucket (float64)."""
    p, q = ref.double().exp(), dec.double().exp()
    p_tail = (1 - p.sum(-1)).clamp_min(1e-30)
    q_tail = (1 - q.sum(-1)).clamp_min(1e-30)
    kl = (p * (ref.double() - dec.double())).sum(-1)
    return kl + p_tail * (p_tail.log() - q_tail.log())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=("synthetic", "qwen2"), default="synthetic")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    chunks = synthetic_chunks if args.source == "synthetic" else qwen2_chunks
    size = count = 0
    kls, tails, encode_s, decode_s = [], [], 0.0, 0.0
    for logits in chunks(args.tokens):
        ids, lp = topk_logprobs(logits, args.k, 1.0)
        start = time.perf_counter()
        record = encode_topk(ids, lp, VOCAB)
        encode_s += time.perf_counter() - start
        start = time.perf_counter()
        dec_ids, dec_lp = decode_topk(record, len(ids), args.k)
        decode_s += time.perf_counter() - start
        order = ids.argsort(-1)
        assert torch.equal(dec_ids, ids.gather(-1, order)), "ids must round-trip exactly"
        kls.append(bucket_kl(lp.gather(-1, order), dec_lp))
        tails.append(1 - lp.double().exp().sum(-1))
        size += len(record)
        count += len(ids)
    kl, tail = torch.cat(kls), torch.cat(tails)
    result = {
        "source": args.source, "vocab": VOCAB, "k": args.k, "tokens": count,
        "bytes_per_token": round(size / count, 2),
        "bytes_per_entry": round(size / count / args.k, 3),
        "uncompressed_fp32_bytes_per_entry": 8,
        "kl_error_mean_nats": float(kl.mean()), "kl_error_max_nats": float(kl.max()),
        "teacher_tail_mass_mean": round(float(tail.mean()), 4),
        "encode_us_per_token": round(1e6 * encode_s / count, 1),
        "decode_us_per_token": round(1e6 * decode_s / count, 1),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    assert result["bytes_per_entry"] <= 4.0, "over the 4.0 bytes/entry budget"


if __name__ == "__main__":
    main()
