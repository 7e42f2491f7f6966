"""Writing a teacher cache: run the config's teacher over every sequence of each split.

:func:`write_teacher_cache` runs inside ``trainer.predict`` so that the teacher is built and
parallelised exactly as in training (``DistillationModule.configure_model`` under the
trainer's strategy: TP plans, FSDP2, precision). The work is cut into shards of
``shard_size`` consecutive sequences (:mod:`.format`); in each *round* every data-parallel
replica takes one shard (replica ``r`` takes the ``r``-th of the round), so the shards, and
their bytes, do not depend on the number of processes. Among the tensor-parallel ranks of a
replica only the first writes. All ranks run the same number of teacher forwards per round
(replicas with less to do run throw-away forwards), which FSDP2's collectives require.

Restarting the same command continues an interrupted cache: at the start of each round the
replicas agree (one all-reduce) which of the round's shards are already complete, i.e. exist,
carry the same settings and pass their checksums, and skip them. Shards are renamed into place
whole, so a killed writer never leaves a half shard that counts. ``metadata.json`` is written
by global rank 0 once the teacher's vocabulary size is known (before any shard), with
``complete: false``, and rewritten with ``complete: true`` when every shard is there; a
restart with other settings (k, temperature, data, teacher, ...) is a ``ValueError``.

A served teacher (a backend with ``fetch(input_ids) -> (ids, logprobs)`` and ``top_k``, e.g.
:class:`~lightning_kd.training.teachers.ServedTeacher`) is cached the same way, from its top-k:
the ids as served, the log-probabilities within the codec's rounding, and the tail log-mass
implied by the top-k (``log(1 − Σ P_i)``; a server gives no more). ``top_k`` must be at most the
served k and not 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from lightning_kd.io import ensure_writable_dir, sha256_file
from lightning_kd.losses.topk_buckets import implied_tail_logprob
from lightning_kd.losses.vocab_parallel import find_vocab_tp_group
from lightning_kd.models.outputs import logits_of
from lightning_kd.parallel.mesh import TP_DIM, data_parallel
from lightning_kd.teacher_cache.codec import EXACT_CODEC, TOPK_CODEC, encode_exact, encode_topk
from lightning_kd.teacher_cache.fingerprint import data_fingerprint
from lightning_kd.teacher_cache.format import (
    FORMAT_VERSION,
    METADATA_FILENAME,
    CacheMetadata,
    atomic_write,
    encode_shard,
    read_metadata,
    read_record,
    read_shard_header,
    shard_path,
    write_metadata,
)
from lightning_kd.teacher_cache.topk import exact_logprobs, topk_with_tail

#: Test hook: a writer process raises :class:`CacheWriteInterrupted` after writing this many
#: shards (simulates a job killed between shards).
STOP_AFTER_ENV = "LIGHTNING_KD_CACHE_STOP_AFTER_SHARDS"
SPLITS = ("train", "val")
_COMPARED = ("format_version", "teacher", "tokenizer", "temperature", "top_k", "splits",
             "seq_len", "num_sequences", "shard_size", "codec", "ignore_index")  # fmt: skip


class CacheWriteInterrupted(RuntimeError):
    """Raised by the :data:`STOP_AFTER_ENV` test hook."""


@dataclass(frozen=True)
class _Plan:
    """What the writer will write (everything but the vocabulary size, known after a forward)."""

    output_dir: Path
    datasets: dict[str, Dataset]
    batch_size: int
    metadata: CacheMetadata  # vocab_size 0 until known

    def shards(self, split: str) -> list[tuple[int, int, int]]:
        """``(shard, first, count)`` for each shard of ``split``."""
        total, size = self.metadata.num_sequences[split], self.metadata.shard_size
        return [(j, j * size, min(size, total - j * size)) for j in range(math.ceil(total / size))]

    def shard_fields(self, split: str, shard: int, first: int, count: int) -> dict[str, Any]:
        meta = self.metadata
        return {"split": split, "shard": shard, "first": first, "count": count,
                "codec": meta.codec, "top_k": meta.top_k, "vocab_size": meta.vocab_size,
                "temperature": meta.temperature, "fingerprint": meta.splits[split]}  # fmt: skip


def _differences(cached: CacheMetadata, wanted: CacheMetadata, vocab_known: bool) -> list[str]:
    names = _COMPARED + (("vocab_size",) if vocab_known else ())
    return [f"{name}: cache {getattr(cached, name)!r}, run {getattr(wanted, name)!r}"
            for name in names if getattr(cached, name) != getattr(wanted, name)]  # fmt: skip


def _check_existing(plan: _Plan, vocab_known: bool) -> CacheMetadata | None:
    """The metadata already in ``output_dir`` if it matches the plan, else a ValueError."""
    path = plan.output_dir / METADATA_FILENAME
    if not path.is_file():
        return None
    cached = read_metadata(plan.output_dir)
    problems = _differences(cached, plan.metadata, vocab_known)
    if problems:
        raise ValueError(
            f"{plan.output_dir} holds a teacher cache written with other settings: "
            f"{'; '.join(problems)}. Use another --output_dir, or delete it to start over."
        )
    return cached


def _shard_complete(plan: _Plan, split: str, shard: int, first: int, count: int) -> bool:
    """Whether the shard exists with this plan's settings and passes every checksum."""
    path = shard_path(plan.output_dir, split, shard)
    if not path.is_file():
        return False
    try:
        header = read_shard_header(path)
        expected = plan.shard_fields(split, shard, first, count)
        if any(header.fields.get(name) != value for name, value in expected.items()):
            raise ValueError(f"corrupt shard {path}: written with other settings.")
        for position in range(count):
            read_record(header, position)
    except (ValueError, KeyError, json.JSONDecodeError) as error:
        warnings.warn(f"rewriting {path}: {error}", stacklevel=2)
        return False
    return True


def _collate(items: Sequence[Mapping[str, Any]], device: torch.device) -> dict[str, Tensor]:
    first = items[0]
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]).to(device)
            for key in first if isinstance(first[key], Tensor)}  # fmt: skip


class _Rounds(IterableDataset):
    """Yields ``{"split", "round", "shards": [[shard, first, count], ...]}``: one shard per
    data-parallel replica per round. The replica count is read when iteration starts (after
    the strategy has set up the mesh)."""

    def __init__(self, plan: _Plan, module: LightningModule) -> None:
        self.plan, self.module = plan, module

    def __iter__(self) -> Iterator[dict[str, Any]]:
        replicas = data_parallel(self.module.device_mesh).size
        for split in self.plan.datasets:
            shards = self.plan.shards(split)
            for r in range(0, len(shards), replicas):
                yield {"split": split, "round": r // replicas,
                       "shards": [list(s) for s in shards[r : r + replicas]]}  # fmt: skip


class _Runner:
    """The ``predict_step`` the writer installs on the module for the duration of predict."""

    def __init__(self, plan: _Plan, module: LightningModule, trainer: Trainer) -> None:
        self.plan, self.module, self.trainer = plan, module, trainer
        self.started = False
        self.written = 0
        self.stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
        self.progress: tqdm | None = None

    # ---------------------------------------------------------------- topology
    def _ranks(self) -> tuple[int, int, bool]:
        """(data-parallel rank, size, whether this rank writes: TP rank 0)."""
        mesh = self.module.device_mesh
        dp = data_parallel(mesh)
        tp_rank = mesh[TP_DIM].get_local_rank() if mesh is not None else 0
        return dp.rank, dp.size, tp_rank == 0

    @property
    def _served(self) -> Any:
        """The module's served teacher backend (one with ``fetch``), or None."""
        backend = getattr(self.module, "teacher_backend", None)
        return backend if callable(getattr(backend, "fetch", None)) else None

    def _teacher(self, batch: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return logits_of(self.module.run_teacher(batch))

    # ---------------------------------------------------------------- start
    def _start(self, split: str) -> None:
        """First step, on every rank: learn V from a forward, then write or check the
        metadata (global rank 0 writes; every rank checks after a barrier)."""
        item = self.plan.datasets[split][0]
        if self._served is not None:
            vocab_size = int(self._served.served_vocab)  # connected in configure_model
        else:
            vocab_size = int(self._teacher(_collate([item], self.module.device)).shape[-1])
        meta = replace(self.plan.metadata, vocab_size=vocab_size)
        if meta.top_k > meta.vocab_size:
            raise ValueError(
                f"top_k={meta.top_k} exceeds the teacher's vocabulary ({meta.vocab_size}); "
                "use top_k <= V, or 0 for the exact distribution."
            )
        self.plan = replace(self.plan, metadata=meta)
        existing = _check_existing(self.plan, True)  # every rank: the same error everywhere
        self.trainer.strategy.barrier()
        if self.trainer.global_rank == 0 and existing is None:
            write_metadata(self.plan.output_dir, meta)
        self.trainer.strategy.barrier()
        if self.trainer.global_rank == 0:
            total = sum(meta.num_sequences[s] for s in self.plan.datasets)
            self.progress = tqdm(total=total, desc="Caching the teacher", unit=" seq")
        self.started = True

    # ---------------------------------------------------------------- one round
    def step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        split, shards = batch["split"], [tuple(int(v) for v in s) for s in batch["shards"]]
        if not self.started:
            self._start(split)
        dp_rank, dp_size, writes = self._ranks()
        mine = shards[dp_rank] if dp_rank < len(shards) else None
        todo = torch.zeros(dp_size, dtype=torch.int64, device=self.module.device)
        if mine is not None and not _shard_complete(self.plan, split, *mine):
            todo[dp_rank] = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(todo, op=dist.ReduceOp.MAX)  # TP ranks agree; replicas learn
        todo = todo.tolist()
        if self.progress is not None:
            self.progress.update(sum(count for (_, _, count) in shards))
        bs = self.plan.batch_size
        rounds = max((math.ceil(shards[r][2] / bs) for r in range(len(shards)) if todo[r]),
                     default=0)  # fmt: skip
        if rounds == 0:
            return
        dataset = self.plan.datasets[split]
        records: list[bytes] = []
        num_valid: list[int] = []
        work = mine if todo[dp_rank] else None
        for step in range(rounds):
            if work is not None and step * bs < work[2]:
                begin = work[1] + step * bs
                end = min(work[1] + work[2], begin + bs)
                batch_data = _collate([dataset[i] for i in range(begin, end)], self.module.device)
                counts, new = self._encode(batch_data, writes)
                num_valid += counts
                records += new
            elif dp_size > 1 and self._served is None:  # keep FSDP2's collectives in step
                self._teacher(_collate([dataset[0]], self.module.device))
        if work is not None and writes:
            fields = self.plan.shard_fields(split, *work)
            data = encode_shard({**fields, "num_valid": num_valid}, records)
            atomic_write(shard_path(self.plan.output_dir, split, work[0]), data)
            self.written += 1
            if self.stop_after and self.written >= self.stop_after:
                raise CacheWriteInterrupted(
                    f"stopped after {self.written} shards ({STOP_AFTER_ENV})"
                )

    def _encode(self, batch: Mapping[str, Tensor], writes: bool) -> tuple[list[int], list[bytes]]:
        """Per sequence of the micro-batch: its number of valid tokens and its record."""
        meta = self.plan.metadata
        valid = batch["labels"] != meta.ignore_index
        counts = valid.sum(dim=1).tolist()
        if self._served is not None:
            ids, logprobs = self._served.fetch(batch["input_ids"])
            ids, logprobs = (
                ids[valid.cpu()][:, : meta.top_k],
                logprobs[valid.cpu()][:, : meta.top_k],
            )
            tail = implied_tail_logprob(logprobs).float()
            parts = zip(ids.split(counts), logprobs.split(counts), tail.split(counts), strict=True)
            records = [encode_topk(i, v, meta.vocab_size, t) for i, v, t in parts] if writes else []
            return counts, records
        logits = self._teacher(batch)
        if meta.top_k == 0:
            full = logits.full_tensor() if isinstance(logits, DTensor) else logits
            logprobs = exact_logprobs(full[valid], meta.temperature)
            records = [encode_exact(part) for part in logprobs.split(counts)] if writes else []
            return counts, records
        group = find_vocab_tp_group(logits)
        if isinstance(logits, DTensor):
            logits = logits.to_local() if group is not None else logits.full_tensor()
        ids, logprobs, tail = topk_with_tail(logits[valid], meta.top_k, meta.temperature, group)
        if not writes:
            return counts, []
        parts = zip(ids.split(counts), logprobs.split(counts), tail.split(counts), strict=True)
        records = [encode_topk(i, v, meta.vocab_size, t) for i, v, t in parts]
        return counts, records


def describe_tokenizer(datamodule: Any) -> str:
    """What ``metadata.tokenizer`` records (and a training run compares): the repr of the data
    module's ``tokenizer``, or ``"unknown"`` for a data module without one."""
    tokenizer = getattr(datamodule, "tokenizer", None)
    return repr(tokenizer) if tokenizer is not None else "unknown"


def describe_teacher(module: LightningModule, config: Any = None) -> str:
    """A description of the teacher for ``metadata.teacher``: the SHA-256 of its config (when
    given, e.g. the CLI's ``model.init_args.teacher``) and its checkpoint path and digest."""
    parts = []
    if config is not None:
        as_dict = config.as_dict() if hasattr(config, "as_dict") else config
        text = json.dumps(as_dict, sort_keys=True, default=str)
        parts.append(f"config sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}")
    backend = getattr(module, "teacher_backend", None)
    if callable(getattr(backend, "fetch", None)):
        parts.append(backend.describe())  # type: ignore[union-attr]
    source = getattr(module, "teacher_source", None)
    checkpoint = getattr(source, "checkpoint", None)
    if checkpoint:
        parts.append(f"checkpoint {os.path.abspath(checkpoint)} "
                     f"sha256:{sha256_file(checkpoint)[:16]}")  # fmt: skip
    if not parts:
        parts.append(
            f"{type(getattr(module, 'teacher', None)).__name__} (no config, no checkpoint)"
        )
    return "; ".join(parts)


def write_teacher_cache(
    module: LightningModule,
    datamodule: LightningDataModule,
    trainer: Trainer,
    output_dir: str | os.PathLike[str],
    top_k: int,
    splits: Sequence[str] = SPLITS,
    *,
    shard_size: int = 64,
    batch_size: int | None = None,
    teacher: str | None = None,
) -> CacheMetadata:
    """Run ``module``'s teacher over every sequence of ``splits`` and cache its distribution.

    Args:
        module: a :class:`~lightning_kd.DistillationModule` (anything with ``run_teacher``,
            ``kd_loss.temperature`` and ``kd_loss.ignore_index``); it is built and parallelised
            by ``trainer.predict`` through its ``configure_model``.
        datamodule: provides ``train_dataset`` / ``val_dataset`` (map-style, items with
            ``input_ids`` and ``labels`` [S], maybe ``position_ids``).
        trainer: runs the teacher under its strategy (any number of processes, TP/DP).
        output_dir: the cache directory (created; an interrupted cache there is continued).
        top_k: entries per token, or 0 for the exact full distribution (fp32).
        splits: which of ``"train"``, ``"val"`` to cache.
        shard_size: sequences per shard file.
        batch_size: sequences per teacher forward; default the data module's ``batch_size``.
        teacher: the description recorded in the metadata; default :func:`describe_teacher`.

    Returns:
        The metadata of the complete cache.

    Raises:
        ValueError: for bad arguments, a split the data module lacks, ``top_k`` above the
            vocabulary, an existing cache in ``output_dir`` written with other settings, or
            an ``output_dir`` that is a file, lies under one or cannot be written.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: the exact distribution), got {top_k!r}.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}.")
    splits = list(dict.fromkeys(splits))
    unknown = [s for s in splits if s not in SPLITS]
    if not splits or unknown:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits!r}.")
    ensure_writable_dir(output_dir, "teacher cache output_dir")  # one line naming it
    backend = getattr(module, "teacher_backend", None)
    served = callable(getattr(backend, "fetch", None))
    if served and not 0 < top_k <= backend.top_k:  # type: ignore[union-attr]
        raise ValueError(
            f"a served teacher gives its top-{backend.top_k} only: cache it with "  # type: ignore[union-attr]
            f"0 < top_k <= {backend.top_k}, got top_k={top_k}."  # type: ignore[union-attr]
        )
    if getattr(module, "teacher_cache", None) is not None or (
        backend is not None and backend.source is None and not served
    ):
        raise ValueError(
            "the config has no teacher model in this process (a teacher cache, or a teacher "
            "backend without a model); caching needs the live teacher: set teacher (and "
            "teacher_checkpoint) instead."
        )
    loss = getattr(module, "loss", None)
    if getattr(loss, "cross_tokenizer", False):
        raise ValueError(
            f"teacher caches do not support cross-tokenizer distillation ({type(loss).__name__}): "
            "a cache holds the teacher's distribution per student token, and with its own "
            "tokenizer the teacher predicts other tokens. Distil from the live teacher instead "
            "(run fit with teacher=, without cache-teacher)."
        )
    if loss is None or not hasattr(module, "run_teacher"):
        raise ValueError(f"{type(module).__name__} has no teacher and loss to cache (expected a "
                         "DistillationModule).")  # fmt: skip
    datasets = {}
    for split in splits:
        dataset = getattr(datamodule, f"{split}_dataset", None)
        if dataset is None:
            raise ValueError(f"{type(datamodule).__name__} has no {split}_dataset to cache.")
        datasets[split] = dataset
    nonempty = [s for s in splits if len(datasets[s]) > 0]
    if not nonempty:
        raise ValueError(f"the splits {splits} hold no sequences: nothing to cache.")
    batch_size = batch_size or int(getattr(datamodule, "batch_size", 8))
    first = datasets[nonempty[0]][0]
    seq_len = int(getattr(datamodule, "seq_len", len(first["input_ids"])))
    metadata = CacheMetadata(
        format_version=FORMAT_VERSION,
        teacher=teacher if teacher is not None else describe_teacher(module),
        vocab_size=0,
        tokenizer=describe_tokenizer(datamodule),
        temperature=float(loss.temperature),
        top_k=top_k,
        splits={split: data_fingerprint(datasets[split]) for split in splits},
        seq_len=seq_len,
        num_sequences={split: len(datasets[split]) for split in splits},
        shard_size=shard_size,
        codec=TOPK_CODEC if top_k else EXACT_CODEC,
        ignore_index=int(loss.ignore_index),
    )
    plan = _Plan(Path(output_dir), {s: datasets[s] for s in nonempty}, batch_size, metadata)
    _check_existing(plan, vocab_known=False)  # fail before launching anything
    runner = _Runner(plan, module, trainer)
    fused = getattr(module, "fused_head", False)
    module.fused_head = False  # the writer needs the teacher's logits
    module.predict_step = runner.step  # type: ignore[method-assign]
    try:
        loader = DataLoader(_Rounds(plan, module), batch_size=None)
        with warnings.catch_warnings():  # the step writes shards; it returns nothing on purpose
            warnings.filterwarnings("ignore", message="predict returned None")
            trainer.predict(module, dataloaders=loader, return_predictions=False)
    finally:
        del module.predict_step
        module.fused_head = fused
        if runner.progress is not None:
            runner.progress.close()
    trainer.strategy.barrier()
    final = replace(runner.plan.metadata, complete=True)
    if trainer.global_rank == 0:
        for split in nonempty:
            for shard in plan.shards(split):
                read_shard_header(shard_path(plan.output_dir, split, shard[0]))
        write_metadata(plan.output_dir, final)
    trainer.strategy.barrier()
    return final
