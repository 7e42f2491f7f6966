"""A short distillation run with the per-token divergence callbacks, for the multi-process
callback test (run as a script, because Lightning's ModelParallelStrategy launches the other
ranks by re-running it).

Writes a JSON file (rank 0) with the monitor's history and the plot's merged per-position
counts, so a tensor-parallel run can be compared with a single-process run on the same data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler

from lightning_kd import DistillationModule, KDLoss
from lightning_kd.callbacks import DivergencePlot, PerTokenDivergenceMonitor
from lightning_kd.cli import shutdown_distributed
from tests.helpers.distributed import exit_now
from tests.scripts.fit_run import RandomTokens, make_models


class Uneven(RandomTokens):
    """Different numbers of ignored labels per sequence, so the token counts matter."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        item["labels"][: 1 + i % 5] = -100
        return item


def run(out_dir: Path, devices: int = 1, tp: int = 1, steps: int = 4) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    student, teacher = make_models()
    module = DistillationModule(
        student,
        teacher,
        loss=KDLoss(chunk_size=5, temperature=2.0),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    monitor = PerTokenDivergenceMonitor(every_n_steps=2, top_k=3, position_buckets=4)
    plot = DivergencePlot(dirpath=str(out_dir), max_tokens=1000)
    strategy = "auto"
    if devices > 1:
        strategy = ModelParallelStrategy(data_parallel_size=devices // tp, tensor_parallel_size=tp)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[monitor, plot],
        deterministic=True,
    )
    dataset = Uneven(samples=16)
    sampler = None
    if devices == 1:
        # The sampler Lightning injects over the data-parallel ranks in distributed runs.
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    trainer.fit(module, DataLoader(dataset, batch_size=4, sampler=sampler))
    plotted = plot.plotted  # rank 0: merged over the data-parallel ranks
    return {
        "history": monitor.history,
        "position_count": None if plotted is None else plotted.position_count.tolist(),
        "seen": None if plotted is None else plotted.seen,
        "plot_written": plot.plot_path is not None and plot.plot_path.is_file(),
        "global_rank": trainer.global_rank,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    result = run(out.parent, args.devices, args.tp, args.steps)
    if result["global_rank"] == 0:
        out.write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_now(0)  # see tests/helpers/distributed.py: no gloo teardown abort after success
