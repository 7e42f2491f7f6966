"""Models × held-out batches → the evaluation result (metrics per model, greedy samples)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_kd.evaluation.greedy import greedy_generate
from lightning_kd.evaluation.metrics import TokenMetrics
from lightning_kd.models.outputs import logits_of

#: Fixed prompts of the greedy samples (override with ``prompts``).
DEFAULT_PROMPTS = (
    "Call me Ishmael. Some years ago",
    "The whale",
    "Once upon a time,",
)
#: The name the teacher's row and samples carry.
TEACHER = "teacher"


class Tokenizer(Protocol):
    """What the samples need of a tokenizer (ByteTokenizer and HFTokenizer have it)."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _forward(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    kwargs = {}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    return logits_of(model(batch["input_ids"], **kwargs))


@torch.no_grad()
def evaluate_models(
    models: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, Tensor]],
    *,
    teacher: nn.Module | None = None,
    tokenizer: Tokenizer | None = None,
    prompts: Iterable[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    max_context: int | None = None,
    max_batches: int | None = None,
    ignore_index: int = -100,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every model (and the teacher) on the same held-out batches.

    Args:
        models: name → model (input_ids [B, S] int64 → logits [B, S, V]); evaluated in
            ``eval()`` mode and left in it.
        batches: dicts with ``input_ids`` and ``labels`` [B, S] int64 (``position_ids`` [B, S]
            when packed), e.g. a data module's ``val_dataloader()``.
        teacher: the reference for ``kl_to_teacher`` and ``top1_agreement``; also evaluated
            as the row ``"teacher"``. None: those columns are None.
        tokenizer: encodes the prompts and decodes the samples; None: no samples.
        prompts: the fixed prompts of the greedy samples.
        max_new_tokens: tokens generated per sample.
        max_context: the longest input a model takes (e.g. the data's ``seq_len``).
        max_batches: evaluate only the first batches; None: all.
        ignore_index: the label of positions that are not targets.
        show_progress: progress bars over the batches and the prompts.

    Returns:
        ``{"models": [{"name", "tokens", "ce", "perplexity", "accuracy", "kl_to_teacher",
        "top1_agreement"}, ...], "samples": [{"prompt", "completions": {name: text}}, ...],
        "settings": {...}}``; the teacher first.

    Raises:
        ValueError: no models, a model named ``"teacher"``, or no valid tokens.
    """
    if not models and teacher is None:
        raise ValueError("evaluate_models needs at least one model (or a teacher).")
    if TEACHER in models:
        raise ValueError(f"{TEACHER!r} is the teacher's row; give the model another name.")
    everyone = {**({TEACHER: teacher} if teacher is not None else {}), **models}
    for model in everyone.values():
        model.eval()
    sums = {name: TokenMetrics() for name in everyone}
    total = None
    if hasattr(batches, "__len__"):
        total = len(batches) if max_batches is None else min(len(batches), max_batches)
    chosen = itertools.islice(batches, max_batches)
    progress = tqdm(chosen, total=total, unit=" batch", disable=not show_progress,
                    desc=f"Evaluating {len(everyone)} models")  # fmt: skip
    for batch in progress:
        labels = batch["labels"]
        teacher_logits = _forward(teacher, batch) if teacher is not None else None
        for name, model in everyone.items():
            logits = teacher_logits if name == TEACHER else _forward(model, batch)
            sums[name].add(logits, labels, teacher_logits, ignore_index)
    rows = [{"name": name, **metrics.compute()} for name, metrics in sums.items()]
    samples = []
    if tokenizer is not None:
        for prompt in tqdm(list(prompts), desc="Greedy samples", unit=" prompt",
                           disable=not show_progress):  # fmt: skip
            ids = tokenizer.encode(prompt)
            completions = {
                name: tokenizer.decode(
                    greedy_generate(model, ids, max_new_tokens, max_context, tokenizer.eos_id)
                )
                for name, model in everyone.items()
            }
            samples.append({"prompt": prompt, "completions": completions})
    settings = {
        "max_batches": max_batches,
        "max_new_tokens": max_new_tokens,
        "ignore_index": ignore_index,
        "divergence": "KL(teacher || model), T=1",
    }
    return {"models": rows, "samples": samples, "settings": settings}
