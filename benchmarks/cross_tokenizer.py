"""Cross-tokenizer losses vs KDLoss: time and peak memory of one forward+backward.

N = 4096 student rows over a 32,000-token vocabulary; the teacher's logits are over 49,152
tokens (SmolLM2's vocabulary size; ``--teacher-vocab 128256`` for Llama 3's). KDLoss, which needs
one vocabulary, runs on a 32,000-token teacher of the same N: the cost the cross-tokenizer losses
are compared with. Spans: one student row to one teacher row (N spans), or with ``--multi``
a mix where a third of the spans hold 2 student rows and a third 2 teacher rows. The hybrid's
vocabulary map shares 60% of the student's tokens and about half the spans are exact.

* memory: growth of the process's peak RSS during forward+backward, in units of one [N, 32000]
  fp32 matrix (the student gradient alone is 1.0), each variant in a fresh process, the peak
  reset through ``/proc/self/clear_refs`` after the inputs exist.
* time: forward+backward seconds, best of ``--repeats`` after one warm-up, in one process.

Usage: python benchmarks/cross_tokenizer.py [--n 4096] [--teacher-vocab 49152] [--multi] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from lightning_kd import KDLoss
from lightning_kd.losses import HybridKDLoss, TokenSpans, ULDLoss, VocabMap

STUDENT_VOCAB = 32_000
CHUNK = 512
VARIANTS = ["kd_loss", "uld", "hybrid"]


def inputs(n: int, teacher_vocab: int, multi: bool, variant: str):
    gen = torch.Generator().manual_seed(0)
    if multi:
        lens = torch.tensor([(1, 1), (2, 1), (1, 2)] * (n // 3 + 1))[: (2 * n) // 3]
    else:
        lens = torch.ones(n, 2, dtype=torch.int64)
    s_len, t_len = lens[:, 0], lens[:, 1]
    s_start = torch.cumsum(s_len, 0) - s_len
    t_start = torch.cumsum(t_len, 0) - t_len
    n_s, n_t = int(s_len.sum()), int(t_len.sum())
    vocab_t = STUDENT_VOCAB if variant == "kd_loss" else teacher_vocab
    student = torch.randn(n_s, STUDENT_VOCAB, generator=gen).requires_grad_()
    teacher = torch.randn(n_s if variant == "kd_loss" else n_t, vocab_t, generator=gen)
    s_labels = torch.randint(0, STUDENT_VOCAB, (n_s,), generator=gen)
    t_labels = torch.randint(0, vocab_t, (teacher.shape[0],), generator=gen)
    shared = int(0.6 * STUDENT_VOCAB)
    vmap = VocabMap(torch.arange(shared), torch.randperm(vocab_t, generator=gen)[:shared],
                    STUDENT_VOCAB, vocab_t)  # fmt: skip
    if variant == "hybrid":  # every other single-row span predicts a shared token
        single = ((s_len == 1) & (t_len == 1)).nonzero().squeeze(1)[::2]
        tok = torch.randint(0, shared, (single.numel(),), generator=gen)
        s_labels[s_start[single]] = tok
        t_labels[t_start[single]] = vmap.teacher_ids[tok]
    spans = TokenSpans(s_start, s_len, t_start, t_len)
    return student, teacher, s_labels, t_labels, spans, vmap


def run(variant, student, teacher, s_labels, t_labels, spans, vmap, chunk):
    if variant == "kd_loss":
        loss = KDLoss(chunk_size=chunk)(student, teacher, s_labels)
    elif variant == "uld":
        loss = ULDLoss(chunk_size=chunk)(student, teacher, s_labels, t_labels, spans)
    else:
        loss = HybridKDLoss(vmap, chunk_size=chunk)(student, teacher, s_labels, t_labels, spans)
    loss.backward()
    return loss


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child_memory(args) -> None:
    data = inputs(args.n, args.teacher_vocab, args.multi, args.variant)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    before = _status_kib("VmRSS")
    run(args.variant, *data, args.chunk)
    peak = _status_kib("VmHWM")
    print(json.dumps({"growth": (peak - before) * 1024 / (args.n * STUDENT_VOCAB * 4)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--teacher-vocab", type=int, default=49_152)
    parser.add_argument("--multi", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=CHUNK)
    parser.add_argument("--quick", action="store_true", help="N=512, one repeat")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats = 512, 1
    if args.variant:  # the memory child
        child_memory(args)
        return 0
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--n", str(args.n),
               "--teacher-vocab", str(args.teacher_vocab), "--chunk", str(args.chunk)]  # fmt: skip
        if args.multi:
            cmd.append("--multi")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        growth = json.loads(out.strip().splitlines()[-1])["growth"]
        data = inputs(args.n, args.teacher_vocab, args.multi, variant)
        best = float("inf")
        for i in range(args.repeats + 1):
            data[0].grad = None
            start = time.perf_counter()
            run(variant, *data, args.chunk)
            if i:  # the first run is a warm-up
                best = min(best, time.perf_counter() - start)
        rows[variant] = {"seconds": best, "memory": growth}
        del data
    kd = rows["kd_loss"]["seconds"]
    kind = "multi-row" if args.multi else "one-to-one"
    print(f"N={args.n}, student vocab {STUDENT_VOCAB}, teacher vocab {args.teacher_vocab} "
          f"(KDLoss: {STUDENT_VOCAB}), chunk_size={args.chunk}, {kind} spans, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'loss':<10} {'fwd+bwd s':>10} {'vs KDLoss':>10} {'peak (N×V fp32)':>16}")
    for variant, row in rows.items():
        print(f"{variant:<10} {row['seconds']:>10.2f} {row['seconds'] / kd:>9.1f}x "
              f"{row['memory']:>16.2f}")  # fmt: skip
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
