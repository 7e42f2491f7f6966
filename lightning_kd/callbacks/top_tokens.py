"""The highest-divergence tokens of a summarised batch, as records, text and a Markdown table.

:class:`TopToken` is what ``PerTokenDivergenceMonitor`` keeps (and checkpoints) for each of its
top tokens; :func:`describe_top_tokens` decodes the candidates that
:class:`~lightning_kd.callbacks.divergence_stats.BatchStatistics` found, and
:func:`top_token_lines` / :func:`top_token_table` present them in the log and to TensorBoard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = ["TopToken", "describe_top_tokens", "token_text", "top_token_lines", "top_token_table"]


class TopToken(NamedTuple):
    """One of the highest-divergence tokens of a summarised batch.

    Attributes:
        value: its per-token divergence (the loss's chosen divergence, ``T²``-scaled, as the
            loss computes it; ``kl`` in 0.1).
        position: its position ``t`` in the sequence (its target is ``labels[sample, t]``).
        sample: its row in the micro-batch of data-parallel rank ``dp_rank``.
        dp_rank: the data-parallel rank that held it.
        target_id: ``labels[sample, t]`` (-1 when the batch has no ``labels``).
        context_ids: the inputs ``input_ids[sample, t-c+1 .. t]`` the student saw last before
            predicting the target (empty when the batch has no ``input_ids``).
        text: ``'context' → 'target'`` decoded with the datamodule's tokenizer, or the ids.
    """

    value: float
    position: int
    sample: int
    dp_rank: int
    target_id: int
    context_ids: tuple[int, ...]
    text: str

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (checkpoints are loaded with ``weights_only=True``)."""
        out = self._asdict()
        out["context_ids"] = list(self.context_ids)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TopToken:
        """The inverse of :meth:`to_dict`; also reads 0.1's dicts (``kl`` for ``value``)."""
        data = dict(data)
        if "value" not in data and "kl" in data:
            data["value"] = data.pop("kl")
        return cls(**{**data, "context_ids": tuple(data["context_ids"])})


def token_text(tokenizer: Any | None, context: Sequence[int], target: int) -> str:
    """``'context' → 'target'`` decoded by ``tokenizer``, or the ids when there is none (or it
    cannot decode them)."""
    if tokenizer is not None and target >= 0:
        try:
            return f"{tokenizer.decode(list(context))!r} → {tokenizer.decode([target])!r}"
        except Exception:  # a tokenizer that cannot decode these ids: fall back to the ids
            pass
    return f"{list(context)} → {target}"


def describe_top_tokens(
    tokenizer: Any | None, top: Sequence[tuple[float, Sequence[int]]]
) -> list[TopToken]:
    """:class:`TopToken` records of reduced candidates.

    Args:
        tokenizer: anything with ``decode(list[int]) -> str``, or None (ids are shown).
        top: ``(value, [dp_rank, sample, position, target, *context_ids])`` per candidate,
            highest first; context ids of -1 (before the sequence start) are dropped.
    """
    tokens = []
    for value, (dp_rank, sample, position, target, *context) in top:
        context_ids = tuple(i for i in context if i >= 0)
        tokens.append(
            TopToken(
                value=value,
                position=position,
                sample=sample,
                dp_rank=dp_rank,
                target_id=target,
                context_ids=context_ids,
                text=token_text(tokenizer, context_ids, target),
            )
        )
    return tokens


def top_token_lines(label: str, tokens: Sequence[TopToken]) -> list[str]:
    """One numbered log line per token, naming the divergence by ``label``."""
    return [
        f"{i}. {label} {t.value:.4f} at position {t.position}: {t.text}"
        for i, t in enumerate(tokens, 1)
    ]


def top_token_table(label: str, tokens: Sequence[TopToken]) -> str:
    """The tokens as a Markdown table (``|`` and newlines in the text escaped)."""
    table = [f"| # | {_markdown(label)} | position | context → target |", "|---|---|---|---|"]
    table += [
        f"| {i} | {t.value:.4f} | {t.position} | {_markdown(t.text)} |"
        for i, t in enumerate(tokens, 1)
    ]
    return "\n".join(table)


def _markdown(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")
