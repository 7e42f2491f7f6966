"""On-policy distillation (GKD): the student learns on completions it samples itself.

:class:`OnPolicySequences` is a :mod:`sequence source <lightning_kd.training.sequences>`: on
every training micro-batch it keeps the prompts (the tokens up to the first supervised label)
and, with probability ``lmbda``, replaces the completions by the student's samples; otherwise,
with ``seq_kd=True``, by the teacher's samples; otherwise the dataset's completions stay. The
loss then runs over the completion tokens only, with the loss's divergence and temperature
(TRL's GKD default is JSD with beta 0.5, the on-policy recipe's reverse KL). Validation and
test batches are the data loader's (held-out data, comparable between runs).

Reproducibility: the lmbda draw and the samples come from counter-based seeds, a function of
``seed``, the number of training micro-batches seen so far (``calls``) and, for the samples,
the data-parallel rank. ``calls`` is recorded in checkpoints (:meth:`state_dict`), so a resumed
run draws what an uninterrupted one would. Every rank makes the same lmbda draw (under FSDP2 all
data-parallel ranks must generate together); TP ranks of one replica draw the same tokens.

``kd_ratio < 1`` is refused with ``lmbda > 0``: the cross-entropy term would train the student
towards its own samples (self-reinforcement, not distillation). With ``lmbda = 0`` it is
allowed: on teacher samples (``seq_kd``) it is sequence-level KD's cross-entropy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_kd.checks import check_bool, check_int, check_unit_interval
from lightning_kd.parallel.mesh import data_parallel
from lightning_kd.rollout import Rollout, SamplingOptions, generate
from lightning_kd.training.teachers import CacheTeacher
from lightning_kd.training.vllm_rollouts import VLLMRollouts

if TYPE_CHECKING:
    from lightning_kd.training.distillation import DistillationModule

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def counter_seed(seed: int, calls: int, stream: int) -> int:
    """A 63-bit seed from (seed, call counter, stream): distinct streams and steps get
    unrelated seeds, and the same triple always the same one."""
    value = (seed * _MIX[0] + calls * _MIX[1] + stream * _MIX[2]) % (1 << 64)
    value ^= value >> 31
    return (value * _MIX[1]) % (1 << 63)


class OnPolicySequences:
    """Student (or teacher) samples as the completions to distil on.

    Args:
        lmbda: probability per training micro-batch that the completions are the student's
            samples (TRL's ``lmbda``; 1.0: always on-policy, 0.0: never).
        seq_kd: the other batches use the teacher's samples instead of the dataset's.
        max_new_tokens: most tokens sampled per prompt.
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling threshold (1.0: off).
        top_k: sample among the k most likely tokens (0: off).
        seed: seed of the lmbda draw and of the samples.
        eos_token_id: a completion ends after this token (masked and padded after it). None:
            the data module's tokenizer's EOS when it has one, else none.
        pad_token_id: token filling the rows after their end. None: the data module's
            tokenizer's padding id when it has one, else 0.
        vllm: sample the student's completions from a vLLM server that follows its weights
            (:class:`~lightning_kd.training.vllm_rollouts.VLLMRollouts`) instead of in process;
            teacher samples (``seq_kd``) stay in process.

    Raises:
        ValueError: for ``lmbda`` outside [0, 1], bad sampling options, a negative seed, and
            (on first use) a teacher cache, ``kd_ratio < 1`` with ``lmbda > 0``, packed rows
            or a row without a supervised label.
    """

    def __init__(
        self,
        lmbda: float = 1.0,
        seq_kd: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        vllm: VLLMRollouts | None = None,
    ) -> None:
        self.lmbda = check_unit_interval("lmbda", lmbda)
        self.seq_kd = check_bool("seq_kd", seq_kd)
        self.options = SamplingOptions(max_new_tokens, temperature, top_p, top_k)
        self.seed = check_int("seed", seed, 0)
        self.eos_token_id = (
            None if eos_token_id is None else check_int("eos_token_id", eos_token_id, 0)
        )
        self.pad_token_id = (
            None if pad_token_id is None else check_int("pad_token_id", pad_token_id, 0)
        )
        self.calls = 0  # training micro-batches seen: the counter of every seed
        self.vllm = vllm

    def __repr__(self) -> str:
        o = self.options
        return (
            f"OnPolicySequences(lmbda={self.lmbda}, seq_kd={self.seq_kd}, "
            f"max_new_tokens={o.max_new_tokens}, temperature={o.temperature}, top_p={o.top_p}, "
            f"top_k={o.top_k}, seed={self.seed})"
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, int]:
        """The draw counter (and the seed, checked on load)."""
        return {"calls": self.calls, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the counter of a checkpoint.

        Raises:
            ValueError: when the checkpoint was written with another seed.
        """
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"the checkpoint's on-policy seed is {int(state['seed'])}, this run's {self.seed}:"
                " a resumed run would not draw the samples of the interrupted one."
            )
        self.calls = int(state["calls"])

    # ------------------------------------------------------------------ checks
    @staticmethod
    def check_teacher(backend: object) -> None:
        """Refuse a teacher that cannot score new sequences (a teacher cache)."""
        if isinstance(backend, CacheTeacher):
            raise ValueError(
                "on-policy distillation needs a teacher that scores the sampled completions; "
                "a teacher cache only holds the teacher's outputs on the dataset's sequences. "
                "Use a live teacher (teacher=...) or fused_head=True."
            )

    def _check(self, module: DistillationModule) -> None:
        self.check_teacher(module.teacher_backend)
        if self.lmbda > 0 and module.loss.kd_ratio < 1:
            raise ValueError(
                f"kd_ratio={module.loss.kd_ratio} < 1 with lmbda={self.lmbda} > 0: the "
                "cross-entropy term would train the student on its own samples. Use "
                "kd_ratio=1.0 for on-policy distillation (or lmbda=0 with seq_kd=True for "
                "sequence-level KD with cross-entropy)."
            )

    # ------------------------------------------------------------------ the source
    def __call__(
        self, module: DistillationModule, batch: Mapping[str, Tensor], stage: str
    ) -> Mapping[str, Tensor]:
        if stage != "train":
            return batch
        self._check(module)
        calls, self.calls = self.calls, self.calls + 1
        draw = torch.rand(
            (), generator=torch.Generator().manual_seed(counter_seed(self.seed, calls, 0))
        )
        if float(draw) < self.lmbda:
            role = "student"
        elif self.seq_kd:
            role = "teacher"
        else:
            module.log("train/student_samples", 0.0)
            return batch
        ignore = module.loss.options.ignore_index
        eos, pad = self._special_ids(module)
        prompt_ids, prompt_mask = split_prompts(batch, ignore, pad)
        rank = data_parallel(module.device_mesh)
        sample_seed = counter_seed(self.seed, calls, 1 + rank.rank)
        start = time.perf_counter()
        if role == "student" and self.vllm is not None:
            rollout = self.vllm(module, prompt_ids, prompt_mask, self.options, sample_seed,
                                eos, pad)  # fmt: skip
        else:
            rollout = self._in_process(module, role, prompt_ids, prompt_mask, sample_seed, eos,
                                       pad, lockstep=rank.size > 1)  # fmt: skip
        seconds = time.perf_counter() - start
        module.log("train/student_samples", float(role == "student"))
        module.log("train/rollout_tokens_per_sec", float(rollout.mask.sum()) / max(seconds, 1e-9))
        return join_completions(prompt_ids, prompt_mask, rollout, ignore, pad)

    def _in_process(
        self, module: DistillationModule, role: str, prompt_ids: Tensor, prompt_mask: Tensor,
        seed: int, eos: int | None, pad: int, lockstep: bool,
    ) -> Rollout:  # fmt: skip
        generator = torch.Generator(prompt_ids.device).manual_seed(seed)
        model: nn.Module = getattr(module, role)
        was_training = model.training
        model.eval()
        try:
            return generate(
                model, prompt_ids, prompt_mask, self.options, generator, eos, pad,
                vocab_limit=_vocab_limit(module), lockstep=lockstep,
            )  # fmt: skip
        finally:
            model.train(was_training)

    def _special_ids(self, module: DistillationModule) -> tuple[int | None, int]:
        tokenizer = _data_tokenizer(module)
        eos = self.eos_token_id
        if eos is None and tokenizer is not None:
            eos = getattr(tokenizer, "eos_id", None)
        pad = self.pad_token_id
        if pad is None:
            pad = getattr(tokenizer, "pad_id", 0) if tokenizer is not None else 0
        return eos, pad


def _data_tokenizer(module: DistillationModule) -> Any:
    try:
        datamodule = module.trainer.datamodule
    except RuntimeError:  # not attached to a trainer
        return None
    return getattr(datamodule, "tokenizer", None)


def _vocab_limit(module: DistillationModule) -> int | None:
    """The ids both models know: samples never leave the shared vocabulary."""
    if module.shared_vocab_size is not None:
        return module.shared_vocab_size
    sizes = [getattr(m, "vocab_size", None) for m in (module.student, module.teacher)]
    sizes = [s for s in sizes if isinstance(s, int)]
    return min(sizes) if sizes else None


def split_prompts(
    batch: Mapping[str, Tensor], ignore_index: int, pad_token_id: int
) -> tuple[Tensor, Tensor]:
    """The prompts of a batch: each row's tokens up to and including the position of its
    first supervised label (whose target is the first completion token), left-padded.

    Args:
        batch: ``input_ids`` [B, S] int64, shifted ``labels`` [B, S] int64, optionally
            ``position_ids`` [B, S] (one document per row only).
        ignore_index: the label of unsupervised positions.
        pad_token_id: fills the left padding.

    Returns:
        ``prompt_ids`` [B, P] int64 left-padded and ``prompt_mask`` [B, P] bool.

    Raises:
        ValueError: for a row without a supervised label, or packed rows (several documents).
    """
    ids, labels = batch["input_ids"], batch["labels"]
    supervised = labels != ignore_index
    if not bool(supervised.any(dim=1).all()):
        rows = (~supervised.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(
            f"on-policy distillation: rows {rows} have no supervised label, so no "
            "prompt/completion split; every row needs at least one target."
        )
    first = supervised.int().argmax(dim=1)  # [B]
    positions = batch.get("position_ids")
    if positions is not None:
        cols = torch.arange(ids.shape[1], device=ids.device)
        restarts = (positions == 0) & (cols > 0)
        last = ids.shape[1] - 1 - supervised.flip(1).int().argmax(dim=1)
        if bool((restarts & (cols[None] <= last[:, None])).any()):
            raise ValueError(
                "on-policy distillation needs one conversation per row; this batch packs "
                "several (set the data module's packing: false)."
            )
    lengths = first + 1
    width = int(lengths.max())
    cols = torch.arange(width, device=ids.device)
    source = cols[None, :] - (width - lengths[:, None])  # [B, P]: index into the row
    mask = source >= 0
    prompt = ids.gather(1, source.clamp(min=0)).masked_fill(~mask, pad_token_id)
    return prompt, mask


def join_completions(
    prompt_ids: Tensor, prompt_mask: Tensor, rollout: Rollout, ignore_index: int, pad_token_id: int
) -> dict[str, Tensor]:
    """Prompts and completions as a training batch, right-padded.

    Returns:
        ``input_ids`` [B, S] int64 (prompt, then completion, then ``pad_token_id``) and
        shifted ``labels`` [B, S] int64: the completion tokens as the targets of the positions
        before them, ``ignore_index`` elsewhere. S = longest prompt + completion.
    """
    tokens = torch.cat([prompt_ids, rollout.tokens], dim=1)
    valid = torch.cat([prompt_mask, rollout.mask], dim=1)
    order = (~valid).int().argsort(dim=1, stable=True)  # real tokens first, in order
    n_prompt, n_done = prompt_mask.sum(1), rollout.mask.sum(1)
    width = int((n_prompt + n_done).max())
    order = order[:, :width]
    valid = valid.gather(1, order)
    input_ids = tokens.gather(1, order).masked_fill(~valid, pad_token_id)
    cols = torch.arange(width, device=tokens.device)[None]
    target = (cols >= n_prompt[:, None] - 1) & (cols < (n_prompt + n_done)[:, None] - 1)
    shifted = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    labels = shifted.masked_fill(~target, ignore_index)
    return {"input_ids": input_ids, "labels": labels}


__all__ = ["OnPolicySequences", "counter_seed", "join_completions", "split_prompts"]
