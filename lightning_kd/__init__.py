"""lightning_kd: knowledge distillation of large language models for PyTorch Lightning."""

from lightning_kd.kd_loss import KDLoss, KDLossOutput

__all__ = ["KDLoss", "KDLossOutput"]
__version__ = "0.1.0"
