"""lightning_kd: knowledge distillation of large language models for PyTorch Lightning."""

from lightning_kd.kd_loss import KDLoss, KDLossOutput
from lightning_kd.module import DistillationModule, LossTerms
from lightning_kd.tiny_llama import TinyLlama

__all__ = ["DistillationModule", "KDLoss", "KDLossOutput", "LossTerms", "TinyLlama"]
__version__ = "0.1.0"
