"""Packed sequences under tensor parallelism (gloo, CPU): documents stay isolated at TP > 1.

``check_all(rank, world)`` runs in every rank of a ``world``-process group (TP = world). For
TinyLlama (grouped-query attention: 4 query heads, 2 key/value heads, so one local key/value
head per rank at TP=2) and tiny Hugging Face Llama and Qwen2 models, the TP plan is applied
with :func:`~lightning_kd.parallel.pipeline.parallelize_model` (``parallelize_module``) and
the packed batch's logits (``full_tensor()`` of the vocabulary-sharded DTensor) and final
hidden states are compared, within 1e-5, with the same documents run one by one, each alone
from position 0, by an unsharded copy of the model in the same process. The packed batch
(:func:`packed_batch`) holds documents of 5, 1 and 4 tokens and a padding block of 3 in one
row, and two documents in the other.

The pytest wrapper is ``tests/test_packing_models.py``; standalone:
``python -m tests.scripts.packing_tp --world 2``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lightning_kd import TinyLlama
from lightning_kd.parallel.pipeline import parallelize_model
from tests.helpers.distributed import run_workers

VOCAB = 50
PAD_ID = 0
#: Documents per row ([B, S] = [2, 13]); a row's padding block is marked by ``PADDING``.
PADDING = -1
ROWS = [[5, 1, 4, (PADDING, 3)], [7, 6]]


def packed_batch(rows: list[list[Any]] = ROWS, vocab: int = VOCAB, seed: int = 0) -> dict:
    """A packed batch and its documents.

    Each row is a list of document lengths, with ``(PADDING, n)`` for a padding block of ``n``
    ``PAD_ID`` tokens (a document of its own, positions from 0, labels ignored). Labels are
    the next token within the document (-100 on its last token and on padding).

    Returns:
        ``{"input_ids", "labels", "position_ids"}`` ([B, S] int64 each) and ``"docs"``: a list
        of ``(row, start, length, is_padding)``.
    """
    gen = torch.Generator().manual_seed(seed)
    ids_rows, label_rows, pos_rows, docs = [], [], [], []
    for r, row in enumerate(rows):
        ids, labels, pos, start = [], [], [], 0
        for item in row:
            padding = isinstance(item, tuple)
            n = item[1] if padding else item
            doc = (
                torch.full((n,), PAD_ID)
                if padding
                else torch.randint(1, vocab, (n,), generator=gen)
            )
            lab = torch.full((n,), -100)
            if not padding:
                lab[:-1] = doc[1:]
            ids.append(doc)
            labels.append(lab)
            pos.append(torch.arange(n))
            docs.append((r, start, n, padding))
            start += n
        ids_rows.append(torch.cat(ids))
        label_rows.append(torch.cat(labels))
        pos_rows.append(torch.cat(pos))
    return {
        "input_ids": torch.stack(ids_rows),
        "labels": torch.stack(label_rows),
        "position_ids": torch.stack(pos_rows),
        "docs": docs,
    }


def one_by_one(run: Callable[[Tensor], Tensor], batch: dict) -> Tensor:
    """``run(ids [1, n]) -> [1, n, ...]`` on each document alone, placed back at its spot in
    the packed [B, S, ...] layout."""
    out: Tensor | None = None
    for row, start, n, _ in batch["docs"]:
        piece = run(batch["input_ids"][row : row + 1, start : start + n])
        if out is None:
            out = piece.new_zeros(*batch["input_ids"].shape, *piece.shape[2:])
        out[row, start : start + n] = piece[0]
    assert out is not None
    return out


def tiny_llama(n_kv_heads: int = 2) -> TinyLlama:
    """A TinyLlama with 4 query heads and ``n_kv_heads`` key/value heads (seeded)."""
    torch.manual_seed(0)
    return TinyLlama(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                     hidden_dim=48, max_seq_len=16, init_std=0.3)  # fmt: skip


def hf_model(family: str, attn_implementation: str = "sdpa") -> nn.Module:
    """A tiny random HFCausalLM of ``family`` (4 heads, 2 key/value heads; seeded)."""
    from lightning_kd.models.hf import HFCausalLM

    torch.manual_seed(0)
    config = dict(model_type=family, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False,
                  initializer_range=0.2)  # fmt: skip
    return HFCausalLM(config=config, attn_implementation=attn_implementation).eval()


def _full(x: Tensor) -> Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def check_all(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    batch = packed_batch()
    ids, pos = batch["input_ids"], batch["position_ids"]
    builders = {"tiny_llama": tiny_llama, "hf_llama": lambda: hf_model("llama"),
                "hf_qwen2": lambda: hf_model("qwen2")}  # fmt: skip
    for name, build in builders.items():
        reference = build()
        sharded = copy.deepcopy(reference)
        parallelize_model(sharded, tp_mesh=mesh)
        with torch.no_grad():
            logits = sharded(ids, position_ids=pos)
            hidden = _full(sharded.hidden_states(ids, position_ids=pos))
            expected_logits = one_by_one(reference, batch)
            expected_hidden = one_by_one(reference.hidden_states, batch)
        assert isinstance(logits, DTensor), f"{name}: logits are not a vocabulary-sharded DTensor"
        for what, actual, expected in (("logits", logits.full_tensor(), expected_logits),
                                       ("hidden", hidden, expected_hidden)):  # fmt: skip
            torch.testing.assert_close(
                actual, expected, rtol=1e-5, atol=1e-5,
                msg=lambda m, what=what, name=name: f"{name} {what}, rank {rank}: {m}",
            )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2, help="processes = TP size")
    args = parser.parse_args()
    run_workers(check_all, args.world)
    print(f"packed sequences TP={args.world}: all checks passed")


if __name__ == "__main__":
    main()
