"""LoRA students through the ``peft`` library: options, injection, TP plans, merged weights.

:class:`LoraOptions` is the ``lora`` option of :class:`~lightning_kd.TinyLlama` and
:class:`~lightning_kd.models.hf.HFCausalLM`. :func:`apply_lora` injects peft's LoRA layers
into the model in place (``peft.inject_adapter_in_model``: the model keeps its class, methods
and contract; a targeted ``nn.Linear`` becomes a ``peft`` ``lora.Linear`` holding the frozen
``base_layer`` and the trainable ``lora_A`` / ``lora_B``) and freezes everything else.

Parallelism:

- Tensor parallelism: :func:`lora_tensor_parallel_plan` rewrites a plan so that a targeted
  layer's style goes to its ``base_layer`` and the adapter follows the Megatron split: under a
  column-parallel base, ``lora_B`` is column-parallel too (``lora_A`` replicated: its input is
  replicated, and ``lora_B``'s input gradient is all-reduced like any column-parallel layer's);
  under a row-parallel base, ``lora_A`` is row-parallel (its partial sums all-reduced) and
  ``lora_B`` replicated. Other styles on a targeted layer are refused.
- FSDP2 shards each block with its frozen and trainable parameters together (FSDP2 supports
  units that mix them); only the adapters get gradients.
- Sharded (meta-device) loading is refused: the adapters would be left uninitialised.

Export: :func:`merge_lora_state` folds the adapters into the base weights of a full state dict
(``W + scaling · B @ A``) under the plain model's names; :func:`adapter_state` gives the
adapters alone under PEFT's names.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from lightning_kd.models.contract import plan_key_matches

__all__ = [
    "LoraOptions",
    "adapter_state",
    "apply_lora",
    "has_lora",
    "lora_layers",
    "lora_tensor_parallel_plan",
    "merge_lora_state",
    "peft_config",
    "require_peft",
]

#: The adapter name peft uses by default (one adapter per student).
ADAPTER = "default"

_LORA_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<which>[AB])\.default\.weight$")


def require_peft() -> Any:
    """The ``peft`` module.

    Raises:
        ValueError: when it is not installed (``pip install 'lightning-kd[peft]'``).
    """
    try:
        import peft
    except ImportError as error:
        raise ValueError(
            "the lora option needs the peft library: pip install 'lightning-kd[peft]' "
            "(or pip install peft)."
        ) from error
    return peft


@dataclass
class LoraOptions:
    """LoRA adapters for a student (``lora:`` in YAML).

    Attributes:
        rank: the adapters' rank r (>= 1).
        alpha: the scaling numerator: the update is ``(alpha / rank) · B @ A``.
        dropout: dropout on the adapters' input (0 for none).
        target_modules: names (or name suffixes, as peft matches them) of the ``nn.Linear``
            layers to adapt. None: the model's default (TinyLlama: every projection of its
            blocks; Hugging Face models: peft's default for the family, e.g. ``q_proj``,
            ``v_proj`` for Llama).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora rank must be an integer >= 1, got {self.rank!r}.")
        if not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ValueError(f"lora alpha must be a number > 0, got {self.alpha!r}.")
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}.")
        if self.target_modules is not None and (
            not self.target_modules
            or not all(isinstance(name, str) and name for name in self.target_modules)
        ):
            raise ValueError(
                "lora target_modules must be a non-empty list of module names, got "
                f"{self.target_modules!r}."
            )

    @classmethod
    def of(cls, value: LoraOptions | Mapping[str, Any] | None) -> LoraOptions | None:
        """``value`` as options (a mapping is taken as the fields), None for None.

        Raises:
            ValueError: for another type or unknown fields.
        """
        if value is None or isinstance(value, LoraOptions):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"rank", "alpha", "dropout", "target_modules"}
            if unknown:
                raise ValueError(
                    f"unknown lora options {sorted(unknown)}; expected rank, alpha, dropout, "
                    "target_modules."
                )
            return cls(**value)
        raise ValueError(f"lora must be LoraOptions or a mapping, got {type(value).__name__}.")


def peft_config(options: LoraOptions, target_modules: Sequence[str] | None) -> Any:
    """The ``peft.LoraConfig`` of ``options`` (``target_modules`` resolved by the caller)."""
    peft = require_peft()
    return peft.LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=None if target_modules is None else list(target_modules),
        bias="none",
    )


def apply_lora(
    model: nn.Module,
    options: LoraOptions,
    default_targets: Sequence[str] | None,
    *,
    root: nn.Module | None = None,
    protected: Sequence[nn.Module] = (),
) -> Any:
    """Inject LoRA layers into ``root`` (default ``model``) in place and freeze every other
    parameter of ``model``.

    Args:
        model: the student (its parameters are frozen but the adapters').
        options: the LoRA options.
        default_targets: the target modules when ``options.target_modules`` is None (None:
            peft's default for a Hugging Face ``root``).
        root: the module to inject into (a Hugging Face model inside ``HFCausalLM``).
        protected: modules that must not be adapted (the output head: the fused head and the
            vocabulary-parallel plans read its weight directly).

    Returns:
        The ``peft.LoraConfig`` used (its ``target_modules`` as resolved by peft).

    Raises:
        ValueError: without peft, on the meta device (sharded loading), for targets that match
            nothing, or that match a protected module or a layer that is not ``nn.Linear``.
    """
    if torch.get_default_device().type == "meta":
        raise ValueError(
            "lora cannot be combined with sharded (meta-device) loading: the adapters would "
            "be left uninitialised. Build the student on CPU (sharded_loading=False)."
        )
    peft = require_peft()
    root = model if root is None else root
    targets = options.target_modules or default_targets
    config = peft_config(options, targets)
    try:
        peft.inject_adapter_in_model(config, root, adapter_name=ADAPTER)
    except ValueError as error:
        raise ValueError(f"lora target_modules={targets!r}: {error}") from error
    layers = lora_layers(root)
    if not layers:
        raise ValueError(f"lora target_modules={targets!r} matched no layer of the model.")
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear) or any(base is m for m in protected):
            raise ValueError(
                f"lora may adapt the nn.Linear layers of the blocks only; {name!r} is "
                f"{'the output head' if isinstance(base, nn.Linear) else type(base).__name__}."
            )
    for pname, param in model.named_parameters():
        param.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    return config


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the peft LoRA layers in ``model`` (empty when none)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA layers."""
    return bool(lora_layers(model))


def lora_tensor_parallel_plan(
    model: nn.Module, plan: Mapping[str, ParallelStyle]
) -> dict[str, ParallelStyle]:
    """``plan`` with each key that names LoRA layers moved to their ``base_layer``, plus the
    adapter's split (see the module docstring); other keys unchanged. Keys may be fnmatch
    patterns.

    Raises:
        ValueError: for a style other than column- or row-parallel on a LoRA layer.
    """
    layers = lora_layers(model)
    if not layers:
        return dict(plan)
    out: dict[str, ParallelStyle] = {}
    for key, style in plan.items():
        if not any(plan_key_matches(name, key) for name in layers):
            out[key] = style
            continue
        out[f"{key}.base_layer"] = style
        if isinstance(style, ColwiseParallel):
            out[f"{key}.lora_B.{ADAPTER}"] = copy.copy(style)
        elif isinstance(style, RowwiseParallel):
            out[f"{key}.lora_A.{ADAPTER}"] = copy.copy(style)
        else:
            raise ValueError(
                f"tensor parallelism of the LoRA layer {key!r} with {type(style).__name__} is "
                "not supported (column- and row-parallel only); leave it out of "
                "lora.target_modules."
            )
    return out


def _full(value: Tensor) -> Tensor:
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value


def merge_lora_state(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A full state dict of the LoRA ``model`` (its own names) with the adapters folded into
    the base weights: ``<layer>.weight = base + scaling · B @ A`` (in fp32, then the base's
    dtype), under the names of the model without LoRA.

    Raises:
        ValueError: when an adapted layer's base or adapters are missing from ``state``.
    """
    layers = lora_layers(model)
    merged = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, layer in layers.items():
        keys = [f"{name}.base_layer.weight", f"{name}.lora_A.{ADAPTER}.weight",
                f"{name}.lora_B.{ADAPTER}.weight"]  # fmt: skip
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"the LoRA student's weights lack {missing}.")
        base, a, b = (_full(state[k]) for k in keys)
        scaling = float(layer.scaling[ADAPTER])
        merged.pop(keys[0])
        delta = (b.float() @ a.float()) * scaling
        merged[f"{name}.weight"] = (base.float() + delta).to(base.dtype)
        bias_key = f"{name}.base_layer.bias"
        if bias_key in merged:
            merged[f"{name}.bias"] = merged.pop(bias_key)
    return merged


def plain_names(model: nn.Module) -> set[str]:
    """The state-dict names of ``model`` without its LoRA layers (as after a merge)."""
    return {
        k.replace(".base_layer.", ".")
        for k in model.state_dict()
        if ".lora_A." not in k and ".lora_B." not in k
    }


def adapter_state(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """The adapters of a full state dict under PEFT's saved names:
    ``base_model.model.<layer>.lora_A.weight`` (``<layer>`` relative to the module peft wraps,
    after removing ``prefix``), contiguous plain tensors.

    Raises:
        ValueError: when ``state`` holds no adapter.
    """
    out = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        layer = match["layer"].removeprefix(prefix)
        out[f"base_model.model.{layer}.lora_{match['which']}.weight"] = (
            _full(value).detach().contiguous().clone()
        )
    if not out:
        raise ValueError("the weights hold no LoRA adapter.")
    return out
