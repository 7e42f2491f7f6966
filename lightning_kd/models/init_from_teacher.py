"""A student initialised from its teacher: the DistilBERT / Minitron depth-pruning recipe.

The student keeps the teacher's width and copies its embeddings, final norm, lm_head and a
chosen subset of its transformer blocks (student block ``j`` = teacher block ``layers[j]``);
training then starts from a model that already speaks the language instead of from noise.

The copy works on state-dict keys, so it serves every model whose blocks are numbered
``...layers.<i>....`` (TinyLlama, Hugging Face Llama/Qwen/Mistral families): keys outside the
blocks are copied as they are, block keys are renumbered. Every student key must find a teacher
key of the same shape; anything else is a ``ValueError``, never a partial copy.
"""

from __future__ import annotations

import itertools
import pickle
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

_BLOCK_KEY = re.compile(r"^(.*?\blayers\.)(\d+)(\..+)$")


def select_layers(num_layers: int, layers: int | Sequence[int]) -> list[int]:
    """The teacher blocks a student keeps.

    Args:
        num_layers: the teacher's depth L.
        layers: an int ``k``: every k-th block from the first (``0, k, 2k, ... < L``); or an
            explicit, strictly increasing list of block indices in ``[0, L)``.

    Returns:
        The indices, ascending.

    Raises:
        ValueError: ``k < 1``, an empty list, an index out of range, or a list that is not
            strictly increasing.
    """
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"layers as an int is a stride k >= 1 (every k-th), got {layers}.")
        return list(range(0, num_layers, layers))
    chosen = [int(i) for i in layers]
    if not chosen:
        raise ValueError("layers is empty; expected at least one teacher block index.")
    if any(i < 0 or i >= num_layers for i in chosen):
        raise ValueError(f"layers {chosen} must lie in [0, {num_layers}) (the teacher's blocks).")
    if any(b <= a for a, b in itertools.pairwise(chosen)):
        raise ValueError(f"layers {chosen} must be strictly increasing (each block once).")
    return chosen


def teacher_key(student_key: str, layers: Sequence[int]) -> str:
    """The teacher state-dict key a student key copies from (block numbers mapped through
    ``layers``; other keys unchanged).

    Raises:
        ValueError: a student block index ``j >= len(layers)``.
    """
    match = _BLOCK_KEY.match(student_key)
    if match is None:
        return student_key
    head, index, tail = match.groups()
    j = int(index)
    if j >= len(layers):
        raise ValueError(
            f"student key {student_key!r} is block {j}, but only {len(layers)} teacher blocks "
            f"were chosen ({list(layers)}); the student's depth must equal len(layers)."
        )
    return f"{head}{layers[j]}{tail}"


@torch.no_grad()
def copy_from_teacher(
    student: nn.Module, teacher_state: Mapping[str, Tensor], layers: Sequence[int]
) -> None:
    """Copy the teacher's weights into ``student`` (in place, dtype converted to the student's).

    Args:
        student: a model of the teacher's width whose depth is ``len(layers)``.
        teacher_state: the teacher's state dict (same key names as the student's, e.g.
            ``teacher.state_dict()``).
        layers: the teacher block of each student block (see :func:`select_layers`).

    Raises:
        ValueError: a student key with no teacher key or a different shape (a student of
            another width, head count or vocabulary), or a student deeper than ``layers``.
    """
    targets = student.state_dict(keep_vars=True)
    problems = []
    pairs = []
    for key, target in targets.items():
        source_key = teacher_key(key, layers)
        source = teacher_state.get(source_key)
        if source is None:
            problems.append(f"{key}: no teacher key {source_key!r}")
        elif tuple(source.shape) != tuple(target.shape):
            problems.append(
                f"{key}: student {tuple(target.shape)} vs teacher {source_key} "
                f"{tuple(source.shape)}"
            )
        else:
            pairs.append((target, source))
    if problems:
        raise ValueError(
            "cannot initialise the student from the teacher (it must have the teacher's width, "
            f"heads and vocabulary, and len(layers) blocks): {'; '.join(problems[:5])}"
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    seen: set[int] = set()
    for target, source in pairs:
        if id(target) in seen:  # tied weights appear under two keys
            continue
        seen.add(id(target))
        target.copy_(source.to(device=target.device, dtype=target.dtype))


def load_state_file(path: str, prefix: str = "") -> dict[str, Tensor]:
    """The tensors of a weights file: a ``state_dict`` saved with ``torch.save`` or a Lightning
    checkpoint (its ``"state_dict"``), keys starting with ``prefix`` with it stripped.

    Raises:
        ValueError: an unreadable file, one that holds no state dict, or no key with ``prefix``.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"init_from {path!r} is not a readable PyTorch weights file: {error}"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"init_from {path!r} holds no state dict of tensors.")
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise ValueError(
            f"no key of init_from {path!r} starts with prefix {prefix!r}; its keys start like "
            f"{sorted(state)[:3]}."
        )
    return picked
