"""Export a trained student as a Hugging Face model directory (``config.json``, safetensors,
``generation_config.json``, the tokenizer), readable by ``AutoModelForCausalLM``.

- :func:`export_checkpoint`: from a Lightning checkpoint (single file or distributed
  directory); ``lightning-kd export`` on the command line.
- :func:`export_student`: from a student module and its full weights (a LoRA student's
  adapters merged into its base).
- :func:`export_lora_adapters`: a LoRA student's adapters alone, in PEFT's format.
- :class:`~lightning_kd.callbacks.ExportOnFitEnd`: at the end of ``fit``, from the live
  (possibly TP/FSDP2-sharded) student.

A :class:`~lightning_kd.TinyLlama` exports as ``LlamaForCausalLM``
(:mod:`lightning_kd.export.tiny_llama_to_llama`); an
:class:`~lightning_kd.models.hf.HFCausalLM` as its own architecture.
"""

from lightning_kd.export.checkpoint_export import export_checkpoint, load_student, student_of
from lightning_kd.export.hf_export import export_student, run_tokenizer
from lightning_kd.export.lora_adapters import export_lora_adapters
from lightning_kd.export.student_state import gather_full_state, student_state_from_checkpoint

__all__ = [
    "export_checkpoint",
    "export_lora_adapters",
    "export_student",
    "gather_full_state",
    "load_student",
    "run_tokenizer",
    "student_of",
    "student_state_from_checkpoint",
]
