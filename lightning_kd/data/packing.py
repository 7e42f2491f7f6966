"""Packing whole documents into rows with position ids, so attention never crosses documents.

A *document* (one tokenised conversation) of ``n`` tokens contributes ``n - 1`` positions to a
row: inputs ``doc[:-1]``, labels ``doc[1:]`` (the label of a token that is not a target is
``ignore_index``). So every target is predicted inside its own document, and no label crosses
a document boundary. A document longer than ``seq_len + 1`` tokens is *overlong*:
``"truncate"`` keeps its first ``seq_len + 1`` tokens (the start of the conversation),
``"drop"`` leaves it out; a document left without any target (all its answers cut off) is left
out too, and so is a document of fewer than 2 tokens (it has no position, so no label).
:func:`fit_documents` counts all three.

Rows are filled greedily in document order (:func:`pack_rows`): a document goes into the current
row if its positions fit, else it starts the next row; with ``packing=False`` every row holds
one document. The rest of a row is padding: PAD inputs, ``ignore_index`` labels.

Batch contract (:class:`PackedRows`), int64 tensors of shape [S]:

- ``input_ids``, ``labels`` as above;
- ``position_ids``: 0, 1, ... from the first position of every document in the row, and the
  padding block restarts at 0 too, so it is its own document: models that derive document
  boundaries from ``position_ids == 0`` never let a real token attend to padding or padding to
  a real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

#: The values of ``overlong``.
OVERLONG = ("truncate", "drop")


@dataclass
class FitResult:
    """The documents that go into rows and what happened to the others.

    Attributes:
        documents: [K] int64, the kept documents in order (indices into ``offsets``).
        positions: [K] int64, the input positions each contributes (<= seq_len).
        truncated: kept documents that were cut to ``seq_len + 1`` tokens.
        dropped: overlong documents left out (``overlong="drop"``).
        no_targets: documents left out because no target remained after truncation.
        too_short: documents left out because they have fewer than 2 tokens (no label).
    """

    documents: Tensor
    positions: Tensor
    truncated: int = 0
    dropped: int = 0
    no_targets: int = 0
    too_short: int = 0


def fit_documents(
    offsets: Tensor, targets: Tensor, documents: Tensor, seq_len: int, overlong: str
) -> FitResult:
    """Apply the ``overlong`` rule to ``documents``.

    Args:
        offsets: [D + 1] int64, document ``d`` is tokens ``offsets[d]:offsets[d + 1]``.
        targets: [T] bool, whether each token is a target.
        documents: [N] int64, the documents to place, in order.
        seq_len: positions per row, S.
        overlong: ``"truncate"`` or ``"drop"``.

    Returns:
        The kept documents and their positions, with the counts.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}.")
    lengths = offsets[documents + 1] - offsets[documents]
    too_long = lengths > seq_len + 1
    keep = lengths >= 2
    if overlong == "drop":
        keep &= ~too_long
    positions = torch.clamp(lengths, max=seq_len + 1) - 1
    # targets among tokens 1..positions of each document (token 0 is never a label)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.long), targets.long().cumsum(0)])
    begins = offsets[documents]
    has_target = cumulative[begins + positions + 1] - cumulative[begins + 1] > 0
    no_targets = int((keep & ~has_target).sum())
    keep &= has_target
    return FitResult(
        documents=documents[keep],
        positions=positions[keep],
        truncated=int((keep & too_long).sum()),
        dropped=int(too_long.sum()) if overlong == "drop" else 0,
        no_targets=no_targets,
        too_short=int((lengths < 2).sum()),
    )


def pack_rows(positions: Tensor, seq_len: int, packing: bool) -> Tensor:
    """Row boundaries: row ``r`` holds the documents ``bounds[r]:bounds[r + 1]``.

    Args:
        positions: [K] int64, each document's positions (each <= seq_len).
        seq_len: positions per row, S.
        packing: fill rows greedily in order; False: one document per row.

    Returns:
        [R + 1] int64 boundaries into the documents.
    """
    if not packing:
        return torch.arange(len(positions) + 1, dtype=torch.long)
    bounds = [0]
    fill = 0
    for k, length in enumerate(positions.tolist()):
        if fill + length > seq_len:
            bounds.append(k)
            fill = 0
        fill += length
    if fill:
        bounds.append(len(positions))
    return torch.tensor(bounds, dtype=torch.long)


class PackedRows(Dataset):
    """Rows of whole documents with labels and position ids (see the module docstring).

    Args:
        tokens: [T] integer token ids of all documents.
        targets: [T] bool, whether each token is a target.
        offsets: [D + 1] int64 document boundaries in ``tokens``.
        fit: the documents of this dataset and their positions (:func:`fit_documents`).
        bounds: [R + 1] row boundaries into ``fit.documents`` (:func:`pack_rows`).
        seq_len: S.
        pad_id: the input id of padding positions.
        ignore_index: the label of non-targets and padding.
    """

    def __init__(
        self,
        tokens: Tensor,
        targets: Tensor,
        offsets: Tensor,
        fit: FitResult,
        bounds: Tensor,
        seq_len: int,
        pad_id: int,
        ignore_index: int,
    ) -> None:
        self.tokens, self.targets, self.offsets = tokens, targets, offsets
        self.documents, self.positions, self.bounds = fit.documents, fit.positions, bounds
        self.seq_len, self.pad_id, self.ignore_index = seq_len, pad_id, ignore_index

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)}).")
        size = self.seq_len
        input_ids = torch.full((size,), self.pad_id, dtype=torch.long)
        labels = torch.full((size,), self.ignore_index, dtype=torch.long)
        position_ids = torch.empty(size, dtype=torch.long)
        fill = 0
        for k in range(int(self.bounds[index]), int(self.bounds[index + 1])):
            begin = int(self.offsets[self.documents[k]])
            length = int(self.positions[k])
            window = self.tokens[begin : begin + length + 1].long()
            input_ids[fill : fill + length] = window[:-1]
            is_target = self.targets[begin + 1 : begin + length + 1]
            labels[fill : fill + length] = torch.where(is_target, window[1:], self.ignore_index)
            position_ids[fill : fill + length] = torch.arange(length)
            fill += length
        position_ids[fill:] = torch.arange(size - fill)  # padding: its own document
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "index": torch.tensor(index)}  # fmt: skip
