"""``DistillationModule``: a frozen teacher and a trainable student in one LightningModule.

The module builds both models (from instances or from factories, so large models need not be
materialised before ``configure_model``), parallelises them on the mesh of Lightning's
``ModelParallelStrategy`` (TP plans, FSDP2 over data parallel), runs the teacher under no-grad,
and feeds both logits to :class:`~lightning_kd.KDLoss`. Under TP the student's and teacher's
lm_heads return vocabulary-sharded DTensors that go straight into the loss, never gathered.

Loss accounting: ``compute_loss`` returns per-token means for the micro-batch. The module
back-propagates ``mean × tokens`` and, just before the optimizer step, rescales the gradients
by ``accumulate_grad_batches × dp_size / tokens_in_window`` (tokens counted over every
micro-batch of the accumulation window and every data-parallel rank). The result is exactly the
gradient of the per-token mean over the whole window, so ``accumulate_grad_batches=2`` with
batch b equals batch 2b, and data-parallel ranks with different numbers of valid tokens are
weighted correctly.

Override points for subclasses: :meth:`run_student`, :meth:`run_teacher`,
:meth:`compute_loss`, :meth:`tensor_parallel_plan`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.optim import Optimizer
from typing_extensions import override

from lightning_kd.cross_entropy import token_cross_entropy
from lightning_kd.grad_clip import clip_grad_norm
from lightning_kd.kd_loss import KDLoss
from lightning_kd.optim import build_optimizers, default_optimizer
from lightning_kd.parallelize import apply_fsdp, apply_tensor_parallel
from lightning_kd.parallelize import tensor_parallel_plan as default_tensor_parallel_plan

ModelOrFactory = Callable[[], nn.Module] | nn.Module


class LossTerms(NamedTuple):
    """What :meth:`DistillationModule.compute_loss` returns; every term is a per-token mean
    over the micro-batch's valid tokens (0-dim tensors).

    Attributes:
        loss: the total to optimise, ``(1 − kd_ratio)·ce + kd_ratio·kd`` plus any extra terms.
        kd_loss: KL(teacher ‖ student) per token (T²-scaled).
        ce_loss: cross-entropy of the student on the labels per token.
        per_token_kl: [*] detached per-token KL for logging callbacks (0 where ignored).
        valid_mask: [*] bool, True where the label is not ignored.
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor
    per_token_kl: Tensor
    valid_mask: Tensor


def logits_of(output: Any) -> Tensor:
    """Logits from a model output: a tensor, or an object/dict with ``logits`` (HF style)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(
        f"model output must be a logits tensor or have a `logits` field, got {type(output)}."
    )


def _build(model: ModelOrFactory, role: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise ValueError(f"the {role} factory must return an nn.Module, got {type(built)}.")
        return built
    raise ValueError(f"{role} must be an nn.Module or a callable returning one, got {model!r}.")


class DistillationModule(LightningModule):
    """Distil a frozen teacher into a trainable student.

    Batches are dicts with ``input_ids`` [B, S] int64 and ``labels`` [B, S] int64, where
    ``labels[b, t]`` is the target for position t (already shifted) or ``ignore_index``.

    Args:
        student: the model to train, or a zero-argument factory that builds it (called in
            ``configure_model``, so the CLI does not materialise it early).
        teacher: the frozen teacher, or a factory. Its parameters never require grad, it
            stays in eval mode, runs under no-grad and is never given to the optimizer.
        loss: the distillation loss; default ``KDLoss()``. Its ``ignore_index`` is also used
            for the cross-entropy term and token counting.
        kd_ratio: weight of the KD term: ``loss = (1 − kd_ratio)·CE + kd_ratio·KD``; 1.0 is
            pure distillation, 0.0 trains on labels alone (the baseline).
        optimizer: builds the optimizer from :meth:`trainable_parameters`, in
            ``configure_optimizers`` (after parallelisation); default AdamW(lr=1e-3).
        lr_scheduler: optional, builds a scheduler from the optimizer (stepped per step).
        teacher_checkpoint: path to the teacher's weights (a ``state_dict`` file, or a
            checkpoint dict with a ``state_dict`` entry), loaded before parallelisation.
        teacher_checkpoint_prefix: key prefix to strip from that state dict (e.g. ``"model."``
            for a Lightning checkpoint of a module that stored the model as ``self.model``).
        save_teacher: keep the teacher's weights in checkpoints (default False: the teacher
            is rebuilt from its own source on resume).
        student_tp_plan: explicit TP plan for the student; default the model's own
            ``tensor_parallel_plan(tp_size)``.
        teacher_tp_plan: likewise for the teacher.
        shared_vocab_size: distil over the first ``shared_vocab_size`` vocabulary entries
            when the two lm_heads have different widths (padded vocabularies). Default: the
            size of the tokenizer the models carry (``HFCausalLM`` from a local directory
            with a tokenizer; when both carry one they must be the same). Tokenizers that
            differ are refused before training.

    Raises:
        ValueError: for a ``kd_ratio`` outside [0, 1] or a missing teacher checkpoint.
    """

    def __init__(
        self,
        student: ModelOrFactory,
        teacher: ModelOrFactory,
        loss: KDLoss | None = None,
        kd_ratio: float = 1.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        teacher_checkpoint: str | None = None,
        teacher_checkpoint_prefix: str = "",
        save_teacher: bool = False,
        student_tp_plan: dict[str, ParallelStyle] | None = None,
        teacher_tp_plan: dict[str, ParallelStyle] | None = None,
        shared_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if not (0.0 <= kd_ratio <= 1.0):
            raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio!r}.")
        if teacher_checkpoint is not None and not Path(teacher_checkpoint).is_file():
            raise ValueError(f"teacher_checkpoint {teacher_checkpoint!r} is not a file.")
        self.kd_loss = loss if loss is not None else KDLoss()
        self.kd_ratio = float(kd_ratio)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_checkpoint_prefix = teacher_checkpoint_prefix
        self.save_teacher = save_teacher
        self._plans = {"student": student_tp_plan, "teacher": teacher_tp_plan}
        if shared_vocab_size is not None and shared_vocab_size < 1:
            raise ValueError(f"shared_vocab_size must be >= 1, got {shared_vocab_size!r}.")
        self.shared_vocab_size = shared_vocab_size
        self._factories: dict[str, Callable[[], nn.Module]] = {}
        for role, model in (("student", student), ("teacher", teacher)):
            if isinstance(model, nn.Module):
                setattr(self, role, model)
            else:
                setattr(self, role, None)
                self._factories[role] = model
        self._prepared = False  # built, teacher weights loaded, vocabularies reconciled
        self._parallelized = False
        self._window_tokens = 0
        self._step_start: float | None = None
        self._val_sums: Tensor | None = None
        if self.teacher is not None:
            self._freeze_teacher()
        self._register_state_dict_hook(DistillationModule._drop_teacher_state)
        self.register_load_state_dict_pre_hook(DistillationModule._restore_teacher_state)

    # ------------------------------------------------------------------ model setup
    def _freeze_teacher(self) -> None:
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def _load_teacher_weights(self) -> None:
        state = torch.load(self.teacher_checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        prefix = self.teacher_checkpoint_prefix
        if prefix:
            stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not stripped:
                raise ValueError(
                    f"no key of teacher_checkpoint {self.teacher_checkpoint!r} starts with "
                    f"teacher_checkpoint_prefix={prefix!r}; its keys start like "
                    f"{sorted(state)[:3]}."
                )
            state = stripped
        self.teacher.load_state_dict(state, strict=True)

    def _reconcile_vocabularies(self) -> None:
        """Refuse different tokenizers; restrict padded lm_heads to the shared vocabulary."""
        vocabs = [
            getattr(m, "tokenizer_vocab", lambda: None)() for m in (self.student, self.teacher)
        ]
        if all(v is not None for v in vocabs) and vocabs[0] != vocabs[1]:
            raise ValueError(
                "teacher and student use different tokenizers (their vocabularies differ); "
                "token-level distillation needs one shared tokenizer."
            )
        widths = [getattr(m, "vocab_size", None) for m in (self.student, self.teacher)]
        if None in widths or (widths[0] == widths[1] and self.shared_vocab_size is None):
            return
        shared = self.shared_vocab_size
        known = [v for v in vocabs if v is not None]
        if shared is None and known:  # either model's tokenizer (they agree when both exist)
            shared = len(known[0])
        if shared is None:
            raise ValueError(
                f"student and teacher lm_heads differ in width ({widths[0]} vs {widths[1]}); "
                "set shared_vocab_size to the size of their common tokenizer."
            )
        if shared > min(widths):
            raise ValueError(
                f"shared_vocab_size={shared} exceeds an lm_head width ({widths[0]}, {widths[1]})."
            )
        for role, model, width in zip(("student", "teacher"), (self.student, self.teacher),
                                      widths, strict=True):  # fmt: skip
            if width > shared:
                if not hasattr(model, "restrict_vocab"):
                    raise ValueError(
                        f"the {role} has {width} vocabulary rows but distillation uses "
                        f"{shared}; it needs a restrict_vocab(size) method to drop the rest."
                    )
                model.restrict_vocab(shared)

    def tensor_parallel_plan(self, model: nn.Module, role: str, tp_size: int) -> dict:
        """The TP plan for ``model`` (``role`` is ``"student"`` or ``"teacher"``). Default: the
        plan given to the constructor, else the model's own ``tensor_parallel_plan(tp_size)``.
        Override to plug in models that carry no plan."""
        return dict(default_tensor_parallel_plan(model, tp_size, self._plans[role]))

    @override
    def configure_model(self) -> None:
        """Build factories, load teacher weights, reconcile vocabularies, then apply TP and
        FSDP2 on the device mesh. Idempotent: Lightning may call it more than once (e.g.
        ``load_from_checkpoint``, or ``fit`` followed by ``validate``).

        ``DistillationModule.load_from_checkpoint(path, **kwargs)`` needs the constructor
        arguments passed again (models, ``teacher_checkpoint``, loss, ...): the checkpoint
        holds weights and loop state, not the configuration, and a load into a differently
        configured module warns (see :meth:`on_load_checkpoint`).
        """
        for role, factory in self._factories.items():
            if getattr(self, role) is None:
                setattr(self, role, _build(factory, role))
        if not self._prepared:  # once, mesh or not: a second load would hit a restricted head
            if self.teacher_checkpoint is not None:
                self._load_teacher_weights()
            self._reconcile_vocabularies()
            self._prepared = True
        self._freeze_teacher()  # also covers modules restrict_vocab created
        mesh = self._device_mesh
        if mesh is None or self._parallelized:
            return
        tp_mesh, dp_mesh = mesh["tensor_parallel"], mesh["data_parallel"]
        for role in ("teacher", "student"):
            model = getattr(self, role)
            if tp_mesh.size() > 1:
                apply_tensor_parallel(
                    model, tp_mesh, self.tensor_parallel_plan(model, role, tp_mesh.size())
                )
            if dp_mesh.size() > 1:
                apply_fsdp(model, dp_mesh, reshard_after_forward=True)
        if dp_mesh.size() > 1:
            # Trainable modules a subclass adds must stay in sync across replicas too.
            for extra in self._extra_trainable_modules():
                apply_fsdp(extra, dp_mesh)
        self._freeze_teacher()
        self._parallelized = True

    # ------------------------------------------------------------------ checkpoints
    def _settings(self) -> dict[str, Any]:
        """The run's configuration that a checkpoint records and a load checks (the models
        and callables are not stored: they are rebuilt from the constructor arguments)."""
        return {
            "kd_ratio": self.kd_ratio,
            "teacher_checkpoint": self.teacher_checkpoint,
            "teacher_checkpoint_prefix": self.teacher_checkpoint_prefix,
            "shared_vocab_size": self.shared_vocab_size,
            "temperature": getattr(self.kd_loss, "temperature", None),
            "ignore_index": getattr(self.kd_loss, "ignore_index", None),
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_kd"] = self._settings()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Warn when the module being loaded into is configured unlike the one that saved:
        e.g. ``load_from_checkpoint(path, student=..., teacher=...)`` without
        ``teacher_checkpoint`` would otherwise evaluate against a random teacher."""
        saved = checkpoint.get("lightning_kd")
        if not isinstance(saved, Mapping):
            return
        current = self._settings()
        changed = [
            f"{key}: saved {value!r}, now {current.get(key)!r}"
            for key, value in saved.items()
            if current.get(key) != value
        ]
        if changed:
            warnings.warn(
                "this DistillationModule is configured differently from the one that saved "
                "the checkpoint (" + "; ".join(changed) + "). Pass the same constructor "
                "arguments: the checkpoint holds weights and loop state, not the configuration"
                + ("" if self.save_teacher else ", and not the teacher's weights")
                + ".",
                stacklevel=2,
            )

    @override
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that requires grad outside the teacher: the student's, plus those of
        modules a subclass adds (e.g. a projection for a hidden-state loss)."""
        return [
            p for name, p in self.named_parameters()
            if p.requires_grad and not name.startswith("teacher.")
        ]  # fmt: skip

    def _extra_trainable_modules(self) -> list[nn.Module]:
        skip = {id(self.student), id(self.teacher), id(self.kd_loss)}
        return [
            m for m in self.children()
            if id(m) not in skip and any(p.requires_grad for p in m.parameters())
        ]  # fmt: skip

    @override
    def configure_optimizers(self) -> Any:
        return build_optimizers(
            self.trainable_parameters(), self.optimizer_factory, self.lr_scheduler_factory
        )

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _drop_teacher_state(module, state_dict, prefix, local_metadata) -> None:
        if module.save_teacher:
            return
        for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
            del state_dict[key]

    @staticmethod
    def _restore_teacher_state(module, state_dict, prefix, *args) -> None:
        # Checkpoints without the teacher load strictly: its current weights fill the gap.
        if module.teacher is None:
            return
        for key, value in module.teacher.state_dict(prefix=prefix + "teacher.").items():
            state_dict.setdefault(key, value)

    # ------------------------------------------------------------------ groups and helpers
    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The data-parallel process group (None without a mesh or outside distributed runs)."""
        mesh = self._device_mesh
        if mesh is not None:
            return mesh["data_parallel"].get_group()
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    def _dp_size(self) -> int:
        group = self.dp_group
        return dist.get_world_size(group) if group is not None else 1

    def _dp_sum(self, values: Tensor) -> Tensor:
        """Sum ``values`` over the data-parallel ranks, on the module's device (NCCL cannot
        reduce CPU tensors); returns a new tensor on that device."""
        group = self.dp_group
        if group is not None and dist.get_world_size(group) > 1:
            values = values.to(self.device, copy=True)
            dist.all_reduce(values, group=group)
        return values

    # ------------------------------------------------------------------ override points
    def run_student(self, batch: Mapping[str, Tensor]) -> Any:
        """The student's output on ``batch`` (logits [B, S, V] or an object with ``.logits``)."""
        return self.student(batch["input_ids"])

    def run_teacher(self, batch: Mapping[str, Tensor]) -> Any:
        """The teacher's output on ``batch``; called under ``torch.no_grad()``."""
        return self.teacher(batch["input_ids"])

    def compute_loss(
        self, student_output: Any, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> LossTerms:
        """Per-token mean losses of one micro-batch from the two models' outputs.

        Subclasses that add terms should return per-token means too (the module turns them
        into sums over the accumulation window).
        """
        labels = batch["labels"]
        student_logits, teacher_logits = logits_of(student_output), logits_of(teacher_output)
        kd = self.kd_loss(student_logits, teacher_logits, labels, return_per_token=True)
        tokens = max(int(kd.valid_mask.sum()), 1)
        ce = torch.zeros((), device=kd.loss.device)
        if self.kd_ratio < 1.0:
            ce = token_cross_entropy(student_logits, labels, self.kd_loss.ignore_index) / tokens
        loss = self.kd_ratio * kd.loss + (1.0 - self.kd_ratio) * ce
        return LossTerms(loss, kd.loss, ce, kd.per_token_kl, kd.valid_mask)

    # ------------------------------------------------------------------ steps
    def _forward_both(self, batch: Mapping[str, Tensor]) -> tuple[Any, Any]:
        with torch.no_grad():
            teacher_output = self.run_teacher(batch)
        return self.run_student(batch), teacher_output

    def _log_scalar(self, name: str, value: Tensor, **kwargs: Any) -> None:
        if isinstance(value, DTensor):
            value = value.full_tensor()
        self.log(name, value.detach().float(), sync_dist_group=self.dp_group, **kwargs)

    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Any]:
        if self._step_start is None:
            self._step_start = time.perf_counter()
        terms = self.compute_loss(*self._forward_both(batch), batch)
        tokens = int(terms.valid_mask.sum())
        self._window_tokens += tokens
        dp_sync = self._dp_size() > 1
        for name, value in (
            ("train/loss", terms.loss),
            ("train/kd_loss", terms.kd_loss),
            ("train/ce_loss", terms.ce_loss),
        ):
            self._log_scalar(name, value, prog_bar=name == "train/kd_loss", sync_dist=dp_sync)
        return {
            # Token sum: the window normalisation happens in on_before_optimizer_step.
            "loss": terms.loss * tokens,
            "per_token_kl": terms.per_token_kl,
            "valid_mask": terms.valid_mask,
        }

    @override
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Turn accumulated token sums into the per-token mean over the whole window and all
        data-parallel ranks (see the module docstring), and log tokens per second."""
        window = self._dp_sum(torch.tensor([float(self._window_tokens)]))[0].item()
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        scale = accumulate * self._dp_size() / max(window, 1.0)
        for p in self.trainable_parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        if self._step_start is not None:
            elapsed = max(time.perf_counter() - self._step_start, 1e-9)
            self.log("train/tokens_per_sec", window / elapsed, prog_bar=True)
        self._window_tokens = 0
        self._step_start = None

    @override
    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clipping that works with DTensor parameters on several meshes (Lightning's default
        ``clip_grad_norm_`` crashes on them)."""
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm in (None, "norm"):
            norm = clip_grad_norm(params, gradient_clip_val)
            self.log("train/grad_norm", norm)
        elif gradient_clip_algorithm == "value":
            for p in params:
                if p.grad is not None:
                    p.grad.clamp_(-gradient_clip_val, gradient_clip_val)
        else:
            raise ValueError(
                "gradient_clip_algorithm must be 'norm' or 'value', got "
                f"{gradient_clip_algorithm!r}."
            )

    def _eval_step(self, batch: Mapping[str, Tensor]) -> None:
        """Accumulate token sums of KL, student CE and teacher CE for the epoch's metrics."""
        student_output, teacher_output = self._forward_both(batch)
        labels, ignore = batch["labels"], self.kd_loss.ignore_index
        student_logits, teacher_logits = logits_of(student_output), logits_of(teacher_output)
        kd = self.kd_loss(student_logits, teacher_logits, labels, return_per_token=True)
        tokens = float(kd.valid_mask.sum())
        sums = torch.stack(
            [
                kd.loss.detach().float().cpu() * tokens,
                token_cross_entropy(student_logits, labels, ignore).detach().float().cpu(),
                token_cross_entropy(teacher_logits, labels, ignore).detach().float().cpu(),
                torch.tensor(tokens),
            ]
        )
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums

    def _log_eval_epoch(self, prefix: str) -> None:
        """Log per-token means over the epoch and all data-parallel ranks."""
        if self._val_sums is None:
            return
        kl, ce_student, ce_teacher, tokens = self._dp_sum(self._val_sums).tolist()
        tokens = max(tokens, 1.0)
        metrics = {
            "kd_loss": kl / tokens,
            "student_ce": ce_student / tokens,
            "teacher_ce": ce_teacher / tokens,
            "student_ppl": math.exp(min(ce_student / tokens, 50.0)),
            "teacher_ppl": math.exp(min(ce_teacher / tokens, 50.0)),
        }
        for name, value in metrics.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "kd_loss")
        self._val_sums = None

    @override
    def on_validation_epoch_start(self) -> None:
        self._val_sums = None

    @override
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    @override
    def on_test_epoch_start(self) -> None:
        self._val_sums = None

    @override
    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")
