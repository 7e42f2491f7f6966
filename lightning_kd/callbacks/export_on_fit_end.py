"""Export the trained student as a Hugging Face directory when ``fit`` ends."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_kd.export.hf_export import DEFAULT_MAX_SHARD_SIZE, parse_size


class ExportOnFitEnd(Callback):
    """At the end of a successful ``fit``, write the student (a
    :class:`~lightning_kd.DistillationModule`'s ``student``, a ``CausalLMModule``'s ``model``)
    as a Hugging Face directory, as ``lightning-kd export`` does from a checkpoint (see
    :func:`~lightning_kd.export.export_student`), with the data module's HF tokenizer.

    Under TP/FSDP2 every rank joins the gathering of the full weights (one tensor at a time;
    only global rank 0 keeps them) and rank 0 writes; the ranks leave together. A run
    stopped early (an exception, SIGTERM) exports nothing.

    Args:
        output_dir: the directory to write (an earlier export there is replaced).
        max_shard_size: largest safetensors file, bytes or e.g. ``"5GB"``.

    Raises:
        ValueError: a malformed ``max_shard_size``.
    """

    def __init__(self, output_dir: str, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
        super().__init__()
        parse_size(max_shard_size)
        self.output_dir = output_dir
        self.max_shard_size = max_shard_size

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_kd.export import export_student, gather_full_state, run_tokenizer, student_of
        from lightning_kd.export.hf_export import run_special_tokens

        student, _ = student_of(pl_module)
        if student is None:
            raise ValueError("ExportOnFitEnd: the module has no built student to export.")
        writer = trainer.is_global_zero
        state = gather_full_state(student, keep=writer)
        if writer:
            tokenizer = run_tokenizer(student, trainer.datamodule)
            export_student(
                student, state, self.output_dir, tokenizer=tokenizer,
                max_shard_size=self.max_shard_size, overwrite=True,
                special_tokens=run_special_tokens(trainer.datamodule, tokenizer),
            )  # fmt: skip
            rank_zero_info(f"Exported the student (Hugging Face format) to {self.output_dir}")
        trainer.strategy.barrier("export_on_fit_end")
