"""The ``lightning-kd`` command line: LightningCLI over DistillationModule and TextDataModule.

``lightning-kd fit --config configs/quickstart.yaml`` (also ``python -m lightning_kd``), plus
``validate``, ``test`` and ``--print_config``. Model and data are given with ``class_path`` /
``init_args`` (subclass mode), so subclasses of :class:`~lightning_kd.DistillationModule`
(e.g. the hidden-state example) and other LightningModules such as
:class:`~lightning_kd.CausalLMModule` run from the same command.

The CLI's own ``--optimizer`` / ``--lr_scheduler`` are switched off on purpose: LightningCLI
would build them before ``configure_model()`` parallelises the model, so they would hold the
pre-TP parameters (or none) and training would silently do nothing. Optimizers are module
arguments instead (``model.init_args.optimizer``), built in ``configure_optimizers``.
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class KDLightningCLI(LightningCLI):
    """LightningCLI with lightning_kd's defaults (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)


def shutdown_distributed() -> None:
    """Leave the process group together and destroy it.

    Lightning leaves the default process group alive at exit; with gloo, a rank whose
    interpreter exits while a peer still talks to it can abort ("terminate called without an
    active exception", exit code -6) after a successful run. A final barrier and an explicit
    destroy make the exit clean.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(args: list[str] | None = None) -> int:
    """Entry point of ``lightning-kd`` and ``python -m lightning_kd``: the exit status.

    Returns 0 after a successful run. A failure never returns: bad arguments exit with
    jsonargparse's non-zero status (``SystemExit``), and an error in the run propagates as its
    exception (exit status 1). The installed console script calls ``sys.exit(main())``, so the
    return value must be an exit status, not the CLI object (which ``sys.exit`` would print and
    turn into status 1). For the trainer, model and datamodule, build the CLI yourself:
    ``KDLightningCLI(args=[...], run=False)``.
    """
    KDLightningCLI(args=args)
    shutdown_distributed()  # only after success: a failed rank must not wait in a barrier
    return 0


if __name__ == "__main__":
    sys.exit(main())
