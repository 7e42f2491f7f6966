"""A small distillation run used by the multi-process module tests (run as a script, because
Lightning's ModelParallelStrategy launches the other ranks by re-running the script). With
``--cases FILE`` one launch runs several such fits in turn (:mod:`tests.helpers.runs`).

Writes a JSON file (rank 0) with the per-step KD losses, the student's final weights digest,
whether the teacher stayed bit-identical, and what the loss saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor, Shard
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.cli import shutdown_distributed
from lightning_kd.training.distillation import logits_of
from lightning_kd.training.hidden_state_loss import HiddenStateLoss
from tests.helpers.distributed import exit_now
from tests.helpers.runs import run_cases

VOCAB, SEQ, SAMPLES = 37, 12, 48


class RandomTokens(Dataset):
    """Fixed random token sequences; a few labels ignored at the start of each sequence."""

    def __init__(self, samples: int = SAMPLES, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (samples, SEQ + 1), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i, 1:].clone()
        labels[:2] = -100
        return {"input_ids": self.ids[i, :-1], "labels": labels}


def make_hf_models(family: str, teacher_vocab: int = VOCAB, seed: int = 0, lora=None):
    """Tiny random Hugging Face models of ``family`` (llama, qwen2, ...), untied heads."""
    from lightning_kd.models.hf import HFCausalLM

    def config(hidden: int, layers: int, vocab: int) -> dict:
        return dict(model_type=family, vocab_size=vocab, hidden_size=hidden,
                    intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=False, initializer_range=0.2)  # fmt: skip

    torch.manual_seed(seed)
    teacher = HFCausalLM(config=config(32, 2, teacher_vocab))
    student = HFCausalLM(config=config(16, 1, VOCAB), lora=lora)
    return student, teacher


def make_models(seed: int = 0, lora: dict | None = None) -> tuple[TinyLlama, TinyLlama]:
    torch.manual_seed(seed)
    teacher = TinyLlama(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        hidden_dim=64, init_std=0.3)  # fmt: skip
    student = TinyLlama(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                        hidden_dim=32, init_std=0.1, lora=lora)  # fmt: skip
    return student, teacher


class CheckedModule(DistillationModule):
    """Records whether the logits reaching KDLoss were vocab-sharded DTensors."""

    saw_sharded: bool | None = None

    def compute_loss(self, student_output, teacher_output, batch):
        if self.fused_head:  # no logits at all: nothing to record
            return super().compute_loss(student_output, teacher_output, batch)
        logits = logits_of(student_output)
        sharded = isinstance(logits, DTensor) and any(
            isinstance(p, Shard) and p.dim == logits.ndim - 1 for p in logits.placements
        )
        self.saw_sharded = sharded if self.saw_sharded is None else self.saw_sharded and sharded
        return super().compute_loss(student_output, teacher_output, batch)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.hidden_losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.losses.append(float(trainer.callback_metrics["train/kd_loss"]))
            if "train/hidden_loss" in trainer.callback_metrics:
                self.hidden_losses.append(float(trainer.callback_metrics["train/hidden_loss"]))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--kd-ratio", type=float, default=0.7)
    parser.add_argument("--chunk-size", type=int, default=5)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--save-student", default=None, help="torch.save the full student here")
    parser.add_argument("--family", default="tiny", help="tiny (TinyLlama) or an HF model_type")
    parser.add_argument("--teacher-vocab", type=int, default=VOCAB, help="HF teacher lm_head")
    parser.add_argument("--fused-head", action="store_true", help="DistillationModule(fused_head)")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--tie-student", action="store_true", help="tied student lm_head")
    parser.add_argument("--hidden", default=None, help="a HiddenStateLoss with this distance")
    parser.add_argument("--lora", type=int, default=0, help="a LoRA student of this rank")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """One fit; rank 0 writes its result to ``args.out``."""
    L.seed_everything(0, verbose=False)
    if args.family == "tiny":
        student, teacher = make_models(lora={"rank": args.lora} if args.lora else None)
        if args.tie_student:  # the lm_head shares the embedding (FSDP2: one unit with the root)
            torch.manual_seed(0)
            student = TinyLlama(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                hidden_dim=32, init_std=0.1, tie_embeddings=True)  # fmt: skip
    else:
        lora = {"rank": args.lora, "target_modules": ["q_proj", "o_proj"]} if args.lora else None
        student, teacher = make_hf_models(args.family, args.teacher_vocab, lora=lora)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = CheckedModule(
        student,
        teacher,
        loss=KDLoss(
            chunk_size=args.chunk_size,
            temperature=2.0,
            kd_ratio=args.kd_ratio,
            divergence=args.divergence,
        ),
        fused_head=args.fused_head,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        shared_vocab_size=VOCAB if args.teacher_vocab != VOCAB else None,
        hidden_state_loss=(
            None if args.hidden is None else HiddenStateLoss(distance=args.hidden, weight=0.5)
        ),
    )
    strategy = "auto"
    if args.devices > 1:
        strategy = ModelParallelStrategy(data_parallel_size=args.dp, tensor_parallel_size=args.tp)
    recorder = LossRecorder()
    callbacks = [recorder]
    if args.ckpt_dir:
        callbacks.append(
            ModelCheckpoint(args.ckpt_dir, every_n_train_steps=args.ckpt_every, save_top_k=-1)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        precision=args.precision,
        logger=False,
        enable_checkpointing=bool(args.ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        deterministic=True,
    )
    dataset = RandomTokens(args.samples)
    sampler = None
    if args.devices == 1:
        # Lightning injects DistributedSampler(shuffle=True, seed=0) over the data-parallel
        # ranks in distributed runs; the same sampler here gives the same global batches.
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    trainer.fit(module, loader, ckpt_path=args.resume)

    teacher_state = module.teacher.state_dict()
    teacher_same = all(
        torch.equal(
            (v.full_tensor() if isinstance(v, DTensor) else v).cpu(),
            teacher_before[k][: v.shape[0]].cpu(),  # a padded vocabulary may be restricted
        )
        for k, v in teacher_state.items()
    )
    student_state = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
        for k, v in module.student.state_dict().items()
    }
    if args.save_student and trainer.global_rank == 0:
        torch.save(student_state, args.save_student)
    if module.hidden_state_loss is not None:  # its projections train with the student
        student_state.update({
            f"hidden.{k}": (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in module.hidden_state_loss.state_dict().items()
        })  # fmt: skip
    student_sum = sum(float(v.double().abs().sum()) for v in student_state.values())
    if trainer.global_rank == 0:
        result = {
            "losses": recorder.losses,
            "hidden_losses": recorder.hidden_losses,
            "teacher_unchanged": teacher_same,
            "teacher_requires_grad": any(p.requires_grad for p in module.teacher.parameters()),
            "teacher_training": module.teacher.training,
            "saw_sharded": module.saw_sharded,
            "student_abs_sum": student_sum,
            "global_step": trainer.global_step,
            "trainable": sorted(n for n, p in module.student.named_parameters() if p.requires_grad),
        }
        Path(args.out).write_text(json.dumps(result))


def main() -> None:
    run_cases(parse, run)  # one fit, or several (--cases) in this launch
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_now(0)  # see tests/helpers/distributed.py: no gloo teardown abort after success
