"""Lightning callbacks: the per-token KL monitors, and a checkpoint when a run stops."""

from lightning_kd.callbacks.checkpoint_on_stop import CheckpointOnStop, Stopped
from lightning_kd.callbacks.kl_plot import KLPlot, KLSample
from lightning_kd.callbacks.per_token_kl import PerTokenKLMonitor, TopKLToken

__all__ = ["CheckpointOnStop", "KLPlot", "KLSample", "PerTokenKLMonitor", "Stopped", "TopKLToken"]
