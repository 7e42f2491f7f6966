"""The evaluation report: a plain-text table and a JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning_kd.io import atomic_write

#: (column header, result key, format) of the table.
COLUMNS = (
    ("model", "name", "{}"),
    ("tokens", "tokens", "{:d}"),
    ("CE (nats)", "ce", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("KL(teacher‖model)", "kl_to_teacher", "{:.4f}"),
    ("top-1 agree", "top1_agreement", "{:.3f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the metric rows (``name`` and the keys of
    :meth:`~lightning_kd.evaluation.metrics.TokenMetrics.compute`; missing or None: ``–``)."""
    cells = [[header for header, _, _ in COLUMNS]]
    for row in rows:
        cells.append([
            "–" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in COLUMNS
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
             for line in cells]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_samples(samples: list[dict[str, Any]]) -> str:
    """The greedy samples, prompt by prompt, one line per model."""
    out = []
    for sample in samples:
        out.append(f"prompt: {sample['prompt']!r}")
        for name, text in sample["completions"].items():
            out.append(f"  {name:>14}: {text!r}")
    return "\n".join(out)


def write_report(result: dict[str, Any], output_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``evaluation.json`` (the whole result) and ``evaluation.md`` (table and samples)
    into ``output_dir`` atomically; their paths."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, table_path = directory / "evaluation.json", directory / "evaluation.md"
    text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    atomic_write(json_path, text.encode())
    markdown = format_table(result["models"]) + "\n\n" + format_samples(result["samples"]) + "\n"
    atomic_write(table_path, markdown.encode())
    return json_path, table_path
