"""The only place lightning_kd reads Lightning internals, where Lightning has no public API.

Each accessor checks that what it reads still exists and fails with a message naming the
Lightning version when an upgrade moves it (``tests/test_lightning_private.py`` runs each one
against the installed Lightning). The resumable data loader depends on behaviour, not on a
private name: Lightning saves ``state_dict()`` of a train dataloader that has one and restores
it with ``load_state_dict`` before the epoch's iterator is created (the data tests pin it).
"""

from __future__ import annotations

import lightning
from lightning.pytorch import Trainer


def _moved(what: str) -> RuntimeError:
    return RuntimeError(
        f"Lightning {lightning.__version__} no longer has {what}, which lightning_kd reads "
        "because Lightning offers no public equivalent; pin lightning to the version in "
        "constraints.txt or update lightning_kd.lightning_private."
    )


def logged_step(trainer: Trainer) -> int:
    """The step index Lightning's own ``self.log`` uses for the loggers: the number of batches
    that stepped the optimizer (``trainer.global_step`` counts optimizer steps, which differs
    with several optimizers and is not what the loggers' rows line up with)."""
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError as error:
        raise _moved("fit_loop.epoch_loop._batches_that_stepped") from error


def fsdp_claim_root(module: object) -> None:
    """Make ``module`` (an FSDP2 ``fully_shard`` root) the root of its FSDP2 tree now, as its
    first forward would (torch's ``FSDPState._lazy_init``; torch has no public call). Needed
    before a unit's own forward runs outside the root's (cached generation), which would
    otherwise claim the root itself."""
    try:
        state = module._get_fsdp_state()  # type: ignore[attr-defined]
        lazy_init = state._lazy_init
    except AttributeError as error:
        import torch

        raise RuntimeError(
            f"torch {torch.__version__} no longer has FSDPModule._get_fsdp_state()._lazy_init, "
            "which lightning_kd's generation under FSDP2 reads; update "
            "lightning_kd.lightning_private."
        ) from error
    lazy_init()
