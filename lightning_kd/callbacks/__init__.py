"""Lightning callbacks that watch the per-token KL of a distillation run."""

from lightning_kd.callbacks.kl_plot import KLPlot, KLSample
from lightning_kd.callbacks.per_token_kl import PerTokenKLMonitor, TopKLToken

__all__ = ["KLPlot", "KLSample", "PerTokenKLMonitor", "TopKLToken"]
