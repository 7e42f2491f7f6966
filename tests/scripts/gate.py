"""A test callback that holds training at a given step until the test says go.

At the end of training step ``at_step`` (every rank) it creates ``ready_file`` and waits until
``go_file`` exists. The test sends its signal in between, so the signal always arrives inside
that step, whatever the machine's speed (no sleeps or timing in the test itself).
"""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch import Callback


class Gate(Callback):
    def __init__(self, at_step: int, ready_file: str, go_file: str, limit_s: float = 600.0):
        self.at_step, self.ready, self.go, self.limit_s = at_step, ready_file, go_file, limit_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step:
            return
        Path(f"{self.ready}.{trainer.global_rank}").touch()
        deadline = time.monotonic() + self.limit_s  # a safety net against a hung test only
        while not Path(self.go).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.go} never appeared")
            time.sleep(0.05)
