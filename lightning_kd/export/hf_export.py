"""Write a trained student as a Hugging Face model directory.

:func:`export_student` takes the student module (for its architecture) and its full weights
(plain tensors, e.g. from :mod:`lightning_kd.export.student_state`) and writes what
``transformers.AutoModelForCausalLM.from_pretrained(directory)`` reads:

- ``config.json``: an :class:`~lightning_kd.models.hf.HFCausalLM` student's own
  ``model.config``; a :class:`~lightning_kd.TinyLlama` as ``LlamaForCausalLM``
  (:mod:`lightning_kd.export.tiny_llama_to_llama`). Either way ``vocab_size`` is the rows of
  the exported embedding (a restricted, padded-vocabulary student exports its restricted
  size) and ``tie_word_embeddings`` says whether the saved head is the embedding: a head that
  tensor parallelism untied, and trained apart, is saved as its own matrix with
  ``tie_word_embeddings=False``.
- the weights as safetensors under HF's own names: ``model.safetensors``, or shards
  ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` when they exceed
  ``max_shard_size``; in the weights' own dtype.
- ``generation_config.json`` (the pretrained student's own when it has one, else derived from
  the config). Where the config or generation config has no BOS/EOS/PAD id, the run's
  tokenizer's are written (:func:`run_special_tokens`; the byte tokenizer's EOS is 256 and PAD
  257), so ``generate`` stops at the end of a document.
- the tokenizer, when one is given (``save_pretrained``).

Nothing here builds the exported model: the weights go to disk as they are, so exporting a
large student needs no second copy of it in memory.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd.io import ensure_writable_dir, follow_umask
from lightning_kd.models.lora import has_lora, merge_lora_state, plain_names
from lightning_kd.models.tiny_llama import TinyLlama

#: Default size of one safetensors file (bytes, decimal: HF's "5GB").
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_WRITTEN = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def parse_size(size: int | str) -> int:
    """Bytes from ``size``: an int, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``.

    Raises:
        ValueError: for a malformed or non-positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if match is None:
            raise ValueError(f"max_shard_size must be bytes or e.g. '5GB', got {size!r}.")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}.")
    return value


def _check_names(student: nn.Module, state: Mapping[str, Tensor]) -> None:
    """The weights must be the student's, name for name (a tied head may be absent); a LoRA
    student's merged weights are named as without LoRA."""
    expected = plain_names(student) if has_lora(student) else set(student.state_dict())
    missing = sorted(expected - set(state) - {"lm_head.weight", "model.lm_head.weight"})
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"the weights do not match the student {type(student).__name__}: missing "
            f"{missing[:5] or 'none'}, unexpected {unexpected[:5] or 'none'} (is the "
            "checkpoint from this config's student?)."
        )


def _tied(flag: bool, embed: Tensor, head: Tensor | None) -> bool:
    """Whether the head is exported as the embedding: the model ties them and the trained
    head is the embedding (a head untied by tensor parallelism has trained apart)."""
    return bool(flag) and (head is None or torch.equal(head, embed))


def _weight_name(model: nn.Module, layer: nn.Module) -> str:
    """The state-dict name of ``layer``'s weight inside ``model`` (by module, so that a tied
    head and the embedding get their own names)."""
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is layer:
            return f"{name}.weight"
    raise ValueError(f"{type(model).__name__}: layer not found among its own modules.")


def _hf_config_and_weights(student: nn.Module, state: Mapping[str, Tensor]) -> tuple[Any, dict]:
    """(a transformers ``PretrainedConfig``, the weights under HF names) for ``student``."""
    from lightning_kd.models.hf.loading import require_transformers

    transformers = require_transformers()
    _check_names(student, state)
    if isinstance(student, TinyLlama):
        from lightning_kd.export.tiny_llama_to_llama import llama_config, llama_state_dict

        embed, head = state["embed.weight"], state.get("lm_head.weight")
        tied = _tied(student.tie_embeddings, embed, head)
        weights = llama_state_dict(state)
        fields = llama_config(student, state, tied)
        fields.pop("model_type")
        config = transformers.LlamaConfig(**fields)
    else:
        from lightning_kd.models.hf import HFCausalLM

        if not isinstance(student, HFCausalLM):
            raise ValueError(
                f"cannot export a {type(student).__name__} student to Hugging Face format: "
                "TinyLlama and HFCausalLM students are supported."
            )
        model = student.model
        weights = {k.removeprefix("model."): v for k, v in state.items()}
        embed_name = _weight_name(model, model.get_input_embeddings())
        head_name = _weight_name(model, model.get_output_embeddings())
        embed, head = weights[embed_name], weights.get(head_name)
        config = copy.deepcopy(model.config)
        tied = _tied(getattr(config, "tie_word_embeddings", False), embed, head)
        config.tie_word_embeddings = tied
        config.vocab_size = int(embed.shape[0])
        config.architectures = [type(model).__name__]
        if tied:
            weights.pop(head_name, None)
    if head is not None and head.shape[0] != embed.shape[0]:
        raise ValueError(
            f"the lm_head has {head.shape[0]} rows but the embedding {embed.shape[0]}: a "
            "Hugging Face config has one vocab_size."
        )
    if tied:
        weights.pop("lm_head.weight", None)
    config.dtype = embed.dtype
    return config, weights


def prepare_directory(directory: Path, overwrite: bool) -> None:
    """Create the export directory ``directory``, writable and empty (an earlier export's
    files removed with ``overwrite``; ``ValueError`` for a file or a non-empty directory)."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"output_dir {str(directory)!r} is a file, not a directory.")
    if directory.is_dir() and any(directory.iterdir()):
        if not overwrite:
            raise ValueError(
                f"output_dir {str(directory)!r} is not empty; pass overwrite=True "
                "(--overwrite) to replace an earlier export there."
            )
        for stale in directory.iterdir():  # weights of an earlier export: other shard counts
            if stale.is_file() and _WRITTEN.fullmatch(stale.name):
                stale.unlink()
    ensure_writable_dir(directory, "output_dir")  # one line naming it, not a traceback


def _shards(weights: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(weights):
        tensor = weights[name]
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_safetensors(
    weights: Mapping[str, Tensor], directory: Path, max_shard_size: int
) -> list[str]:
    """Write ``weights`` as HF-style safetensors files (with an index when sharded); the file
    names written."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    plain: dict[str, Tensor] = {}
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        plain[name] = tensor
    shards = _shards(plain, max_shard_size)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata=metadata)
        follow_umask(directory / SINGLE_FILE)  # safetensors creates 0600 files
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / name), metadata=metadata)
        follow_umask(directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in plain.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, INDEX_FILE]


#: The special-token fields of a Hugging Face config and generation config.
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _fill_special_tokens(target: Any, special: Mapping[str, int | None]) -> None:
    """Set each of ``special``'s ids on ``target`` (a config) where ``target`` has none."""
    for field in SPECIAL_TOKEN_FIELDS:
        if getattr(target, field, None) is None and special.get(field) is not None:
            setattr(target, field, int(special[field]))


def _generation_config(student: nn.Module, config: Any, special: Mapping[str, int | None]) -> Any:
    from transformers import GenerationConfig

    pretrained = getattr(student, "pretrained_path", None)
    generation = None
    if pretrained is not None:
        try:
            generation = GenerationConfig.from_pretrained(pretrained, local_files_only=True)
        except (OSError, ValueError):
            generation = None
    if generation is None:
        generation = GenerationConfig.from_model_config(config)
    _fill_special_tokens(generation, special)
    return generation


def run_special_tokens(
    datamodule: Any | None = None, tokenizer: Any | None = None
) -> dict[str, int | None]:
    """The BOS/EOS/PAD ids of the run's tokenizer, under the config's field names.

    Args:
        datamodule: the run's data module; its ``tokenizer`` (a
            :class:`~lightning_kd.data.ByteTokenizer` or ``HFTokenizer``) is read.
        tokenizer: a ``transformers`` tokenizer, read when the data module has none.

    Returns:
        ``{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...}``, None where the
        tokenizer has no such token (the byte tokenizer: no BOS, EOS 256, PAD 257).
    """
    wrapper = getattr(datamodule, "tokenizer", None) if datamodule is not None else None
    hf = getattr(wrapper, "hf_tokenizer", None) or (tokenizer if wrapper is None else None)
    if hf is not None:
        return {field: getattr(hf, field, None) for field in SPECIAL_TOKEN_FIELDS}
    return {
        "bos_token_id": getattr(wrapper, "bos_id", None),
        "eos_token_id": getattr(wrapper, "eos_id", None),
        "pad_token_id": getattr(wrapper, "pad_id", None),
    }


def export_student(
    student: nn.Module,
    state: Mapping[str, Tensor],
    output_dir: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    special_tokens: Mapping[str, int | None] | None = None,
) -> Path:
    """Write ``student`` with the weights ``state`` as a Hugging Face directory.

    Args:
        student: a :class:`~lightning_kd.TinyLlama` or
            :class:`~lightning_kd.models.hf.HFCausalLM` (its architecture; its own weights are
            not read, and it may be tensor-parallel or FSDP2-sharded).
        state: the student's full weights under its own names (``student.state_dict()``
            names, plain tensors; a LoRA student's base and adapters, which are merged:
            ``W + (alpha / rank) · B @ A``, see :func:`~lightning_kd.models.lora.
            merge_lora_state`), e.g. from
            :func:`~lightning_kd.export.student_state.student_state_from_checkpoint` or
            :func:`~lightning_kd.export.student_state.gather_full_state`.
        output_dir: the directory to write (created; must be empty unless ``overwrite``).
        tokenizer: a ``transformers`` tokenizer to save alongside (optional).
        max_shard_size: largest safetensors file, bytes or e.g. ``"5GB"``.
        overwrite: replace an earlier export in ``output_dir``.
        special_tokens: BOS/EOS/PAD ids (:func:`run_special_tokens`) written into
            ``config.json`` and ``generation_config.json`` where they have none; default:
            ``tokenizer``'s.

    Returns:
        The output directory.

    Raises:
        ValueError: an unsupported student, weights that are not the student's, an lm_head
            and embedding of different vocabulary sizes, or a non-empty ``output_dir``
            without ``overwrite``.
    """
    max_bytes = parse_size(max_shard_size)
    if has_lora(student):  # the adapters folded into the base weights: a plain HF model
        state = merge_lora_state(student, state)
    config, weights = _hf_config_and_weights(student, state)
    special = run_special_tokens(tokenizer=tokenizer) if special_tokens is None else special_tokens
    _fill_special_tokens(config, special)
    directory = Path(output_dir)
    prepare_directory(directory, overwrite)
    config.save_pretrained(directory)
    write_safetensors(weights, directory, max_bytes)
    _generation_config(student, config, special).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def run_tokenizer(student: nn.Module, datamodule: Any | None = None) -> Any | None:
    """The run's ``transformers`` tokenizer: the data module's (``datamodule.tokenizer.
    hf_tokenizer``), else the one saved with an ``HFCausalLM`` student's ``pretrained_path``;
    None when the run has none (e.g. the byte tokenizer)."""
    wrapper = getattr(datamodule, "tokenizer", None) if datamodule is not None else None
    hf = getattr(wrapper, "hf_tokenizer", None)
    if hf is not None:
        return hf
    pretrained = getattr(student, "pretrained_path", None)
    if pretrained is None:
        return None
    from lightning_kd.models.hf.loading import require_transformers

    try:
        return require_transformers().AutoTokenizer.from_pretrained(
            pretrained, local_files_only=True
        )
    except (OSError, ValueError):
        return None
