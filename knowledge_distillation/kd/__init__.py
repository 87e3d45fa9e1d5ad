"""Knowledge distillation proper: the `Distiller`, its losses, the teacher-output cache."""

from knowledge_distillation.kd.distiller import Distiller
from knowledge_distillation.kd.losses import KDLoss, as_distillation_loss, soft_kl_divergence

__all__ = ["Distiller", "KDLoss", "as_distillation_loss", "soft_kl_divergence"]
