"""Tensor-parallel support for KDLoss (placeholder until the TP path lands)."""

from __future__ import annotations

from torch.distributed.tensor import DTensor

from lightning_kd.vocab_softmax import LocalVocabSoftmax


def resolve_vocab_parallel(student, teacher, labels, tp_group):
    def local(x):
        return x.full_tensor() if isinstance(x, DTensor) else x

    return local(student), local(teacher), local(labels), LocalVocabSoftmax()
