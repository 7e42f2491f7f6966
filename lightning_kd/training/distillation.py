"""``DistillationModule``: a frozen teacher and a trainable student in one LightningModule.

The module composes small parts, each in its own file of :mod:`lightning_kd.training`:

- A teacher backend (:mod:`lightning_kd.training.teachers`: a live model, the same with the
  lm_heads fused into the loss, or a teacher cache) builds and places the teacher, hands the
  loss its output for a batch, computes the loss and the teacher's evaluation cross-entropy,
  and names the settings checkpoints record. The module never branches on the kind.
- A sequence source (:mod:`lightning_kd.training.sequences`) gives each step's batch (by
  default the data loader's, as is).
- :func:`~lightning_kd.parallel.pipeline.parallelize_model` applies, per model and in one
  order, the TP plan, the fused head's FSDP2 unit, activation checkpointing and compile, FSDP2
  (with a precision policy from the trainer) and sharded loading's materialisation on the mesh
  of Lightning's ``ModelParallelStrategy``; :mod:`lightning_kd.parallel.plans` checks that the
  logits are vocabulary-sharded DTensors under TP (they go to the loss unsharded).
- :class:`~lightning_kd.training.token_window.TokenWindow` makes the loss an exact per-token
  mean over each accumulation window and all data-parallel ranks.
- :func:`~lightning_kd.training.checkpoint_policy.teacher_free_checkpoints` keeps the teacher
  out of checkpoints and records the run's settings.
- :class:`~lightning_kd.training.eval_metrics.EvalSums` turns validation/test batches into
  per-token metrics computed with the training objective (:meth:`compute_loss`).

Override points for subclasses: :meth:`run_student`, :meth:`run_teacher`,
:meth:`compute_loss`, :meth:`tensor_parallel_plan`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.optim import Optimizer
from typing_extensions import override

from lightning_kd.checks import check_bool, check_unit_interval
from lightning_kd.losses.cross_tokenizer_loss import CrossTokenizerLoss
from lightning_kd.losses.kd_loss import KDLoss
from lightning_kd.models.lora import has_lora
from lightning_kd.parallel.fsdp import mixed_precision_policy, place_offloaded
from lightning_kd.parallel.grad_clip import clip_grad_norm
from lightning_kd.parallel.mesh import (
    DP_DIM,
    TP_DIM,
    data_parallel,
    data_parallel_group,
    tensor_parallel_size,
)
from lightning_kd.parallel.meta_init import WeightSource, build_on_meta
from lightning_kd.parallel.pipeline import parallelize_model
from lightning_kd.parallel.plans import check_vocab_parallel_logits, resolve_tensor_parallel_plan
from lightning_kd.training.checkpoint_policy import (
    FROZEN_DIGEST_KEY,
    check_frozen_digest,
    check_settings,
    frozen_digest,
    record_settings,
    teacher_free_checkpoints,
    trainable_only_checkpoints,
)
from lightning_kd.training.eval_metrics import EvalSums
from lightning_kd.training.hidden_state_loss import HiddenStateLoss
from lightning_kd.training.loss_terms import LossTerms, find_logits, logits_of
from lightning_kd.training.memory_estimate import estimate_run_memory
from lightning_kd.training.module_args import resolve_loss
from lightning_kd.training.on_policy import OnPolicySequences
from lightning_kd.training.optim import build_optimizers, default_optimizer
from lightning_kd.training.sequences import DataLoaderSequences, SequenceSource
from lightning_kd.training.teacher import ModelOrFactory, TeacherSource, build_model, freeze
from lightning_kd.training.teachers import TeacherBackend, select_teacher
from lightning_kd.training.teachers.cross_tokenizer import match_loss
from lightning_kd.training.token_window import TokenWindow

__all__ = ["DistillationModule", "LossTerms", "logits_of"]


class DistillationModule(LightningModule):
    """Distil a frozen teacher into a trainable student.

    Batches are dicts with ``input_ids`` [B, S] int64 and ``labels`` [B, S] int64, where
    ``labels[b, t]`` is the target for position t (already shifted) or ``ignore_index``, and
    optionally ``position_ids`` [B, S] int64 for several documents packed in a row (restarting
    at 0 at each document; passed to both models, which must keep the documents apart, see
    :class:`~lightning_kd.models.contract.SupportsPackedSequences`).

    Args:
        student: the model to train, or a zero-argument factory that builds it (called in
            ``configure_model``, so the CLI does not materialise it early).
        teacher: the frozen teacher, or a factory. Its parameters never require grad, it
            stays in eval mode, runs under no-grad and is never given to the optimizer. None
            with ``teacher_cache``.
        loss: the distillation loss; default ``KDLoss()`` (forward KL). It owns the whole
            objective: the divergence, the temperature and ``kd_ratio``, the mix
            ``kd_ratio·divergence + (1 − kd_ratio)·CE`` computed in one bounded pass (see
            :class:`~lightning_kd.KDLoss`). Its ``ignore_index`` also drives token counting.
        kd_ratio: a shortcut for the loss's ``kd_ratio`` (weight of the divergence; 1.0 is pure
            distillation, 0.0 trains on labels alone, the baseline). With ``loss`` unset it
            builds ``KDLoss(kd_ratio=kd_ratio)``; with ``loss`` set it must be unset (None) or
            equal to ``loss.kd_ratio``: the loss is the one source of truth for the mix. (A
            0.1-style module value with a loss left at 1.0 is still taken, with a
            DeprecationWarning.)
        optimizer: builds the optimizer from :meth:`trainable_parameters`, in
            ``configure_optimizers`` (after parallelisation); default AdamW(lr=1e-3).
        lr_scheduler: optional, builds a scheduler from the optimizer (stepped per step).
        teacher_checkpoint: path to the teacher's weights (a ``state_dict`` file, a checkpoint
            dict with a ``state_dict`` entry, or a distributed checkpoint directory as
            ``ModelParallelStrategy`` saves, read through DCP), loaded before parallelisation
            (or, with ``sharded_loading``, into each rank's shards after it).
        teacher_checkpoint_prefix: key prefix to strip from that state dict (e.g. ``"model."``
            for a Lightning checkpoint of a module that stored the model as ``self.model``).
        save_teacher: keep the teacher's weights in checkpoints (default False: the teacher
            is rebuilt from its own source on resume).
        student_tp_plan: explicit TP plan for the student; default the model's own
            ``tensor_parallel_plan(tp_size)``. A tied lm_head is untied (or refused) whatever
            the plan's source.
        teacher_tp_plan: likewise for the teacher.
        fused_head: compute the loss from both models' final hidden states and lm_head weights
            (:class:`~lightning_kd.losses.LinearKDLoss`, with the loss's settings) instead of
            from their logits: no ``[N, V]`` logits, logit gradient or teacher logits exist at
            any time. Needs models that implement ``hidden_states`` and ``output_head``
            (:class:`~lightning_kd.models.contract.SupportsFusedHead`; TinyLlama and
            HFCausalLM do). Works with TP, FSDP2 and both; ``run_student``/``run_teacher``
            then return :class:`~lightning_kd.training.fused_head.FusedHeadOutput`.
        teacher_cache: train from a teacher cache written by ``lightning-kd cache-teacher``
            instead of a live teacher (then ``teacher=None``): no teacher is built; batches
            must carry ``index`` (as TextDataModule and ChatDataModule do) and the cache must
            match the run (vocabulary, temperature, tokenizer, data: checked on first use,
            ``ValueError`` naming what differs). Exact caches (``top_k=0``) go through the
            loss itself; top-k caches through :class:`~lightning_kd.losses.TopKKDLoss`.
        shared_vocab_size: distil over the first ``shared_vocab_size`` vocabulary entries
            when the two lm_heads have different widths (padded vocabularies). Default: the
            size of the tokenizer the models carry (``HFCausalLM`` from a local directory
            with a tokenizer; when both carry one they must be the same). Tokenizers that
            differ are refused before training.
        activation_checkpointing: recompute each of the student's transformer blocks
            (``fsdp_units()``) in backward instead of keeping its activations
            (``torch.utils.checkpoint``, non-reentrant; applied after TP, before FSDP2; the
            teacher runs under no-grad and is left alone). Same loss and gradients, less
            activation memory, about one more block forward per step. State-dict keys are
            unchanged: checkpoints load with or without it
            (:mod:`lightning_kd.parallel.block_wrappers`).
        compile: ``torch.compile`` each block of both models in place (after TP and
            activation checkpointing, before FSDP2; keys unchanged). ``ValueError`` at
            ``configure_model`` when this platform cannot compile (e.g. no C++ compiler).
        teacher_offload: keep the frozen teacher's parameters in host memory and stream them
            to the device one block at a time (FSDP2's ``CPUOffloadPolicy``, applied to the
            teacher on the data-parallel mesh even when its size is 1). Cost: a host-to-device
            copy of the teacher's weights (its local shard) on every forward. Needs Lightning's
            ``ModelParallelStrategy`` (a device mesh); ``ValueError`` without one.
        sharded_loading: with a device mesh, build the models that are loaded from weights
            (the teacher from ``teacher_checkpoint`` or an ``HFCausalLM`` ``pretrained_path``,
            likewise a student) on the meta device, apply TP and FSDP2 there, then allocate
            only each rank's shards and read only their slices (Hugging Face directories
            through DCP's ``HuggingFaceStorageReader``, a ``torch.save`` file memory-mapped);
            see :mod:`lightning_kd.parallel.meta_init`. Randomly initialised models are built
            in full as without it (same weights for every layout). No effect without a mesh.
        teacher_backend: another kind of teacher, instead of ``teacher`` / ``teacher_cache``
            (a :class:`~lightning_kd.training.teachers.TeacherBackend`; see that module for how
            to write one).
        on_policy: on-policy distillation: the student's (or the teacher's) samples as the
            completions of the training batches (:class:`~lightning_kd.training.on_policy.
            OnPolicySequences`; sets :attr:`sequence_source`). Refused with a teacher cache.
        hidden_state_loss: intermediate-layer distillation: a
            :class:`~lightning_kd.training.hidden_state_loss.HiddenStateLoss` term (pairs of
            student/teacher blocks, a distance, a weight, learned projections when the widths
            differ) added to the logit loss; needs a teacher model (not a teacher cache). Its
            projections train with the student and are saved in checkpoints (not in exports).

    Attributes:
        loss: the distillation loss (``kd_loss`` is its deprecated name).
        teacher_backend: the kind of teacher (chosen from the arguments above).
        sequence_source: gives each step's batch (default: the data loader's, as is; see
            :mod:`lightning_kd.training.sequences`). Assign another before fitting.

    A per-device memory estimate (:mod:`lightning_kd.training.memory_estimate`) is printed on
    rank 0 before the first training step.

    Raises:
        ValueError: for a ``kd_ratio`` outside [0, 1] or one that contradicts the loss's, a
            missing teacher checkpoint, a non-positive ``shared_vocab_size``, both or neither
            of ``teacher``, ``teacher_cache`` and ``teacher_backend``, a missing or malformed
            teacher cache (or a top-k one with another divergence than forward KL),
            ``fused_head`` with a teacher cache, a loss that is not a ``KDLoss``, a flag
            that is not a bool, or ``on_policy`` with a teacher cache.
    """

    def __init__(
        self,
        student: ModelOrFactory,
        teacher: ModelOrFactory | None = None,
        loss: KDLoss | CrossTokenizerLoss | None = None,
        kd_ratio: float | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        teacher_checkpoint: str | None = None,
        teacher_checkpoint_prefix: str = "",
        save_teacher: bool = False,
        student_tp_plan: dict[str, ParallelStyle] | None = None,
        teacher_tp_plan: dict[str, ParallelStyle] | None = None,
        shared_vocab_size: int | None = None,
        fused_head: bool = False,
        teacher_cache: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        teacher_offload: bool = False,
        sharded_loading: bool = False,
        teacher_backend: TeacherBackend | None = None,
        on_policy: OnPolicySequences | None = None,
        hidden_state_loss: HiddenStateLoss | None = None,
    ) -> None:
        super().__init__()
        check_bool("fused_head", fused_head)
        if hidden_state_loss is not None and not isinstance(hidden_state_loss, HiddenStateLoss):
            raise ValueError(
                "hidden_state_loss must be a HiddenStateLoss (lightning_kd.training."
                f"hidden_state_loss), got {type(hidden_state_loss).__name__}."
            )
        if hidden_state_loss is not None and teacher_cache is not None:
            raise ValueError(
                "hidden_state_loss compares the teacher's intermediate hidden states; a teacher "
                "cache holds only its logits. Use a live teacher (teacher=) with it."
            )
        self.activation_checkpointing = check_bool(
            "activation_checkpointing", activation_checkpointing
        )
        self.compile_each_block = check_bool("compile", compile)
        self.teacher_offload = check_bool("teacher_offload", teacher_offload)
        self.sharded_loading = check_bool("sharded_loading", sharded_loading)
        self._weight_sources: dict[str, WeightSource] = {}  # role -> source, until materialised
        self._memory_reported = False
        self._described = False
        if shared_vocab_size is not None and shared_vocab_size < 1:
            raise ValueError(f"shared_vocab_size must be >= 1, got {shared_vocab_size!r}.")
        # The teacher arguments, kept to switch fused_head later (see its setter).
        self._select_teacher = functools.partial(
            select_teacher, teacher, teacher_cache, teacher_checkpoint,
            teacher_checkpoint_prefix, teacher_backend=teacher_backend,
        )  # fmt: skip
        backend = self._select_teacher(fused_head=fused_head)
        self.teacher_cache = teacher_cache
        self.loss = resolve_loss(loss, kd_ratio)
        self._use_backend(backend)
        if on_policy is not None:
            if isinstance(self.loss, CrossTokenizerLoss):
                raise ValueError(
                    "on_policy with a cross-tokenizer loss is not supported: the sampled "
                    "completions would need re-tokenising for the teacher."
                )
            OnPolicySequences.check_teacher(backend)
        self.hidden_state_loss = hidden_state_loss
        self.sequence_source: SequenceSource = on_policy or DataLoaderSequences()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.save_teacher = save_teacher
        self.shared_vocab_size = shared_vocab_size
        self._plans = {"student": student_tp_plan, "teacher": teacher_tp_plan}
        self._student_factory = None if isinstance(student, nn.Module) else student
        self.student = student if isinstance(student, nn.Module) else None
        self.teacher = teacher if isinstance(teacher, nn.Module) else None
        if self.teacher is not None:
            freeze(self.teacher)
        self._prepared = False  # built, teacher weights loaded, vocabularies reconciled
        self._parallelized = False
        self._window = TokenWindow()
        self._eval = EvalSums()
        self._step_start: float | None = None
        teacher_free_checkpoints(self, "teacher")
        trainable_only_checkpoints(self, "student")  # a LoRA student: adapters, not its base

    def _use_backend(self, backend: TeacherBackend) -> None:
        """Make ``backend`` the teacher backend (a live teacher with its own tokenizer when the
        loss is a cross-tokenizer loss); it builds its loss objects once, here."""
        backend = match_loss(backend, self.loss)
        backend.setup(self.loss)
        self.teacher_backend = backend

    @property
    def kd_loss(self) -> KDLoss:
        """Deprecated name of :attr:`loss` (the loss object; ``kd_loss`` names the divergence
        term in :class:`LossTerms` and the logged metric). Removed in 0.4."""
        return self.loss

    @property
    def kd_ratio(self) -> float:
        """The loss's ``kd_ratio`` (weight of the divergence in the objective); assigning it
        sets the loss's (checked to be in [0, 1]), e.g. from a callback that anneals it. The
        losses the teacher backend derived from it follow."""
        return self.loss.kd_ratio

    @kd_ratio.setter
    def kd_ratio(self, value: float) -> None:
        self.loss.kd_ratio = check_unit_interval("kd_ratio", value)

    @property
    def fused_head(self) -> bool:
        """Whether the loss reads both models' hidden states and heads instead of logits.
        Assigning it switches between the live and the fused-head teacher (the teacher-cache
        writer turns it off to read the teacher's logits); set it before ``configure_model``.
        """
        return self.teacher_backend.fused_head

    @fused_head.setter
    def fused_head(self, value: bool) -> None:
        if check_bool("fused_head", value) != self.fused_head:
            backend = self._select_teacher(fused_head=value)
            if backend.fused_head != value:  # a teacher_backend of the user's: it is what it is
                raise ValueError(
                    f"fused_head={value} but the {type(backend).__name__} teacher backend has "
                    f"fused_head={backend.fused_head} and cannot switch; expected a teacher= or "
                    "teacher_cache= run (their backends switch)."
                )
            self._use_backend(backend)

    @property
    def teacher_source(self) -> TeacherSource | None:
        """Where the teacher model comes from (None for a teacher without a model)."""
        return self.teacher_backend.source

    @property
    def teacher_checkpoint(self) -> str | None:
        source = self.teacher_source
        return source.checkpoint if source is not None else None

    @property
    def teacher_checkpoint_prefix(self) -> str:
        source = self.teacher_source
        return source.checkpoint_prefix if source is not None else ""

    @property
    def student_factory(self) -> ModelOrFactory | None:
        """The zero-argument factory the student is built from (None when given built)."""
        return self._student_factory

    def export_model(self, build: bool = False) -> tuple[nn.Module | None, str]:
        """(the student, ``"student."``: its key prefix in checkpoints), for export.

        Args:
            build: build the student from its factory when it is not built yet (on CPU; the
                teacher is not built).
        """
        if self.student is None and build:
            return build_model(self._student_factory, "student"), "student."
        return self.student, "student."

    # ------------------------------------------------------------------ model setup
    def tensor_parallel_plan(self, model: nn.Module, role: str, tp_size: int) -> dict:
        """The TP plan for ``model`` (``role`` is ``"student"`` or ``"teacher"``). Default: the
        plan given to the constructor, else the model's own ``tensor_parallel_plan(tp_size)``.
        Override to plug in models that carry no plan."""
        return resolve_tensor_parallel_plan(model, tp_size, self._plans[role])

    @override
    def configure_model(self) -> None:
        """Build the models, load teacher weights, reconcile vocabularies, then apply TP and
        FSDP2 on the device mesh. Idempotent: Lightning may call it more than once (e.g.
        ``load_from_checkpoint``, or ``fit`` followed by ``validate``).

        ``DistillationModule.load_from_checkpoint(path, **kwargs)`` needs the constructor
        arguments passed again (models, ``teacher_checkpoint``, loss, ...): the checkpoint
        holds weights and loop state, not the configuration, and a load into a differently
        configured module warns (see :meth:`on_load_checkpoint`).
        """
        if self.student is None:
            self.student = self._build_on_meta("student", self._student_factory)
            if self.student is None:
                self.student = build_model(self._student_factory, "student")
        if not self._prepared:  # once, mesh or not: a second load would hit a restricted head
            self.teacher = self.teacher_backend.build(
                self.student, self.shared_vocab_size, self._build_on_meta
            )
            self._prepared = True
        if self.teacher is not None:
            freeze(self.teacher)  # also covers modules restrict_vocab created
        self.teacher_backend.prepare(self)  # fail early, before any parallelisation
        if self.hidden_state_loss is not None:
            if self.teacher is None:
                raise ValueError(
                    f"hidden_state_loss needs a teacher model; the "
                    f"{type(self.teacher_backend).__name__} teacher backend has none."
                )
            self.hidden_state_loss.attach(self.student, self.teacher)  # before parallelisation
        mesh = self.device_mesh
        if mesh is None and self.teacher_offload and self.teacher is not None:
            raise ValueError(
                "teacher_offload=True streams the teacher with FSDP2 and needs Lightning's "
                "ModelParallelStrategy (a device mesh); this run has none."
            )
        if self._parallelized:
            return
        for role in ("teacher", "student"):  # without a mesh: block options only (idempotent)
            self._parallelize(role)
        if mesh is None:
            return
        dp_mesh = mesh[DP_DIM]
        if dp_mesh.size() > 1:
            # Trainable modules a subclass adds must stay in sync across replicas too.
            policy = mixed_precision_policy(self.trainer.precision, trainable=True)
            for extra in self._extra_trainable_modules():
                parallelize_model(extra, dp_mesh=dp_mesh, fsdp=True, mp_policy=policy)
        if self.teacher is not None:
            freeze(self.teacher)
        self._parallelized = True

    def _parallelize(self, role: str) -> None:
        """The ``role`` model through :func:`~lightning_kd.parallel.pipeline.parallelize_model`
        on the device mesh (without one: activation checkpointing and compile only): its TP
        plan, fused-head owner, block options, FSDP2 with the trainer's precision (and CPU
        offload for the teacher with ``teacher_offload``), then materialisation of a meta-built
        model (``sharded_loading``)."""
        model = getattr(self, role)
        if model is None:  # trained from a teacher cache
            return
        mesh = self.device_mesh
        tp_mesh = None if mesh is None else mesh[TP_DIM]
        dp_mesh = None if mesh is None else mesh[DP_DIM]
        tp_size = 1 if tp_mesh is None else tp_mesh.size()
        offload = self.teacher_offload and role == "teacher"
        fsdp = dp_mesh is not None and (dp_mesh.size() > 1 or offload)
        parallelize_model(
            model,
            tp_mesh=tp_mesh,
            dp_mesh=dp_mesh,
            plan=self.tensor_parallel_plan(model, role, tp_size) if tp_size > 1 else None,
            head_owner=lambda m: self._own_unit(role, m),  # after TP, which may untie a head
            activation_checkpointing=self.activation_checkpointing and role == "student",
            compile=self.compile_each_block,
            fsdp=fsdp,
            mp_policy=(
                mixed_precision_policy(self.trainer.precision, trainable=role == "student")
                if fsdp
                else None
            ),
            offload=offload,
            weights=self._weight_sources.pop(role, None),  # sharded loading: local shards
            device=None if mesh is None else self.trainer.strategy.root_device,
        )
        if fsdp:
            self.teacher_backend.after_fsdp(role, model)

    def _own_unit(self, role: str, model: nn.Module) -> nn.Module | None:
        """The submodule the teacher backend wants as an FSDP2 unit of its own (the fused
        head's owner), asked once TP has run; None for none."""
        units = self.teacher_backend.place(role, model)
        if len(units) > 1:
            raise ValueError(
                f"{type(self.teacher_backend).__name__}.place returned {len(units)} modules for "
                f"the {role}; the pipeline shards at most one extra unit per model."
            )
        return units[0] if units else None

    def _build_on_meta(self, role: str, model: ModelOrFactory, *source: Any) -> nn.Module | None:
        """With ``sharded_loading`` and a mesh: the ``role`` model built on the meta device when
        it is loaded from weights (its source kept for :func:`materialize`), else None."""
        if not self.sharded_loading or self.device_mesh is None:
            return None
        built = build_on_meta(model, role, *source)
        if built is None:
            return None
        self._weight_sources[role] = built[1]
        return built[0]

    def _place_offloaded_teacher(self) -> None:
        """With ``teacher_offload``: the teacher's parameters back in host memory after the
        strategy moved the module to its device (see :func:`place_offloaded`). Called from
        ``on_fit_start`` / ``on_validation_start`` / ``on_test_start`` / ``on_predict_start``:
        a subclass overriding those must call ``super()``."""
        if self.teacher_offload and self.teacher is not None:
            place_offloaded(self.teacher, self.device)

    def _describe_teacher(self) -> None:
        """Print the teacher backend's description once (rank 0), when a run first starts."""
        if not self._described:
            self._described = True
            rank_zero_info(self.teacher_backend.describe())

    @override
    def on_fit_start(self) -> None:
        self._place_offloaded_teacher()
        self._describe_teacher()

    @override
    def on_validation_start(self) -> None:
        self._place_offloaded_teacher()
        self._describe_teacher()

    @override
    def on_test_start(self) -> None:
        self._place_offloaded_teacher()
        self._describe_teacher()

    @override
    def on_predict_start(self) -> None:
        self._place_offloaded_teacher()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Print the per-device memory estimate (rank 0) before the first training step."""
        if not self._memory_reported:
            self._memory_reported = True
            estimate = estimate_run_memory(self, batch)
            if estimate is not None:
                rank_zero_info(estimate.table())

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Let the teacher backend act at the step boundary (e.g. stop on a failed prefetch)."""
        self.teacher_backend.after_train_batch(self)

    def _models(self) -> list[tuple[str, nn.Module]]:
        """``(role, model)`` of the models built so far (a teacher cache has no teacher)."""
        models = ((role, getattr(self, role)) for role in ("student", "teacher"))
        return [(role, model) for role, model in models if model is not None]

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
        skip = {id(self.student), id(self.teacher), id(self.loss)}  # the projections stay
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
    def _settings(self) -> dict[str, Any]:
        """The run's configuration that a checkpoint records and a load checks."""
        options = self.loss.options
        return {
            "kd_ratio": self.kd_ratio,
            **self.teacher_backend.settings(),
            "shared_vocab_size": self.shared_vocab_size,
            "temperature": options.temperature,
            "divergence": repr(options.divergence),
            "ignore_index": options.ignore_index,
            # Only when set: checkpoints of runs without it record (and compare) nothing new.
            **(
                {"hidden_state_loss": self.hidden_state_loss.settings()}
                if self.hidden_state_loss is not None
                else {}
            ),
        }

    @property
    def drop_frozen_student(self) -> bool:
        """Whether checkpoints leave out the student's frozen parameters: a LoRA student
        (``lora`` option) saves its adapters (and whatever else trains), not its base, which
        is rebuilt from its own source on resume and checked against a digest."""
        return self.student is not None and has_lora(self.student)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record_settings(checkpoint, self._settings())
        if self.drop_frozen_student:
            checkpoint[FROZEN_DIGEST_KEY] = frozen_digest(self.student)
        if hasattr(self.sequence_source, "state_dict"):  # e.g. on-policy draws: resume them
            checkpoint["sequence_source"] = self.sequence_source.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Warn when the module being loaded into is configured unlike the one that saved."""
        check_settings(checkpoint, self._settings(), teacher_saved=self.save_teacher)
        if FROZEN_DIGEST_KEY in checkpoint and self.drop_frozen_student:
            check_frozen_digest(checkpoint[FROZEN_DIGEST_KEY], frozen_digest(self.student))
        if "sequence_source" in checkpoint and hasattr(self.sequence_source, "load_state_dict"):
            self.sequence_source.load_state_dict(checkpoint["sequence_source"])

    # ------------------------------------------------------------------ groups
    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The data-parallel process group (None without a mesh outside distributed runs)."""
        return data_parallel_group(self.device_mesh)

    # ------------------------------------------------------------------ override points
    def run_student(self, batch: Mapping[str, Tensor]) -> Any:
        """The student's output on ``batch`` (logits [B, S, V] or an object with ``.logits``;
        with ``fused_head`` a :class:`FusedHeadOutput`), from the teacher backend."""
        return self.teacher_backend.run_student(self, batch)

    def run_teacher(self, batch: Mapping[str, Tensor]) -> Any:
        """The teacher's output on ``batch``; called under ``torch.no_grad()``. With a
        ``teacher_cache``, the cached rows of the batch (a ``CachedTeacher``)."""
        return self.teacher_backend.run_teacher(self, batch)

    def compute_loss(
        self, student_output: Any, teacher_output: Any, batch: Mapping[str, Tensor]
    ) -> LossTerms:
        """Per-token mean losses of one micro-batch from the two models' outputs; the one
        objective of training, validation and test.

        The teacher backend's loss computes the mix, the divergence, the student's
        cross-entropy and the per-token divergence in one bounded pass (no ``[N, V]`` fp32
        copy of the logits). Subclasses that add terms should return per-token means too (the
        module turns them into sums over the accumulation window).
        """
        out = self.teacher_backend.loss(student_output, teacher_output, batch)
        terms = LossTerms(out.loss, out.div_loss, out.ce_loss, out.per_token_div, out.valid_mask)
        if self.hidden_state_loss is None:
            return terms
        student_hidden, teacher_hidden = self.hidden_state_loss.collect()
        valid = batch["labels"] != self.loss.ignore_index
        # Called as a module: under FSDP2 its hooks gather the projections (and the hidden
        # states pass through its arguments, so their gradients are hooked too).
        hidden = self.hidden_state_loss(student_hidden, teacher_hidden, valid)
        extra = {"hidden_loss": hidden.loss.detach()}
        extra.update({f"hidden/{name}": value for name, value in hidden.pairs.items()})
        return terms._replace(loss=terms.loss + hidden.loss, extra=extra)

    # ------------------------------------------------------------------ steps
    def _forward_both(self, batch: Mapping[str, Tensor]) -> tuple[Any, Any]:
        with torch.no_grad():
            teacher_output = self.run_teacher(batch)
        student_output = self.run_student(batch)
        tp_size = tensor_parallel_size(self.device_mesh)
        tp_group = self.loss.tp_group
        for role, output in (("student", student_output), ("teacher", teacher_output)):
            logits = find_logits(output)
            if logits is not None:
                check_vocab_parallel_logits(logits, getattr(self, role), role, tp_size, tp_group)
        return student_output, teacher_output

    def _log_scalar(self, name: str, value: Tensor, **kwargs: Any) -> None:
        if isinstance(value, DTensor):
            value = value.full_tensor()
        self.log(name, value.detach().float(), sync_dist_group=self.dp_group, **kwargs)

    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Any]:
        if self._step_start is None:
            self._step_start = time.perf_counter()
        batch = self.sequence_source(self, batch, "train")
        terms = self.compute_loss(*self._forward_both(batch), batch)
        tokens = int(terms.valid_mask.sum())
        self._window.add(tokens)
        dp_sync = data_parallel(self.device_mesh).sync
        for name, value in (
            ("train/loss", terms.loss),
            ("train/kd_loss", terms.kd_loss),
            ("train/ce_loss", terms.ce_loss),
        ):
            self._log_scalar(name, value, prog_bar=name == "train/kd_loss", sync_dist=dp_sync)
        for name, value in (terms.extra or {}).items():
            self._log_scalar(f"train/{name}", value, sync_dist=dp_sync)
        return {
            # Token sum: the window normalisation happens in on_before_optimizer_step.
            "loss": terms.loss * tokens,
            "per_token_div": terms.per_token_div,
            "valid_mask": terms.valid_mask,
        }

    @override
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Turn accumulated token sums into the per-token mean over the whole window and all
        data-parallel ranks (see :mod:`lightning_kd.training.token_window`), and log tokens
        per second."""
        scale, window = self._window.close(
            self.trainer.accumulate_grad_batches, self.dp_group, self.device
        )
        for p in self.trainable_parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        if self._step_start is not None:
            elapsed = max(time.perf_counter() - self._step_start, 1e-9)
            self.log("train/tokens_per_sec", window / elapsed, prog_bar=True)
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

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Mapping[str, Tensor], stage: str) -> None:
        """One evaluation batch: the training objective plus both models' cross-entropy (the
        student's from :meth:`compute_loss`, the teacher's from the teacher backend, None when
        it does not know it)."""
        batch = self.sequence_source(self, batch, stage)
        student_output, teacher_output = self._forward_both(batch)
        terms = self.compute_loss(student_output, teacher_output, batch)
        tokens = int(terms.valid_mask.sum())
        teacher_ce = self.teacher_backend.teacher_cross_entropy(teacher_output, batch)
        self._eval.add(
            _plain(terms.loss),
            _plain(terms.kd_loss),
            _plain(terms.ce_loss) * tokens,
            None if teacher_ce is None else _plain(teacher_ce),
            tokens,
        )

    def _log_eval_epoch(self, prefix: str) -> None:
        """Log per-token means over the epoch and all data-parallel ranks (every rank calls
        the reduction, with or without batches)."""
        group = self.dp_group
        for name, value in self._eval.compute(group, self.device).items():
            # Already reduced: the sync only tells Lightning so (the mean of equal values).
            self.log(f"{prefix}/{name}", value, prog_bar=name == "kd_loss",
                     sync_dist=group is not None, sync_dist_group=group)  # fmt: skip

    def _start_eval_epoch(self) -> None:
        self._eval = EvalSums()

    # Validation and test share one implementation; only the metric prefix differs.
    on_validation_epoch_start = on_test_epoch_start = _start_eval_epoch

    @override
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")


def _plain(value: Tensor) -> Tensor:
    """A detached plain tensor (DTensor scalars gathered)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach()
