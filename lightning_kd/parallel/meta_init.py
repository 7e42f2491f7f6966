"""Sharded loading: build on the meta device, parallelise there, materialise each rank's shard.

Without it every rank builds the teacher (and a pretrained student) in full on CPU before TP and
FSDP2 shard it, so a node's host memory, not its devices, bounds the largest teacher a run can
start. With ``DistillationModule(sharded_loading=True)`` and a device mesh:

1. :func:`build_on_meta` builds a model that is loaded from weights under
   ``torch.device("meta")`` (no storage; :class:`~lightning_kd.models.hf.HFCausalLM` then takes
   its directory's config and reads no weights). Models without a weight source are not
   meta-built: a randomly initialised student is built in full on CPU as before and sharded,
   which keeps the guarantee that TP=2 and one process start from the same weights (random
   students are small; build a large one from a checkpoint instead).
2. The caller reconciles vocabularies (``restrict_vocab`` works on meta tensors) and applies
   the TP plan and FSDP2 on the meta model.
3. :func:`materialize` allocates only this rank's shard of every parameter
   (``to_empty``), restores tied parameters, reads the weights and recomputes the
   non-persistent buffers through the model contract's ``init_non_persistent_buffers()``
   (:class:`~lightning_kd.models.contract.SupportsBufferInit`: TinyLlama's RoPE tables,
   Hugging Face rotary ``inv_freq``; a model with such buffers and no such method is refused
   before anything is allocated):

   - a Hugging Face directory (``HFCausalLM(pretrained_path=...)``) is read through PyTorch's
     distributed checkpoint with its Hugging Face storage reader
     (:class:`~lightning_kd.parallel.hf_reader.TensorAtATimeReader`, which opens the file
     anew for each tensor): each rank reads only the slices of its local shards from the
     safetensors files;
   - a ``teacher_checkpoint`` that is a distributed checkpoint directory (as
     ``ModelParallelStrategy`` saves; any TP/FSDP2 layout) is read through DCP, each rank
     reading its slices;
   - a ``teacher_checkpoint`` that is one ``torch.save`` file is memory-mapped
     (``torch.load(mmap=True)``) and each rank copies its slice of every tensor, cut on the
     host at the offsets DCP uses for the shard (no communication; only the pages of the
     local slices are read, and the file stays mapped until the load ends).

   Rows beyond a restricted (padded) vocabulary are never copied: tensors whose first
   dimension the reconciliation cut are read as their first rows.

:func:`~lightning_kd.parallel.pipeline.parallelize_model` runs step 3 as the last of its order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_kd.checkpoint.distributed_state import (
    is_distributed_checkpoint,
    load_distributed_state,
    stored_tensors,
)
from lightning_kd.models.contract import SupportsBufferInit, non_persistent_buffers

__all__ = [
    "WeightSource",
    "build_on_meta",
    "load_dcp_directory",
    "load_hf_directory",
    "load_torch_file",
    "materialize",
    "recompute_buffers",
]


@dataclass(frozen=True)
class WeightSource:
    """Where a meta-built model's weights come from.

    Attributes:
        kind: ``"hf"`` (a Hugging Face safetensors directory, read through DCP), ``"dcp"`` (a
            distributed checkpoint directory, as ``ModelParallelStrategy`` saves, read through
            DCP) or ``"torch"`` (one ``torch.save`` state-dict file, memory-mapped).
        path: the directory or the file.
        prefix: for ``"torch"`` and ``"dcp"``, the prefix of the stored keys (after DCP's
            ``state_dict.``) that the model's keys lack, e.g. ``"model."``.
        role: ``"student"`` or ``"teacher"``, for messages.
    """

    kind: str
    path: str
    prefix: str = ""
    role: str = "model"


def build_on_meta(
    model: Callable[[], nn.Module] | nn.Module,
    role: str,
    checkpoint: str | None = None,
    checkpoint_prefix: str = "",
) -> tuple[nn.Module, WeightSource] | None:
    """Build ``model`` (a zero-argument factory) on the meta device when it has weights to load.

    Args:
        model: the factory (an already built module is returned as None: it is materialised).
        role: ``"student"`` or ``"teacher"``, for messages.
        checkpoint: a ``torch.save`` state-dict file or a distributed checkpoint directory
            the weights come from; else the model's own ``pretrained_path`` (a Hugging Face
            directory), if it has one.
        checkpoint_prefix: key prefix to strip from ``checkpoint``'s keys.

    Returns:
        The meta model and its :class:`WeightSource`, or None when ``model`` is a module
        already, or has no weight source (a random init: the caller builds it in full, so
        that every parallel layout starts from the same weights). The global RNG is left as
        it was.

    Raises:
        ValueError: when the factory does not return an nn.Module.
    """
    if isinstance(model, nn.Module):
        return None
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        built = model()
    if not isinstance(built, nn.Module):
        raise ValueError(f"the {role} factory must return an nn.Module, got {type(built)}.")
    if checkpoint is not None:
        kind = "dcp" if is_distributed_checkpoint(checkpoint) else "torch"
        return built, WeightSource(kind, checkpoint, checkpoint_prefix, role)
    pretrained = getattr(built, "pretrained_path", None)
    if pretrained is not None:
        return built, WeightSource("hf", str(pretrained), role=role)
    return None


def materialize(model: nn.Module, device: torch.device, source: WeightSource) -> None:
    """Allocate the local shards of the (parallelised) meta ``model`` on ``device``, keep its
    tied parameters tied, load ``source`` and recompute its non-persistent buffers.

    Every rank of the mesh must call this (the Hugging Face reader plans collectively).

    Raises:
        ValueError: for keys missing from the source, shapes that do not match, or
            non-persistent buffers no ``init_non_persistent_buffers()`` covers (checked first,
            before anything is allocated or read; see :func:`recompute_buffers`).
    """
    _check_buffers_covered(model)
    ties = _tied_names(model)
    model.to_empty(device=device)
    _retie(model, ties)
    with torch.no_grad():
        if source.kind == "hf":
            load_hf_directory(model, source.path)
        elif source.kind == "dcp":
            load_dcp_directory(model, source.path, source.prefix, source.role)
        else:
            load_torch_file(model, source.path, source.prefix)
        recompute_buffers(model)


# --------------------------------------------------------------------------- tied parameters
def _tied_names(model: nn.Module) -> list[list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _retie(model: nn.Module, ties: list[list[str]]) -> None:
    """``to_empty`` gives each module its own new Parameter: share the first again."""
    for first, *others in ties:
        param = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without the aliases of tied parameters (the first name stays)."""
    aliases = {name for group in _tied_names(model) for name in group[1:]}
    return {k: v for k, v in model.state_dict().items() if k not in aliases}


# --------------------------------------------------------------------------- copying slices
def _fit_rows(name: str, full: Tensor, target: Tensor) -> Tensor:
    """``full`` cut to ``target``'s global shape: equal, or the first rows of a restricted
    vocabulary."""
    shape = tuple(target.shape)
    if tuple(full.shape) == shape:
        return full
    if full.ndim == len(shape) and full.shape[1:] == shape[1:] and full.shape[0] > shape[0]:
        return full[: shape[0]]
    raise ValueError(
        f"weight {name!r} has shape {tuple(full.shape)} in the source but {shape} in the model."
    )


def _copy_local(target: Tensor, full: Tensor) -> None:
    """Copy this rank's slice of the global tensor ``full`` (on the host, e.g. memory-mapped)
    into ``target`` (a DTensor shard or a plain tensor), without communication.

    The slice is cut where ``full`` lives, from the offsets DCP itself uses for the shard
    (``__create_chunk_list__``, TP and FSDP2's strided shards included), so only its pages are
    read and only it is copied to the device.
    """
    if not isinstance(target, DTensor):
        target.copy_(full)
        return
    chunks = target.__create_chunk_list__()
    if len(chunks) == 1:
        (chunk,) = chunks
        index = tuple(
            slice(offset, offset + size)
            for offset, size in zip(chunk.offsets, chunk.sizes, strict=True)
        )
        target.to_local().copy_(full[index])
    else:  # a layout with several local pieces: let DTensor cut it (copies ``full`` over)
        local = distribute_tensor(
            full, target.device_mesh, target.placements, src_data_rank=None
        ).to_local()
        target.to_local().copy_(local)


# --------------------------------------------------------------------------- sources
def load_torch_file(model: nn.Module, path: str, prefix: str = "") -> None:
    """Load a ``torch.save`` state dict (or a checkpoint dict with a ``state_dict`` entry)
    into the local shards of ``model``, memory-mapped: each rank touches only its slices.

    Raises:
        ValueError: for an unreadable file, a prefix that matches nothing, or missing,
            unexpected or mis-shaped keys (the load is strict).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a file it cannot read
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint: {error}") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict.")
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"no key of {path!r} starts with the prefix {prefix!r}.")
    targets = model.state_dict()
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"{path!r} does not match the model: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}."
        )
    for name, target in targets.items():
        _copy_local(target, _fit_rows(name, state[name], target))


def load_dcp_directory(model: nn.Module, path: str, prefix: str = "", role: str = "model") -> None:
    """Load a distributed checkpoint directory (``ModelParallelStrategy``'s, whatever layout
    wrote it) into the local shards of ``model`` through DCP: each rank reads its slices.

    Args:
        model: the materialised model.
        path: the checkpoint directory.
        prefix: the stored keys' prefix after ``state_dict.`` that the model's keys lack
            (``"model."`` for a ``CausalLMModule`` checkpoint).
        role: what the model is, for messages.

    Tensors whose first dimension the vocabulary reconciliation cut are read in full (DCP
    refuses a shape mismatch) and their first rows copied.

    Raises:
        ValueError: for a torn checkpoint, missing or unexpected keys (the load is strict,
            as loading in full is), or shapes that do not match.
    """
    stored = stored_tensors(path, prefix, role)
    state = _unique_state(model)
    missing = sorted(set(state) - set(stored))
    unexpected = sorted(set(stored) - set(model.state_dict()))  # tied aliases may be stored
    if missing or unexpected:
        raise ValueError(
            f"the {role} checkpoint {path!r} does not match the {role} (stored keys under "
            f"'state_dict.{prefix}', the teacher_checkpoint_prefix): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    targets: dict[str, Tensor] = {}
    restricted: dict[str, tuple[Tensor, Tensor]] = {}
    for name, target in state.items():
        meta = stored[name]
        if tuple(meta.size) == tuple(target.shape):
            targets[name] = target
        else:  # the full rows on the host; only this rank's slice goes to the device
            full = torch.empty(meta.size, dtype=meta.properties.dtype)
            _fit_rows(name, full, target)  # raises on a mismatch
            targets[name] = full
            restricted[name] = (full, target)
    load_distributed_state(targets, path, prefix)
    for name, (full, target) in restricted.items():
        _copy_local(target, _fit_rows(name, full, target))


def load_hf_directory(model: nn.Module, path: str, prefix: str = "model.") -> None:
    """Load a Hugging Face safetensors directory into the local shards of ``model`` through
    ``torch.distributed.checkpoint`` and its ``HuggingFaceStorageReader``.

    Args:
        model: the materialised model; its keys are the directory's with ``prefix`` in front
            (``HFCausalLM`` holds the transformers model as ``self.model``).
        path: the directory written by ``save_pretrained``.
        prefix: the prefix of ``model``'s keys that the directory's keys lack.

    Tensors whose first dimension the vocabulary reconciliation cut (padded embeddings and
    lm_head) do not match the stored shape, which DCP refuses; their first rows are read from
    the safetensors file directly (memory-mapped, one tensor at a time).

    Raises:
        ValueError: for keys the directory lacks or shapes that do not match.
    """
    import torch.distributed.checkpoint as dcp

    try:
        from lightning_kd.parallel.hf_reader import TensorAtATimeReader
    except ImportError as error:  # torch without DCP's Hugging Face storage reader
        raise ValueError(
            f"sharded loading of the Hugging Face directory {path!r} needs "
            "torch.distributed.checkpoint.HuggingFaceStorageReader, which this torch "
            f"({torch.__version__}) lacks; upgrade torch or set sharded_loading=False."
        ) from error
    stored = TensorAtATimeReader(path).read_metadata().state_dict_metadata
    state: dict[str, Tensor] = {}
    restricted: dict[str, Tensor] = {}
    for name, target in _unique_state(model).items():
        if not name.startswith(prefix):
            raise ValueError(f"model key {name!r} does not start with {prefix!r}.")
        key = name[len(prefix) :]
        if key not in stored:
            raise ValueError(f"{path!r} holds no weight {key!r} (the model's {name!r}).")
        size = tuple(stored[key].size)
        if size == tuple(target.shape):
            state[key] = target
        else:
            _fit_rows(key, torch.empty(size, device="meta"), target)  # raises on a mismatch
            restricted[key] = target
    dcp.load(state, storage_reader=TensorAtATimeReader(path))
    if restricted:
        _load_leading_rows(path, restricted)


def _load_leading_rows(path: str, targets: dict[str, Tensor]) -> None:
    """Copy the first rows of the stored tensors ``targets`` names (restricted vocabularies)."""
    from safetensors import safe_open

    left = dict(targets)
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys = [k for k in left if k in handle.keys()]  # noqa: SIM118
        for key in keys:  # one handle per tensor, as TensorAtATimeReader
            target = left.pop(key)
            with safe_open(str(file), framework="pt") as handle:
                rows = handle.get_slice(key)[: target.shape[0]]
            _copy_local(target, _fit_rows(key, rows, target))
    if left:
        raise ValueError(f"{path!r} holds no weights {sorted(left)}.")


# --------------------------------------------------------------------------- buffers
def recompute_buffers(model: nn.Module) -> None:
    """Recompute the non-persistent buffers that ``to_empty`` left uninitialised, through the
    model contract: ``init_non_persistent_buffers()`` of every module that implements it
    (:class:`~lightning_kd.models.contract.SupportsBufferInit`; the outermost one of a nested
    pair covers its subtree, so an inner one is not called twice).

    Raises:
        ValueError: for non-persistent buffers in a module that neither implements the method
            nor sits inside one that does: nothing could recompute them.
    """
    _check_buffers_covered(model)
    for module in _buffer_owners(model):
        module.init_non_persistent_buffers()


def _buffer_owners(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``model`` (itself included) that implement the contract."""
    owners: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") or not outer for outer, _ in owners)
        if isinstance(module, SupportsBufferInit) and not inside:
            owners.append((name, module))
    return [module for _, module in owners]


def _check_buffers_covered(model: nn.Module) -> None:
    owners = {name for name, m in model.named_modules() if isinstance(m, SupportsBufferInit)}
    for name, module in model.named_modules():
        buffers = non_persistent_buffers(module)
        atoms = name.split(".") if name else []
        covering = {".".join(atoms[:i]) for i in range(len(atoms) + 1)} & owners
        if buffers and not covering:
            raise ValueError(
                f"cannot recompute the non-persistent buffers {sorted(buffers)} of "
                f"{name or 'the model'} ({type(module).__name__}) after sharded loading: "
                f"implement init_non_persistent_buffers() on {type(model).__name__} (see "
                "lightning_kd.models.contract.SupportsBufferInit; TinyLlama and HFCausalLM do)."
            )
