"""Peak resident memory of one training workload in a fresh process (CPU), as JSON on stdout.

``--mode student``: forward + backward of a TinyLlama student alone (cross-entropy on random
tokens), optionally with activation checkpointing. ``--mode fit``: a short
``DistillationModule`` fit with a Lightning Trainer. Both report ``baseline`` (resident bytes
after imports, before any model exists), ``peak`` (``ru_maxrss`` at the end) and, for ``fit``,
the module's :func:`~lightning_kd.training.memory_estimate.estimate_memory` total.
"""

from __future__ import annotations

import argparse
import json
import resource

import psutil
import torch
import torch.nn.functional as F


def _peak() -> int:
    """This process's peak resident bytes. ``VmHWM`` is per address space; ``ru_maxrss``
    also counts the parent's resident size at the fork before exec (a large pytest process,
    e.g. one that loaded a real model, would inflate it), so it is only the fallback."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("student", "fit"), default="student")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--teacher-dim", type=int, default=384)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_kd import DistillationModule, KDLoss, TinyLlama
    from lightning_kd.parallel.pipeline import parallelize_model
    from lightning_kd.training.memory_estimate import estimate_memory, model_size

    def llama(dim: int, layers: int) -> TinyLlama:
        return TinyLlama(vocab_size=args.vocab, dim=dim, n_layers=layers, n_heads=4,
                         n_kv_heads=2, hidden_dim=(8 * dim) // 3, max_seq_len=args.seq)  # fmt: skip

    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq + 1))
    baseline = psutil.Process().memory_info().rss
    result = {"baseline": baseline}
    if args.mode == "student":
        student = llama(args.dim, args.layers)
        parallelize_model(student, activation_checkpointing=args.ac)  # one process: AC only
        for _ in range(args.steps):
            logits = student(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            del logits
    else:
        student = llama(args.dim, args.layers)
        teacher = llama(args.teacher_dim, args.teacher_layers)
        module = DistillationModule(
            student, teacher, loss=KDLoss(chunk_size=args.chunk_size),
            activation_checkpointing=args.ac,
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
        )  # fmt: skip
        data = [{"input_ids": ids[i, :-1], "labels": ids[i, 1:]} for i in range(len(ids))]
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        trainer.fit(module, DataLoader(data, batch_size=args.batch_size))
        estimate = estimate_memory(
            model_size(student), model_size(teacher), batch_size=args.batch_size,
            seq_len=args.seq, vocab_size=args.vocab, chunk_size=args.chunk_size,
            activation_checkpointing=args.ac,
        )  # fmt: skip
        result["estimate"] = estimate.total
        result["parts"] = {k: v for k, v in vars(estimate).items()}
    result["peak"] = _peak()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
