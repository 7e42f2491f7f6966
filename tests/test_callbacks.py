"""PerTokenDivergenceMonitor and DivergencePlot with a real Trainer (CPU, tiny models), plus one
tensor-parallel run on 2 CPU processes that must log the same statistics as a single process, and
the 0.1 names (classes, module paths, output key, checkpoint states) that still work."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule, KDLoss
from lightning_kd.callbacks import DivergencePlot, PerTokenDivergenceMonitor, TopToken
from lightning_kd.callbacks._common import divergence_label, per_token_outputs
from tests.helpers.distributed import run_workers
from tests.helpers.trainer import cpu_trainer
from tests.scripts.callback_run import Uneven
from tests.scripts.callback_run import run as callback_run
from tests.scripts.fit_run import make_models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "callback_run.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STATS = ("div/mean", "div/p50", "div/p90", "div/p99", "div/max", "div/tokens")
FORWARD_KL = "KL(teacher ‖ student)"  # the default divergence's label


class Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


class Data(L.LightningDataModule):
    def __init__(self, tokenizer: Tokenizer | None = None, samples: int = 16) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.samples = samples

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Uneven(samples=self.samples), batch_size=4)


class Recorder(L.Callback):
    """Keeps every micro-batch's outputs and batch, with the global step after it."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # DistillationModule returns per_token_div (per_token_kl before 0.2).
        per_token = outputs.get("per_token_div", outputs.get("per_token_kl"))
        data = {
            "div": per_token.clone(),
            "valid": outputs["valid_mask"].clone(),
            "input_ids": batch["input_ids"].clone(),
            "labels": batch["labels"].clone(),
        }
        self.records.append((trainer.global_step, data))

    def completing(self, step: int) -> dict[str, torch.Tensor]:
        """The micro-batch whose optimizer step made the global step ``step``."""
        return next(data for s, data in self.records if s == step)


class TextLogger(Logger):
    """A logger whose experiment has TensorBoard's ``add_text``."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[tuple[str, str, int]] = []
        self.metrics: list[tuple[dict[str, float], int]] = []

    @property
    def name(self) -> str:
        return "text"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> Any:
        return self

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.append((tag, text, global_step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return cpu_trainer(default_root_dir=tmp_path, **kwargs)


def _module(**loss_args: Any) -> DistillationModule:
    L.seed_everything(0, verbose=False)
    student, teacher = make_models()
    return DistillationModule(
        student,
        teacher,
        loss=KDLoss(chunk_size=5, temperature=2.0, **loss_args),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# The callbacks reduce the float32 per-token divergence in float32 (means, position sums, bucket
# sums) in an order that depends on the batch layout and on the CPU's vectorisation; the
# references here are float64. Such sums agree to float32 precision: a rounding error of at most
# ~n * 2^-24 relative for n non-negative terms (n <= ~100 here), hence 1e-5 relative.
F32_SUM = {"rtol": 1e-5, "atol": 1e-6}


def _approx(value: torch.Tensor | float, rel: float = F32_SUM["rtol"]) -> Any:
    return pytest.approx(float(value), rel=rel, abs=F32_SUM["atol"])


# ---------------------------------------------------------------------- PerTokenDivergenceMonitor
def test_monitor_statistics_match_the_batch_and_reach_the_loggers(tmp_path, caplog):
    recorder = Recorder()
    buckets, context = 5, 3
    monitor = PerTokenDivergenceMonitor(
        every_n_steps=2, top_k=3, position_buckets=buckets, context_tokens=context
    )
    csv_logger, text_logger = CSVLogger(tmp_path), TextLogger()
    caplog.set_level(logging.INFO, logger="lightning_kd.callbacks.per_token_divergence")
    trainer = _trainer(
        tmp_path,
        max_steps=4,
        accumulate_grad_batches=2,
        callbacks=[recorder, monitor],
        logger=[csv_logger, text_logger],
    )
    tokenizer = Tokenizer()
    trainer.fit(_module(), datamodule=Data(tokenizer))

    # Once per window of 2 micro-batches, after optimizer steps 2 and 4.
    assert [h["step"] for h in monitor.history] == [2, 4]
    assert monitor.num_summaries == 2 and monitor.last_step == 4
    for entry in monitor.history:
        data, metrics = recorder.completing(entry["step"]), entry["metrics"]
        div, valid = data["div"], data["valid"]
        values = div[valid].double()
        assert metrics["div/tokens"] == int(valid.sum()) > 0
        assert metrics["div/mean"] == _approx(values.mean())
        assert metrics["div/max"] == _approx(values.max())
        for name, q in (("div/p50", 0.5), ("div/p90", 0.9), ("div/p99", 0.99)):
            assert metrics[name] == _approx(torch.quantile(values, q))
        assert metrics["div/p50"] <= metrics["div/p90"] <= metrics["div/p99"] <= metrics["div/max"]
        assert metrics["div/p50"] < metrics["div/max"]

        # Bucket b covers positions [ceil(b·S/n), ceil((b+1)·S/n)).
        seq = div.shape[1]
        covered = []
        for b in range(buckets):
            lo, hi = math.ceil(b * seq / buckets), math.ceil((b + 1) * seq / buckets)
            covered += range(lo, hi)
            sel = valid[:, lo:hi]
            if sel.any():
                assert metrics[f"div/pos_{b:02d}"] == _approx(div[:, lo:hi][sel].double().mean())
            else:
                assert f"div/pos_{b:02d}" not in metrics
        assert covered == list(range(seq))

        top = [TopToken.from_dict(t) for t in entry["top_tokens"]]
        assert [t.value for t in top] == [_approx(v) for v in values.sort(descending=True)[0][:3]]
        for t in top:
            assert valid[t.sample, t.position] and t.value == _approx(div[t.sample, t.position])
            assert t.target_id == int(data["labels"][t.sample, t.position])
            start = max(0, t.position - context + 1)
            ctx = data["input_ids"][t.sample, start : t.position + 1].tolist()
            assert list(t.context_ids) == ctx
            assert t.text == f"{tokenizer.decode(ctx)!r} → {tokenizer.decode([t.target_id])!r}"
    assert monitor.last_top_tokens == [
        TopToken.from_dict(t) for t in monitor.history[-1]["top_tokens"]
    ]
    assert monitor.last_metrics == monitor.history[-1]["metrics"]

    # CSV: the div/* columns, at Lightning's own step index of the completing batches.
    rows = [r for r in _csv_rows(csv_logger) if r.get("div/mean")]
    columns = set(rows[0])
    assert set(STATS) <= columns and {f"div/pos_{b:02d}" for b in range(1, buckets)} <= columns
    assert [int(r["step"]) for r in rows] == [1, 3]
    for row, entry in zip(rows, monitor.history, strict=True):
        for name, value in entry["metrics"].items():
            assert float(row[name]) == _approx(value)
    assert [m for m, _ in text_logger.metrics if "div/mean" in m] == [
        h["metrics"] for h in monitor.history
    ]

    # Text: TensorBoard-style add_text and an info log on rank 0.
    assert [(tag, step) for tag, _, step in text_logger.texts] == [
        ("div/top_tokens", 1),
        ("div/top_tokens", 3),
    ]
    assert monitor.last_top_tokens[0].text.replace("|", "\\|") in text_logger.texts[-1][1]
    assert text_logger.texts[-1][1].startswith(f"| # | {FORWARD_KL} | position |")
    assert f"Highest per-token {FORWARD_KL} at step 4" in caplog.text
    assert monitor.last_top_tokens[0].text in caplog.text


def test_text_and_plot_name_the_divergence_and_the_metric_keys_do_not(
    tmp_path, caplog, monkeypatch
):
    """With JSD the log line, the top-token table and the plot say ``JSD(β=0.5)``, never KL;
    the metric keys are the same ``div/...`` as for any other divergence."""
    from matplotlib.figure import Figure

    drawn: list[tuple[str, str, str]] = []
    savefig = Figure.savefig

    def spy(fig: Any, *args: Any, **kwargs: Any) -> Any:
        drawn.extend((ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    label = "JSD(β=0.5)"
    module = _module(divergence="jsd")
    assert divergence_label(module) == label
    monitor = PerTokenDivergenceMonitor(every_n_steps=1, top_k=2, position_buckets=2)
    plot = DivergencePlot(dirpath=tmp_path / "plots", max_tokens=50)
    csv_logger, text_logger = CSVLogger(tmp_path), TextLogger()
    caplog.set_level(logging.INFO, logger="lightning_kd.callbacks.per_token_divergence")
    trainer = _trainer(
        tmp_path, max_steps=2, callbacks=[monitor, plot], logger=[csv_logger, text_logger]
    )
    trainer.fit(module, datamodule=Data(samples=8))

    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lightning_kd.callbacks")]
    assert len(lines) == 2 and all(f"Highest per-token {label} at step" in m for m in lines)
    assert f"1. {label} " in lines[-1] and not any("KL" in m for m in lines)
    assert [tag for tag, _, _ in text_logger.texts] == ["div/top_tokens"] * 2
    for _, table, _ in text_logger.texts:
        assert table.startswith(f"| # | {label} | position |") and "KL" not in table

    keys = {key for metrics, _ in text_logger.metrics for key in metrics}
    keys |= set(_csv_rows(csv_logger)[0])
    assert set(STATS) | {"div/pos_00", "div/pos_01"} <= keys
    assert not any(key.startswith("kl/") for key in keys), sorted(keys)
    assert {key for h in monitor.history for key in h["metrics"]} <= keys

    assert plot.plot_path is not None and plot.plot_path.name == "divergence_per_token.png"
    (hist_title, hist_x, _), by_position = drawn
    assert hist_title.startswith(f"{label} per token (") and hist_x == f"per-token {label}"
    assert by_position == (f"mean {label} by position", "position in sequence", f"mean {label}")
    assert not any("KL" in text for item in drawn for text in item)


def test_divergence_label_falls_back_to_divergence():
    assert divergence_label(_module()) == FORWARD_KL
    assert divergence_label(_module(divergence="tvd")) == KDLoss(divergence="tvd").divergence.label
    assert divergence_label(FixedDivergence(0)) == "divergence"  # no loss
    assert divergence_label(SimpleNamespace(loss=SimpleNamespace())) == "divergence"


@pytest.mark.parametrize("key", ["per_token_div", "per_token_kl"])
def test_callbacks_read_per_token_div_and_the_0_1_key(tmp_path, key):
    """``per_token_div`` is read, and so is 0.1's ``per_token_kl`` when only it is there."""
    recorder = Recorder()
    monitor = PerTokenDivergenceMonitor(every_n_steps=1, top_k=2, position_buckets=3)
    plot = DivergencePlot(dirpath=tmp_path, max_tokens=1000)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*per_token")  # no "found none" warning
        trainer = _trainer(tmp_path, max_steps=2, callbacks=[recorder, monitor, plot])
        trainer.fit(FixedDivergence(0, key))
    assert [h["step"] for h in monitor.history] == [1, 2]
    for entry in monitor.history:
        data = recorder.completing(entry["step"])
        values = data["div"][data["valid"]].double()
        assert entry["metrics"]["div/tokens"] == values.numel()
        assert entry["metrics"]["div/mean"] == _approx(values.mean())
    assert plot.sample.seen == sum(int(d["valid"].sum()) for _, d in recorder.records) > 0
    assert plot.plot_path is not None and plot.plot_path.is_file()


def test_per_token_div_wins_over_the_0_1_key():
    div, kl, valid = torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    got = per_token_outputs({"per_token_kl": kl, "per_token_div": div, "valid_mask": valid})
    assert got is not None and torch.equal(got[0], div)
    with pytest.raises(ValueError, match="per_token_kl and valid_mask"):
        per_token_outputs({"per_token_kl": kl, "valid_mask": valid[:, :2]})
    assert per_token_outputs({"loss": kl, "valid_mask": valid}) is None


def test_monitor_state_survives_checkpoint_and_resume(tmp_path):
    ckpt_dir = tmp_path / "ckpt"

    def fit(
        steps: int,
        monitor: PerTokenDivergenceMonitor,
        save: bool = False,
        resume: Path | None = None,
        plot: DivergencePlot | None = None,
    ) -> None:
        callbacks: list[L.Callback] = [monitor] if plot is None else [monitor, plot]
        if save:
            callbacks.append(ModelCheckpoint(ckpt_dir, save_last=True, every_n_train_steps=2))
        trainer = _trainer(
            tmp_path, max_steps=steps, callbacks=callbacks, enable_checkpointing=save
        )
        trainer.fit(_module(), datamodule=Data(samples=8), ckpt_path=resume)

    straight = PerTokenDivergenceMonitor(every_n_steps=2, top_k=2, position_buckets=3)
    fit(4, straight)
    assert [h["step"] for h in straight.history] == [2, 4]
    # Without a tokenizer the top tokens are shown as ids.
    top = straight.last_top_tokens[0]
    assert top.text == f"{list(top.context_ids)} → {top.target_id}"

    # Round trip through a checkpoint-safe (weights_only) save.
    torch.save(straight.state_dict(), tmp_path / "monitor.pt")
    state = torch.load(tmp_path / "monitor.pt", weights_only=True)
    copy = PerTokenDivergenceMonitor(every_n_steps=2, top_k=2, position_buckets=3)
    copy.load_state_dict(state)
    assert copy.history == straight.history and copy.num_summaries == 2 and copy.last_step == 4
    assert copy.last_top_tokens == straight.last_top_tokens
    short = PerTokenDivergenceMonitor(history_size=1)
    short.load_state_dict(state)
    assert short.history == straight.history[-1:] and short.num_summaries == 2

    # A real resume from step 2 continues the history without summarising step 2 again.
    def new_plot() -> DivergencePlot:
        return DivergencePlot(dirpath=tmp_path / "plots", max_tokens=30)

    first = PerTokenDivergenceMonitor(every_n_steps=2, top_k=2, position_buckets=3)
    fit(2, first, save=True, plot=new_plot())
    resumed = PerTokenDivergenceMonitor(every_n_steps=2, top_k=2, position_buckets=3)
    resumed_plot = new_plot()
    fit(4, resumed, resume=ckpt_dir / "last.ckpt", plot=resumed_plot)
    assert [h["step"] for h in resumed.history] == [2, 4] and resumed.num_summaries == 2
    assert resumed.history[0] == first.history[0]
    for name, value in straight.history[1]["metrics"].items():
        assert resumed.history[1]["metrics"][name] == _approx(value, rel=1e-5)

    # A 0.1 checkpoint: the states under the 0.1 class names, with 0.1's keys (``kl/...``
    # metrics, ``kl`` in the top tokens). Resuming from it restores both callbacks.
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    states = ckpt["callbacks"]
    old = states["PerTokenKLMonitor"] = states.pop("PerTokenDivergenceMonitor")
    states["KLPlot"] = states.pop("DivergencePlot")
    for entry in old["history"]:
        entry["metrics"] = {k.replace("div/", "kl/"): v for k, v in entry["metrics"].items()}
        for token in entry["top_tokens"]:
            token["kl"] = token.pop("value")
    torch.save(ckpt, tmp_path / "v0_1.ckpt")
    legacy, legacy_plot = (
        PerTokenDivergenceMonitor(every_n_steps=2, top_k=2, position_buckets=3),
        new_plot(),
    )
    fit(4, legacy, resume=tmp_path / "v0_1.ckpt", plot=legacy_plot)
    assert legacy.history == resumed.history and legacy.num_summaries == 2
    for got, want in zip(legacy_plot.plotted, resumed_plot.plotted, strict=True):
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want


def test_0_1_monitor_states_load():
    """A state saved by 0.1: ``kl/...`` metrics and top tokens with ``kl`` for ``value``."""
    token = {"kl": 1.5, "position": 3, "sample": 1, "dp_rank": 0, "target_id": 7,
             "context_ids": [5, 6], "text": "[5, 6] → 7"}  # fmt: skip
    assert TopToken.from_dict(token) == TopToken(1.5, 3, 1, 0, 7, (5, 6), "[5, 6] → 7")
    assert TopToken.from_dict(token).value == 1.5 and "kl" in token  # not consumed
    state = {
        "num_summaries": 1,
        "last_step": 2,
        "history": [
            {"step": 2, "metrics": {"kl/mean": 0.5, "kl/tokens": 9.0, "kl/pos_00": 0.4},
             "top_tokens": [token]},
        ],
    }  # fmt: skip
    monitor = PerTokenDivergenceMonitor()
    monitor.load_state_dict(state)
    assert monitor.last_metrics == {"div/mean": 0.5, "div/tokens": 9.0, "div/pos_00": 0.4}
    assert monitor.last_top_tokens == [TopToken.from_dict(token)]
    assert monitor.history[0]["top_tokens"] == [TopToken.from_dict(token).to_dict()]
    assert monitor.num_summaries == 1 and monitor.last_step == 2


def test_0_1_names_are_aliases_and_instantiate_from_their_class_paths():
    from jsonargparse import ArgumentParser

    import lightning_kd.callbacks as callbacks

    assert callbacks.PerTokenKLMonitor is PerTokenDivergenceMonitor
    assert callbacks.KLPlot is DivergencePlot and callbacks.TopKLToken is TopToken
    assert callbacks.KLSample is callbacks.DivergenceSample
    # As LightningCLI reads ``trainer.callbacks`` from a 0.1 YAML config.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    config = [
        {"class_path": "lightning_kd.callbacks.PerTokenKLMonitor",
         "init_args": {"every_n_steps": 3}},
        {"class_path": "lightning_kd.callbacks.KLPlot", "init_args": {"bins": 7}},
    ]  # fmt: skip
    parsed = parser.parse_args(["--callbacks", json.dumps(config)])
    # `instantiate` since jsonargparse 4.49; the project accepts >= 4.35.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    monitor, plot = instantiate(parsed).callbacks
    assert type(monitor) is PerTokenDivergenceMonitor and monitor.every_n_steps == 3
    assert type(plot) is DivergencePlot and plot.bins == 7


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ("lightning_kd.callbacks.per_token_kl", "lightning_kd.callbacks.per_token_divergence",
         ("PerTokenKLMonitor", "PerTokenDivergenceMonitor", "TopKLToken")),
        ("lightning_kd.callbacks.kl_plot", "lightning_kd.callbacks.divergence_plot",
         ("KLPlot", "DivergencePlot", "KLSample")),
    ],
)  # fmt: skip
def test_0_1_callback_modules_import_with_a_deprecation_warning(old, new, names):
    """Submodules of a package go through ``lightning_kd.MOVED_MODULES`` too."""
    code = (
        "import importlib, sys, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    import {old} as old\n"
        f"    from {old} import {', '.join(names)}\n"
        f"new = importlib.import_module({new!r})\n"
        f"assert old is new and sys.modules[{old!r}] is new\n"
        f"assert {names[0]} is new.{names[0]} and {names[1]} is new.{names[1]}\n"
        f"assert any({new!r} in str(w.message) and w.category is DeprecationWarning "
        "for w in caught), [str(w.message) for w in caught]\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_callbacks_warn_once_when_outputs_lack_the_per_token_divergence(tmp_path):
    class LossOnly(DistillationModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    student, teacher = make_models()
    monitor, plot = PerTokenDivergenceMonitor(every_n_steps=1), DivergencePlot(dirpath=tmp_path)
    with pytest.warns(UserWarning, match="per_token_div") as record:
        _trainer(tmp_path, max_steps=3, callbacks=[monitor, plot]).fit(
            LossOnly(student, teacher), datamodule=Data(samples=12)
        )
    assert sum("per_token_div" in str(w.message) for w in record) == 2  # once per callback
    assert monitor.history == [] and plot.sample.seen == 0 and plot.plot_path is None


# ---------------------------------------------------------------------- DivergencePlot
def test_plot_writes_a_png_from_a_uniform_sample_and_exact_position_means(tmp_path):
    recorder = Recorder()
    plot = DivergencePlot(max_tokens=20, bins=10)
    logger = CSVLogger(tmp_path)
    trainer = _trainer(tmp_path, max_steps=3, callbacks=[recorder, plot], logger=logger)
    trainer.fit(_module(), datamodule=Data(samples=12))

    assert plot.plot_path == Path(logger.log_dir) / "divergence_per_token.png"
    assert plot.plotted is not None and plot.plotted.seen == plot.sample.seen
    png = plot.plot_path.read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5_000

    div = torch.cat([d["div"] for _, d in recorder.records])
    valid = torch.cat([d["valid"] for _, d in recorder.records])
    sample = plot.sample
    assert sample.seen == int(valid.sum()) > 20
    assert sample.values.numel() == sample.keys.numel() == 20
    assert torch.isin(sample.values, div[valid]).all()
    assert not torch.equal(sample.values.sort()[0], div[valid][:20].sort()[0])
    assert torch.equal(sample.position_count, valid.sum(0).double())  # counts: exact
    # Sums of float32 values, per batch then over batches: float32 precision, not float64's.
    torch.testing.assert_close(sample.position_sum, (div * valid).double().sum(0), **F32_SUM)

    torch.save(plot.state_dict(), tmp_path / "plot.pt")
    copy = DivergencePlot(max_tokens=20)
    copy.load_state_dict(torch.load(tmp_path / "plot.pt", weights_only=True))
    for got, want in zip(copy.sample, sample, strict=True):
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want
    smaller = DivergencePlot(max_tokens=5)
    smaller.load_state_dict(plot.state_dict())
    assert torch.equal(smaller.sample.keys.sort()[0], sample.keys.sort()[0][:5])


def test_plot_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    plot = DivergencePlot(dirpath=tmp_path / "plots")
    with pytest.warns(UserWarning, match="matplotlib") as record:
        trainer = _trainer(tmp_path, max_steps=2, callbacks=[plot])
        trainer.fit(_module(), datamodule=Data(samples=8))
    assert sum("matplotlib" in str(w.message) for w in record) == 1
    assert trainer.global_step == 2
    assert plot.plot_path is None and not (tmp_path / "plots").exists()
    assert plot.sample.seen == 0


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: PerTokenDivergenceMonitor(every_n_steps=0), "every_n_steps"),
        (lambda: PerTokenDivergenceMonitor(every_n_steps=1.5), "every_n_steps"),
        (lambda: PerTokenDivergenceMonitor(top_k=-1), "top_k"),
        (lambda: PerTokenDivergenceMonitor(top_k=True), "top_k"),
        (lambda: PerTokenDivergenceMonitor(position_buckets=0), "position_buckets"),
        (lambda: PerTokenDivergenceMonitor(context_tokens=0), "context_tokens"),
        (lambda: PerTokenDivergenceMonitor(history_size=0), "history_size"),
        (lambda: DivergencePlot(filename=""), "filename"),
        (lambda: DivergencePlot(filename="sub/div.png"), "filename"),
        (lambda: DivergencePlot(dirpath=3), "dirpath"),
        (lambda: DivergencePlot(max_tokens=0), "max_tokens"),
        (lambda: DivergencePlot(bins=0), "bins"),
        (lambda: DivergencePlot(seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_rejected(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# ---------------------------------------------------------------------- tensor parallel
@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_ranks_are_not_double_counted(tmp_path):
    """TP ranks hold identical per-token divergences: reducing over the world instead of the
    data-parallel group would double the token counts (and the plot's position counts)."""
    reference = callback_run(tmp_path / "single")
    out = tmp_path / "tp2" / "result.json"
    out.parent.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--devices", "2", "--tp", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())

    assert [h["step"] for h in result["history"]] == [h["step"] for h in reference["history"]]
    assert len(reference["history"]) == 2
    for got, want in zip(result["history"], reference["history"], strict=True):
        assert got["metrics"].keys() == want["metrics"].keys()
        assert got["metrics"]["div/tokens"] == want["metrics"]["div/tokens"]
        for name, value in want["metrics"].items():
            assert got["metrics"][name] == pytest.approx(value, rel=1e-4), name
        assert [t["value"] for t in got["top_tokens"]] == pytest.approx(
            [t["value"] for t in want["top_tokens"]], rel=1e-4
        )
        assert [t["target_id"] for t in got["top_tokens"]] == [
            t["target_id"] for t in want["top_tokens"]
        ]
    assert result["seen"] == reference["seen"] > 0
    assert result["position_count"] == reference["position_count"]
    assert result["plot_written"] and reference["plot_written"]


# ---------------------------------------------------------------------- data parallel
def _rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Data-parallel rank ``rank``'s epoch of 2 batches: its own number of rows, sequence
    length and valid tokens, and a per-token divergence in the batch (as a model would compute
    it)."""
    gen = torch.Generator().manual_seed(100 + rank)
    rows, seq = 2 + rank, 6 + 3 * rank
    batches = []
    for _ in range(2):
        div = torch.rand(rows, seq, generator=gen) * (1 + rank)
        valid = torch.rand(rows, seq, generator=gen) > 0.3
        ids = torch.randint(0, 50, (rows, seq), generator=gen)
        labels = torch.where(valid, ids + 1, -100)
        batches.append({"div": div * valid, "valid": valid, "input_ids": ids, "labels": labels})
    return batches


class FixedDivergence(L.LightningModule):
    """Returns the batch's per-token divergence (times 1 + epoch, so that no two steps repeat) from
    ``training_step``, as DistillationModule does; one parameter, so the optimizer steps."""

    def __init__(self, rank: int, key: str = "per_token_div") -> None:
        super().__init__()
        self.rank, self.key = rank, key
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        div = batch["div"] * (1 + self.current_epoch)
        return {"loss": self.weight * div.sum(), self.key: div, "valid_mask": batch["valid"]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_rank_batches(self.rank), batch_size=None)


def _fit_rank(rank: int, root: Path, steps: int, save: bool = False, resume: bool = False):
    """A real single-device Trainer in this gloo process: the callbacks see no device mesh and
    an initialised process group, so (as under DDP) the whole world is their data-parallel
    group, and they merge over the other process's Trainer through their own collectives."""
    recorder = Recorder()
    monitor = PerTokenDivergenceMonitor(every_n_steps=2, top_k=4, position_buckets=3)
    plot = DivergencePlot(dirpath=root / "plots", max_tokens=6)
    callbacks: list[L.Callback] = [recorder, monitor, plot]
    if save:
        callbacks.append(ModelCheckpoint(root / "ckpt", save_last=True, every_n_train_steps=2))
    trainer = _trainer(root, max_steps=steps, callbacks=callbacks, enable_checkpointing=save)
    trainer.fit(FixedDivergence(rank), ckpt_path=root / "ckpt" / "last.ckpt" if resume else None)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, recorder.records)
    return monitor, plot, records


def _check_monitor(monitor: PerTokenDivergenceMonitor, records: list, steps: list[int]) -> None:
    """Each summary: the statistics of all ranks' tokens of the micro-batch of that step."""
    assert [h["step"] for h in monitor.history] == steps
    for entry in monitor.history:
        batches = [
            next(d for s, d in rank_records if s == entry["step"]) for rank_records in records
        ]
        values = torch.cat([d["div"][d["valid"]] for d in batches]).double()
        metrics = entry["metrics"]
        assert metrics["div/tokens"] == values.numel()
        assert metrics["div/mean"] == _approx(values.mean())
        assert metrics["div/p90"] == _approx(torch.quantile(values, 0.9))
        assert metrics["div/max"] == _approx(values.max())
        top = [TopToken.from_dict(t) for t in entry["top_tokens"]]
        assert [t.value for t in top] == [_approx(v) for v in values.sort(descending=True)[0][:4]]
        for t in top:
            data = batches[t.dp_rank]
            assert t.value == _approx(data["div"][t.sample, t.position])
            assert t.target_id == int(data["labels"][t.sample, t.position])
        buckets: list[list[float]] = [[], [], []]
        for data in batches:  # each rank buckets its own sequence length
            seq = data["div"].shape[1]
            for pos in range(seq):
                buckets[pos * 3 // seq] += data["div"][:, pos][data["valid"][:, pos]].tolist()
        for b, members in enumerate(buckets):
            assert metrics[f"div/pos_{b:02d}"] == _approx(sum(members) / len(members))


def _positions(records: list, steps: range) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-position divergence sums (float64) and counts of all ranks over ``steps``, and the
    number of valid tokens."""
    batches = [d for rank_records in records for s, d in rank_records if s in steps]
    length = max(d["div"].shape[1] for d in batches)
    sums = torch.zeros(length, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    for d in batches:
        seq = d["div"].shape[1]
        sums[:seq] += (d["div"] * d["valid"]).double().sum(0)
        counts[:seq] += d["valid"].sum(0).double()
    return sums, counts, int(counts.sum())


def _data_parallel_merges(rank: int, world_size: int, tmp_path: Path) -> None:
    # A straight run of 4 steps (2 epochs of 2 batches per rank).
    monitor, plot, records = _fit_rank(rank, tmp_path / f"straight{rank}", steps=4)
    _check_monitor(monitor, records, [2, 4])

    # The plot (both processes are rank 0 of their own Trainer, so both draw): the merged
    # sample is the bottom-k of the ranks' own samples; position counts are exact and position
    # sums float32-accurate over all ranks' tokens, padded to the longest sequence.
    merged = plot.plotted
    assert merged is not None and plot.plot_path is not None and plot.plot_path.is_file()
    samples = [None] * world_size
    dist.all_gather_object(samples, plot.sample)  # each rank's own, unmerged sample
    keys = torch.cat([sample.keys for sample in samples])
    assert merged.keys.numel() == 6 and torch.equal(merged.keys.sort()[0], keys.sort()[0][:6])
    pairs = {
        (float(k), float(v)) for sm in samples for k, v in zip(sm.keys, sm.values, strict=True)
    }
    assert {(float(k), float(v)) for k, v in zip(merged.keys, merged.values, strict=True)} <= pairs
    sums, counts, seen = _positions(records, range(1, 5))
    assert merged.seen == seen
    assert plot.sample.seen == _positions([records[rank]], range(1, 5))[2]  # its own tokens
    assert torch.equal(merged.position_count, counts)
    torch.testing.assert_close(merged.position_sum, sums, **F32_SUM)

    # Checkpoint at step 2 (state_dict merges over the ranks), resume to step 4: the restored
    # sample is carried on by rank 0 only, so no token is counted twice.
    first, _, first_records = _fit_rank(rank, tmp_path / f"resume{rank}", steps=2, save=True)
    state = torch.load(tmp_path / f"resume{rank}" / "ckpt" / "last.ckpt", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("DivergencePlot"))
    assert int(saved["seen"]) == _positions(first_records, range(1, 3))[2]  # both ranks'
    resumed, resumed_plot, resumed_records = _fit_rank(
        rank, tmp_path / f"resume{rank}", steps=4, resume=True
    )
    assert [s for s, _ in resumed_records[rank]] == [3, 4]
    assert resumed.history[0] == first.history[0]  # restored, not recomputed
    for name, value in monitor.history[1]["metrics"].items():
        assert resumed.history[1]["metrics"][name] == _approx(value)
    own_after = _positions([resumed_records[rank]], range(3, 5))[2]
    assert resumed_plot.sample.seen == (int(saved["seen"]) if rank == 0 else 0) + own_after
    final = resumed_plot.plotted
    assert final is not None and final.seen == seen
    assert torch.equal(final.position_count, counts)
    torch.testing.assert_close(final.position_sum, sums, **F32_SUM)


@pytest.mark.distributed
@pytest.mark.slow
def test_data_parallel_ranks_are_merged(tmp_path):
    """Two gloo processes as two data-parallel ranks with different token counts and
    sequence lengths: the monitor and the plot see the union of their tokens, and a resume
    from a checkpoint keeps the plot's tokens once."""
    run_workers(_data_parallel_merges, 2, tmp_path)
