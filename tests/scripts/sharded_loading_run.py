"""A small distillation run with a teacher loaded from weights, with or without sharded loading
(``DistillationModule(sharded_loading=...)``), for ``tests/test_sharded_loading.py`` and
``benchmarks/sharded_loading.py``. Run as a script: Lightning's ModelParallelStrategy launches
the other ranks by re-running it.

``--make-teacher DIR`` writes the teacher's weights instead (a ``torch.save`` file
``DIR/teacher.pt`` for ``--teacher tiny``, a distributed checkpoint directory
``DIR/teacher.ckpt`` as ModelParallelStrategy writes one, keys ``state_dict.model.*``, for
``--teacher tiny-dcp``, a ``save_pretrained`` directory ``DIR/hf`` for ``--teacher hf``) and
exits. Otherwise rank 0 writes a JSON file with the per-step losses, a
digest of the teacher's weights after loading and every rank's peak resident memory when
training starts (loading and sharding done) and at the end. ``--cases FILE`` runs several such
runs in turn in one launch (:mod:`tests.helpers.runs`; the memory peaks then mean little).
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.cli import shutdown_distributed
from lightning_kd.parallel import pipeline
from tests.helpers.distributed import exit_now
from tests.helpers.runs import run_cases
from tests.scripts.fit_run import VOCAB, LossRecorder, RandomTokens


def hf_config(hidden: int, layers: int, vocab: int, heads: int = 4) -> dict:
    """A small Llama config (untied head)."""
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=(8 * hidden) // 3 // 16 * 16 or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=64, tie_word_embeddings=False,
                initializer_range=0.2)  # fmt: skip


def tiny_teacher(vocab: int, tied: bool = False) -> TinyLlama:
    return TinyLlama(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     hidden_dim=64, init_std=0.3, tie_embeddings=tied)  # fmt: skip


def make_teacher(args: argparse.Namespace) -> None:
    out = Path(args.make_teacher)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    if args.teacher == "tiny":
        torch.save(tiny_teacher(args.teacher_vocab, args.tied).state_dict(), out / "teacher.pt")
        return
    if args.teacher == "tiny-dcp":
        import torch.distributed.checkpoint as dcp

        state = {
            f"model.{k}": v
            for k, v in tiny_teacher(args.teacher_vocab, args.tied).state_dict().items()
        }
        dcp.save({"state_dict": state}, checkpoint_id=str(out / "teacher.ckpt"), no_dist=True)
        torch.save({"global_step": 0}, out / "teacher.ckpt" / "meta.pt")
        return
    from lightning_kd.models.hf import HFCausalLM

    config = hf_config(args.hf_hidden, args.hf_layers, args.teacher_vocab)
    HFCausalLM(config=config).model.save_pretrained(out / "hf")


def digest(model: torch.nn.Module) -> float:
    total = 0.0
    for value in model.state_dict().values():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        total += float(full.double().abs().sum())
    return total


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StartPeak(Callback):
    """The peak resident memory (MiB) when training starts: loading and sharding done, no
    step run yet."""

    def __init__(self) -> None:
        self.peak_mib = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.peak_mib = peak_rss_mib()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--source", help="the directory --make-teacher wrote")
    parser.add_argument("--make-teacher", default=None)
    parser.add_argument("--teacher", default="tiny", choices=("tiny", "tiny-dcp", "hf"))
    parser.add_argument("--teacher-vocab", type=int, default=VOCAB)
    parser.add_argument("--hf-hidden", type=int, default=32)
    parser.add_argument("--hf-layers", type=int, default=2)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--tied", action="store_true", help="a tiny teacher with a tied head")
    parser.add_argument("--teacher-offload", action="store_true")
    parser.add_argument("--compile", action="store_true", help="compile each block")
    parser.add_argument("--fused-head", action="store_true")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """``--make-teacher``, or one fit whose result rank 0 writes to ``args.out``."""
    if args.make_teacher:
        make_teacher(args)
        return

    materialized: list[str] = []  # which models sharded loading materialised
    real_materialize = pipeline.materialize

    def recording_materialize(model, device, weights):
        materialized.append(type(model).__name__)
        real_materialize(model, device, weights)

    pipeline.materialize = recording_materialize
    try:
        fit(args, materialized)
    finally:
        pipeline.materialize = real_materialize


def fit(args: argparse.Namespace, materialized: list[str]) -> None:
    L.seed_everything(0, verbose=False)
    source = Path(args.source)
    checkpoint, prefix = None, ""
    if args.teacher in ("tiny", "tiny-dcp"):
        checkpoint = str(source / "teacher.pt")
        if args.teacher == "tiny-dcp":
            checkpoint, prefix = str(source / "teacher.ckpt"), "model."
        vocab = args.teacher_vocab

        def teacher() -> TinyLlama:
            return tiny_teacher(vocab, args.tied)

        student = TinyLlama(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                            hidden_dim=32, init_std=0.1)  # fmt: skip
    else:
        from lightning_kd.models.hf import HFCausalLM

        def teacher() -> HFCausalLM:
            return HFCausalLM(pretrained_path=str(source / "hf"))

        student = HFCausalLM(config=hf_config(16, 1, VOCAB, heads=2))
    module = DistillationModule(
        student,
        teacher,
        loss=KDLoss(chunk_size=5, temperature=2.0, kd_ratio=0.7),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        teacher_checkpoint=checkpoint,
        teacher_checkpoint_prefix=prefix,
        shared_vocab_size=VOCAB if args.teacher_vocab != VOCAB else None,
        sharded_loading=args.sharded,
        teacher_offload=args.teacher_offload,
        compile=args.compile,
        fused_head=args.fused_head,
    )
    recorder = LossRecorder()
    start = StartPeak()
    strategy = ModelParallelStrategy(data_parallel_size=args.dp, tensor_parallel_size=args.tp)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[recorder, start],
        deterministic=True,
    )  # fmt: skip
    dataset = RandomTokens()
    sampler = None
    if args.devices == 1:
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    trainer.fit(module, DataLoader(dataset, batch_size=4, sampler=sampler))

    peaks = [[start.peak_mib, peak_rss_mib()]]
    if dist.is_initialized():
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, [start.peak_mib, peak_rss_mib()])
    teacher_digest = digest(module.teacher)
    if trainer.global_rank == 0:
        result = {
            "losses": recorder.losses,
            "teacher_digest": teacher_digest,
            "start_peak_rss_mib": [p[0] for p in peaks],
            "peak_rss_mib": [p[1] for p in peaks],
            "materialized": materialized,
            "teacher_numel": sum(p.numel() for p in module.teacher.parameters()),
        }
        Path(args.out).write_text(json.dumps(result))


def main() -> None:
    run_cases(parse, run)  # one run, or several (--cases) in this launch
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_now(0)  # see tests/helpers/distributed.py: no gloo teardown abort after success
