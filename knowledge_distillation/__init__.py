"""knowledge_distillation: knowledge distillation and block-distillation quantization for Keras 3."""

__version__ = "0.1.0"

from knowledge_distillation.config import DeviceConfig, TrainConfig
from knowledge_distillation.kd.distiller import Distiller
from knowledge_distillation.kd.losses import KDLoss, soft_kl_divergence
from knowledge_distillation.models import build_model, load_model

__all__ = [
    "DeviceConfig",
    "Distiller",
    "KDLoss",
    "TrainConfig",
    "build_model",
    "load_model",
    "soft_kl_divergence",
]
