"""Cross-tokenizer distillation vs labels only, measured on a small run (CPU, a few minutes).

1. A byte-level teacher (the demo teacher's TinyLlama, 258 tokens) is trained on the generated
   story corpus for ``--teacher-steps`` steps.
2. A BPE with ``--bpe-vocab`` tokens is trained on the same corpus: the student's tokenizer.
3. The same student (TinyLlama over the BPE) is trained for ``--steps`` steps through
   ``DistillationModule`` and ``CrossTokenizerDataModule``, from the same initial weights and
   batches, with each objective: labels only (``kd_ratio=0``), ``ULDLoss`` and ``HybridKDLoss``
   (``kd_ratio=0.5``: half the cross-tokenizer loss, half the label cross-entropy).
4. On the held-out documents: the student's cross-entropy per BPE token (and its perplexity),
   and its divergence to the teacher on the aligned spans: the mean ULD over all spans and the
   mean KL(teacher ‖ student) over the exact spans (one token on both sides, same string; both
   distributions over the shared tokens).

Usage: python benchmarks/cross_tokenizer_demo.py [--steps 200] [--teacher-steps 400]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from lightning_kd import DistillationModule, TinyLlama
from lightning_kd.data import ByteTokenizer, CrossTokenizerDataModule, generate_corpus
from lightning_kd.data.alignment import shared_token_ids, token_strings
from lightning_kd.losses import HybridKDLoss, KDLoss, ULDLoss, VocabMap
from lightning_kd.training.teachers.cross_tokenizer import spans_of_batch


def train_bpe(corpus: list[str], vocab_size: int, directory: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(str(directory))
    return str(directory)


def train_teacher(corpus: list[str], steps: int, seq_len: int = 128, batch: int = 16):
    torch.manual_seed(0)
    teacher = TinyLlama(vocab_size=258, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                        hidden_dim=344, max_seq_len=256)  # fmt: skip
    stream = torch.tensor([b for doc in corpus for b in [*doc.encode("utf-8"), 256]])
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, 3e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        rows = torch.stack([stream[s : s + seq_len + 1] for s in starts])
        logits = teacher(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 258), rows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    teacher.eval()
    return teacher, float(loss)


def student_model(vocab: int) -> TinyLlama:
    torch.manual_seed(1)
    return TinyLlama(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     hidden_dim=172, max_seq_len=128)  # fmt: skip


@torch.no_grad()
def evaluate(student, teacher, datamodule, vmap) -> dict[str, float]:
    student.eval()
    ce_sum, tokens, uld_sum, spans_n, kl_sum, exact_n = 0.0, 0, 0.0, 0, 0.0, 0
    uld = ULDLoss(chunk_size=512)
    hybrid = HybridKDLoss(vmap, "forward_kl", chunk_size=512)
    for batch in datamodule.val_dataloader():
        s_logits = student(batch["input_ids"])
        t_logits = teacher(batch["teacher_input_ids"])
        labels = batch["labels"]
        valid = labels != -100
        ce = torch.nn.functional.cross_entropy(s_logits[valid], labels[valid], reduction="sum")
        ce_sum, tokens = ce_sum + float(ce), tokens + int(valid.sum())
        t_labels = batch["teacher_labels"]
        spans = spans_of_batch(batch["xtok_spans"], labels.shape[1], t_labels.shape[1])
        args = (s_logits, t_logits, labels.clamp_min(0), t_labels.clamp_min(0), spans)
        u = uld(*args, return_per_span=True)
        h = hybrid(*args, return_per_span=True)
        uld_sum, spans_n = uld_sum + float(u.per_span.sum()), spans_n + spans.num_spans
        kl_sum, exact_n = kl_sum + float(h.per_span[h.exact].sum()), exact_n + int(h.exact.sum())
    return {
        "ce": ce_sum / tokens,
        "ppl": math.exp(ce_sum / tokens),
        "uld_per_span": uld_sum / spans_n,
        "kl_exact_spans": kl_sum / max(exact_n, 1),
        "exact_share": exact_n / max(spans_n, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--bpe-vocab", type=int, default=512)
    parser.add_argument("--chars", type=int, default=200_000)
    args = parser.parse_args()
    import lightning as L

    start = time.perf_counter()
    corpus = generate_corpus(args.chars, seed=0)
    teacher, teacher_loss = train_teacher(corpus, args.teacher_steps)
    print(f"teacher trained: final train CE {teacher_loss:.3f} nats/byte "
          f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        bpe_dir = train_bpe(corpus, args.bpe_vocab, Path(tmp) / "bpe")
        dm = CrossTokenizerDataModule(
            tokenizer=bpe_dir, teacher_tokenizer="byte", seq_len=64, teacher_seq_len=200,
            batch_size=16, val_fraction=0.1, synthetic_chars=args.chars,
            cache_dir=str(Path(tmp) / "cache"),
        )  # fmt: skip
        dm.setup("fit")
        bpe = dm.tokenizer.hf_tokenizer
        s_ids, t_ids = shared_token_ids(token_strings(bpe), token_strings(ByteTokenizer()))
        vmap = VocabMap(s_ids, t_ids, dm.vocab_size, dm.teacher_vocab_size)
        runs = {
            "labels only": KDLoss(kd_ratio=0.0),
            "ULDLoss (kd_ratio 0.5)": ULDLoss(kd_ratio=0.5, chunk_size=512),
            "HybridKDLoss (kd_ratio 0.5)": HybridKDLoss(vmap, kd_ratio=0.5, chunk_size=512),
        }
        results = {}
        for name, loss in runs.items():
            t0 = time.perf_counter()
            student = student_model(dm.vocab_size)
            # Labels only: a same-vocabulary stand-in teacher (KDLoss needs one; unused at 0).
            teacher_arg = student_model(dm.vocab_size) if isinstance(loss, KDLoss) else teacher
            module = DistillationModule(
                student, teacher_arg, loss=loss,
                optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01),
            )  # fmt: skip
            L.seed_everything(0, verbose=False)
            trainer = L.Trainer(
                accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0,
            )  # fmt: skip
            trainer.fit(module, datamodule=dm)
            results[name] = evaluate(module.student, teacher, dm, vmap)
            results[name]["seconds"] = time.perf_counter() - t0
            print(name, json.dumps(results[name]), flush=True)
    print(f"\n{args.steps} student steps, batch 16 x 64 BPE tokens, BPE vocab {args.bpe_vocab}; "
          f"teacher: byte-level, {args.teacher_steps} steps; held-out documents")  # fmt: skip
    print("| objective | held-out CE (nats/token) | perplexity | ULD per span | "
          "KL on exact spans | train s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['ce']:.3f} | {r['ppl']:.2f} | {r['uld_per_span']:.4f} | "
              f"{r['kl_exact_spans']:.3f} | {r['seconds']:.0f} |")  # fmt: skip
    share = next(iter(results.values()))["exact_share"]
    total = time.perf_counter() - start
    print(f"exact spans: {share:.0%} of the aligned spans; total {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
