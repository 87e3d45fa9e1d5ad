"""knowledge_distillation: knowledge distillation and block-distillation quantization for Keras 3.

The public names load on first use, so the command lines can parse their
flags and quiet TensorFlow's start-up before TensorFlow is imported.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "DeviceConfig": "knowledge_distillation.config",
    "TrainConfig": "knowledge_distillation.config",
    "Distiller": "knowledge_distillation.kd.distiller",
    "KDLoss": "knowledge_distillation.kd.losses",
    "soft_kl_divergence": "knowledge_distillation.kd.losses",
    "build_model": "knowledge_distillation.models",
    "load_model": "knowledge_distillation.models",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'knowledge_distillation' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))
