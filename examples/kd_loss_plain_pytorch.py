"""KDLoss in a plain PyTorch training loop: no Lightning anywhere.

A frozen teacher (here a randomly initialised TinyLlama with peaked output distributions, so
the example needs no data or checkpoint) is distilled into a smaller student on random token
sequences. It shows the three things a loop needs: the teacher under no_grad, shifted logits
and labels, and num_batch_labels for gradient accumulation.

    python examples/kd_loss_plain_pytorch.py
"""

from __future__ import annotations

import torch

from lightning_kd import KDLoss, TinyLlama

VOCAB, SEQ, BATCH, ACCUMULATE, STEPS = 128, 32, 8, 2, 60


def main() -> None:
    torch.manual_seed(0)
    teacher = TinyLlama(vocab_size=VOCAB, dim=64, n_layers=2, init_std=0.2).eval()
    teacher.requires_grad_(False)
    student = TinyLlama(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
    loss_fn = KDLoss(temperature=1.0, chunk_size=128)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)

    for step in range(STEPS):
        micro_batches = []
        for _ in range(ACCUMULATE):
            tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
            labels = tokens[:, 1:].clone()
            labels[:, :4] = -100  # e.g. prompt tokens are not distilled
            micro_batches.append((tokens[:, :-1], labels))
        # Normalise by the valid tokens of the whole accumulation window, so the accumulated
        # gradient is exactly the gradient of the per-token mean over all micro-batches.
        window_tokens = sum(int((labels != -100).sum()) for _, labels in micro_batches)
        total = 0.0
        for input_ids, labels in micro_batches:
            with torch.no_grad():
                teacher_logits = teacher(input_ids)
            loss = loss_fn(student(input_ids), teacher_logits, labels, window_tokens)
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == STEPS - 1:
            print(f"step {step:3d}  KL(teacher || student) per token = {total:.4f}")


if __name__ == "__main__":
    main()
