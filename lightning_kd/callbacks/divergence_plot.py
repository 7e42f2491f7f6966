"""``DivergencePlot``: a PNG of the per-token divergence (the loss's chosen divergence,
``T²``-scaled) of a whole training run, written at the end of fit; the axes and titles name the
divergence by its label (e.g. ``JSD(β=0.5)``).

It keeps a bounded uniform sample of the per-token values (a bottom-k reservoir: every token
gets a random key and the ``max_tokens`` smallest keys are kept, which merges exactly across
data-parallel ranks) and exact per-position sums and counts. matplotlib is optional
(``pip install lightning_kd[plot]``); without it the callback warns once and does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors
from typing_extensions import override

from lightning_kd.callbacks._common import (
    DataParallel,
    PerTokenDivergenceCallback,
    data_parallel,
    divergence_label,
)
from lightning_kd.checks import check_int
from lightning_kd.compat import renamed_attribute


class DivergenceSample(NamedTuple):
    """The recorded data: ``values`` (a uniform sample of the per-token divergence of ``seen``
    valid tokens, with their random ``keys``) and ``position_sum`` / ``position_count`` (float64,
    index = position in the sequence)."""

    keys: Tensor
    values: Tensor
    position_sum: Tensor
    position_count: Tensor
    seen: int


def _import_matplotlib() -> tuple[Any, Any]:
    import matplotlib  # noqa: F401  (fails first when matplotlib is missing)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def _matplotlib_available() -> bool:
    try:
        _import_matplotlib()
    except ImportError:
        return False
    return True


class DivergencePlot(PerTokenDivergenceCallback):
    """Write a two-panel PNG at the end of ``fit``: the histogram of the per-token divergence
    (the loss's chosen divergence, ``T²``-scaled) of the training tokens (log-scaled counts) and
    the mean divergence by position in the sequence. Axes and titles name the divergence by its
    label (``pl_module.loss.divergence.label``, e.g. ``KL(teacher ‖ student)`` or
    ``JSD(β=0.5)``; ``divergence`` for a module without one).

    The per-token divergence comes from the ``training_step`` output (``per_token_div`` and
    ``valid_mask``, as :class:`~lightning_kd.DistillationModule` returns them; 0.1's
    ``per_token_kl`` is read when ``per_token_div`` is absent). The histogram
    uses a uniform random sample of at most ``max_tokens`` valid tokens of the whole run; the
    position means are exact. Both are merged over ``pl_module.dp_group`` (the world group for
    modules without one) at the end of training and in checkpoints, so tensor-parallel
    replicas are not counted twice; rank 0 draws. The sample is kept on the CPU (one small
    device-to-host copy per batch). Uses matplotlib's non-interactive Agg canvas, without
    pyplot; if matplotlib cannot be imported it warns once and records nothing.

    Args:
        filename: name of the PNG inside ``dirpath`` (0.1's default was
            ``kl_per_token.png``).
        dirpath: directory for the PNG (a ``pathlib.Path`` is accepted too); default
            ``trainer.log_dir`` (the first logger's directory), else
            ``trainer.default_root_dir``.
        max_tokens: size of the sample behind the histogram (>= 1).
        bins: histogram bins (>= 1).
        seed: seed of the sampler's own generator (the global RNG is left alone).

    Attributes:
        plot_path: the PNG written by the last fit (rank 0), else None.
        plotted: the data of all data-parallel ranks behind that PNG (rank 0), else None.

    Raises:
        ValueError: for an empty ``filename`` or one with a directory part, or a count out of
            range.

    Note:
        During a distributed fit :meth:`state_dict` is a collective over the data-parallel
        group (it stores the merged sample); Lightning calls it on every rank when it saves a
        checkpoint. On resume, data-parallel rank 0 holds the restored sample.
    """

    legacy_state_key = "KLPlot"

    def __init__(
        self,
        filename: str = "divergence_per_token.png",
        dirpath: str | None = None,
        max_tokens: int = 100_000,
        bins: int = 60,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ValueError(f"filename must be a file name without directory, got {filename!r}.")
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"dirpath must be a path or None, got {dirpath!r}.")
        self.filename = filename
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.max_tokens = check_int("max_tokens", max_tokens, 1)
        self.bins = check_int("bins", bins, 1)
        self.seed = check_int("seed", seed, 0)
        self.plot_path: Path | None = None
        self.plotted: DivergenceSample | None = None
        self._enabled = True
        self._warned_missing = False
        self._dp = DataParallel(False, None, 0, 1)
        self._device = torch.device("cpu")
        self._generator: torch.Generator | None = None
        self._restored = False
        self._final: DivergenceSample | None = None
        self._out_dir: Path | None = None
        self._reset()

    def _reset(self) -> None:
        self._keys = torch.zeros(0)
        self._values = torch.zeros(0)
        self._pos_sum = torch.zeros(0, dtype=torch.float64)
        self._pos_count = torch.zeros(0, dtype=torch.float64)
        self._seen = 0

    @property
    def sample(self) -> DivergenceSample:
        """This rank's recorded data (not merged over ranks; :attr:`plotted` is)."""
        return DivergenceSample(
            self._keys, self._values, self._pos_sum, self._pos_count, self._seen
        )

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        self.plot_path, self.plotted = None, None
        self._enabled = bool(trainer.strategy.broadcast(_matplotlib_available()))
        if not self._enabled and not self._warned_missing:
            rank_zero_warn(
                f"{type(self).__name__} needs matplotlib, which cannot be imported; no plot "
                "will be written (`pip install lightning_kd[plot]`)."
            )
            self._warned_missing = True
        self._dp = data_parallel(pl_module)
        self._device = pl_module.device

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored and self._dp.rank != 0:
            self._reset()  # the checkpoint holds the merged sample; rank 0 carries it on
        self._restored = False
        self._generator = self._new_generator()

    @override
    def _wants_batch(self, trainer: Trainer) -> bool:
        return self._enabled

    @override
    def _record(
        self, trainer: Trainer, pl_module: LightningModule, div: Tensor, valid: Tensor, batch: Any
    ) -> None:
        self._add(div, valid)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled:
            return
        self._final = self._merged()  # collectives: every rank is here
        self._out_dir = self.dirpath
        if self._out_dir is None:
            self._out_dir = Path(trainer.log_dir or trainer.default_root_dir)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final, self._final = self._final, None
        if not self._enabled or final is None or not trainer.is_global_zero:
            return
        if final.seen == 0:
            rank_zero_warn(f"{type(self).__name__}: no per-token divergence was recorded; no plot.")
            return
        assert self._out_dir is not None
        label = divergence_label(pl_module)
        self.plot_path = self._write(self._out_dir / self.filename, final, label, trainer)
        self.plotted = final

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._dp = DataParallel(False, None, 0, 1)  # holds a process group: keep picklable

    # ------------------------------------------------------------------ recording
    def _new_generator(self) -> torch.Generator:
        # Distinct streams per data-parallel rank and per resume point.
        seed = hash((self.seed, self._dp.rank, self._seen)) & (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def _add(self, div: Tensor, valid: Tensor) -> None:
        seq = div.shape[-1]
        div, valid = div.reshape(-1, seq), valid.reshape(-1, seq)
        values = div[valid].cpu()
        per_position = torch.stack([torch.where(valid, div, 0.0).sum(0), valid.sum(0)])
        per_position = per_position.double().cpu()
        if self._pos_sum.numel() < seq:
            grow = seq - self._pos_sum.numel()
            self._pos_sum = torch.cat([self._pos_sum, self._pos_sum.new_zeros(grow)])
            self._pos_count = torch.cat([self._pos_count, self._pos_count.new_zeros(grow)])
        self._pos_sum[:seq] += per_position[0]
        self._pos_count[:seq] += per_position[1]
        self._seen += values.numel()
        if self._generator is None:
            self._generator = self._new_generator()
        keys = torch.rand(values.numel(), generator=self._generator)
        if self._keys.numel() >= self.max_tokens:
            keep = keys < self._keys.max()
            keys, values = keys[keep], values[keep]
        self._keys, self._values = self._bottom_k(
            torch.cat([self._keys, keys]), torch.cat([self._values, values])
        )

    def _bottom_k(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        if keys.numel() <= self.max_tokens:
            return keys, values
        index = keys.topk(self.max_tokens, largest=False).indices
        return keys[index], values[index]

    def _merged(self) -> DivergenceSample:
        """The sample of all data-parallel ranks (a collective when distributed)."""
        if not self._dp.sync:
            return DivergenceSample(*(t.clone() for t in self.sample[:4]), self._seen)

        def gather(t: Tensor) -> list[Tensor]:
            parts = gather_all_tensors(t.to(self._device), group=self._dp.group)
            return [p.cpu() for p in parts]

        keys, values = torch.cat(gather(self._keys)), torch.cat(gather(self._values))
        keys, values = self._bottom_k(keys, values)
        sums, counts = gather(self._pos_sum), gather(self._pos_count)
        length = max(t.numel() for t in sums)

        def pad(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros(length - t.numel())])

        seen = gather(torch.tensor([float(self._seen)], dtype=torch.float64))
        return DivergenceSample(
            keys,
            values,
            torch.stack([pad(t) for t in sums]).sum(0),
            torch.stack([pad(t) for t in counts]).sum(0),
            int(sum(float(t) for t in seen)),
        )

    # ------------------------------------------------------------------ plotting
    def _write(
        self, path: Path, data: DivergenceSample, label: str, trainer: Trainer | None = None
    ) -> Path:
        Figure, FigureCanvasAgg = _import_matplotlib()
        fig = Figure(figsize=(11, 4), layout="constrained")
        FigureCanvasAgg(fig)
        hist, by_position = fig.subplots(1, 2)
        hist.hist(data.values.double().numpy(), bins=self.bins, log=True, color="tab:blue")
        hist.set_xlabel(f"per-token {label}")
        hist.set_ylabel("tokens (log scale)")
        sampled = f"{data.values.numel():,} of {data.seen:,} tokens sampled"
        hist.set_title(f"{label} per token ({sampled})")
        present = data.position_count > 0
        positions = torch.arange(data.position_count.numel())[present]
        means = data.position_sum[present] / data.position_count[present]
        by_position.plot(positions.numpy(), means.numpy(), marker=".", color="tab:red")
        by_position.set_xlabel("position in sequence")
        by_position.set_ylabel(f"mean {label}")
        by_position.set_title(f"mean {label} by position")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
        for logger in trainer.loggers if trainer is not None else ():
            # TensorBoard (and any logger whose experiment has add_figure) shows it too.
            add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
            if callable(add_figure):
                add_figure("div/per_token", fig, global_step=trainer.global_step)
        return path

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        data = self._merged()
        return {
            "keys": data.keys,
            "values": data.values,
            "position_sum": data.position_sum,
            "position_count": data.position_count,
            "seen": data.seen,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._keys = state_dict["keys"].float().cpu()
        self._values = state_dict["values"].float().cpu()
        self._pos_sum = state_dict["position_sum"].double().cpu()
        self._pos_count = state_dict["position_count"].double().cpu()
        self._seen = int(state_dict["seen"])
        self._keys, self._values = self._bottom_k(self._keys, self._values)
        self._restored = True


def __getattr__(name: str) -> Any:  # 0.1 names, see lightning_kd.compat
    return renamed_attribute(__name__, name)
