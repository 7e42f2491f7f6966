"""A LoRA student's adapters alone, in PEFT's format (``PeftModel.from_pretrained`` reads it).

:func:`export_lora_adapters` writes ``adapter_config.json`` (a ``peft.LoraConfig``: rank,
alpha, dropout and the adapted layers' names) and ``adapter_model.safetensors`` (the
``lora_A`` / ``lora_B`` weights under PEFT's names). The keys are relative to the module
peft wrapped: for an :class:`~lightning_kd.models.hf.HFCausalLM` student, its Hugging Face
model (load the adapters onto ``AutoModelForCausalLM.from_pretrained(<the base>)``; the
config's ``base_model_name_or_path`` is the student's ``pretrained_path``); for a
:class:`~lightning_kd.TinyLlama`, the TinyLlama itself (onto ``TinyLlama(<same config>)``
with the base's weights). The merged model goes through
:func:`~lightning_kd.export.hf_export.export_student` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from lightning_kd.export.hf_export import prepare_directory
from lightning_kd.models.lora import adapter_state, lora_layers, peft_config

__all__ = ["export_lora_adapters"]


def export_lora_adapters(
    student: nn.Module,
    state: Mapping[str, Tensor],
    output_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of the LoRA ``student`` (weights ``state``) in PEFT's format.

    Args:
        student: a TinyLlama or HFCausalLM built with ``lora`` (its options and layer names;
            its own weights are not read).
        state: the student's weights under its own names (at least the adapters), e.g. from
            :func:`~lightning_kd.export.student_state.gather_full_state` or
            :func:`~lightning_kd.export.student_state.student_state_from_checkpoint`.
        output_dir: the directory to write (created; must be empty unless ``overwrite``).
        overwrite: replace an earlier export in ``output_dir``.

    Returns:
        The output directory.

    Raises:
        ValueError: a student without LoRA, or weights without its adapters.
    """
    options = getattr(student, "lora", None)
    layers = lora_layers(student)
    if options is None or not layers:
        raise ValueError(
            f"the {type(student).__name__} student has no LoRA adapters (build it with lora=)."
        )
    hf_model = getattr(student, "model", None)
    prefix = "model." if isinstance(hf_model, nn.Module) and hasattr(hf_model, "config") else ""
    tensors = adapter_state(state, prefix)
    expected = {f"{name}.lora_{x}.default.weight" for name in layers for x in "AB"}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"the weights lack the student's adapters {missing[:5]}.")
    config = peft_config(options, sorted({name.rsplit(".", 1)[-1] for name in layers}))
    if prefix:
        config.base_model_name_or_path = getattr(student, "pretrained_path", None)
    directory = Path(output_dir)
    prepare_directory(directory, overwrite)
    config.save_pretrained(str(directory))
    from safetensors.torch import save_file

    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
