"""Device set-up: Ascend through `npu_device`, or the GPU/CPU equivalents.

The trainer and the quantizer call `setup_device` once, before they build any
model, and use the returned `DeviceSession` for per-model preparation, extra
Keras callbacks and compile arguments.
"""

import logging

import keras

from knowledge_distillation.config import DeviceConfig

logger = logging.getLogger(__name__)


class DeviceSession:
    """What the device set-up decided, for the trainer and the quantizer.

    Args:
        config: the device flags.
        output_dir: the run's output folder (default home of dump paths).
    """

    def __init__(self, config, output_dir):
        self.config = config
        self.output_dir = output_dir
        self.on_npu = False

    def prepare_model(self, model):
        """Returns `model` ready for this device (dtype overrides and so on)."""
        return model

    def callbacks(self):
        """Extra Keras callbacks (dumps, overflow checks, profiling)."""
        return []

    def compile_kwargs(self):
        """Extra keyword arguments for `Model.compile`."""
        return {}


def setup_device(config: DeviceConfig, output_dir: str) -> DeviceSession:
    """Configures the device from the ModelZoo flags. Call once per process.

    Args:
        config: the device flags.
        output_dir: the run's output folder.

    Returns:
        A `DeviceSession`.
    """
    session = DeviceSession(config, output_dir)
    keras.mixed_precision.set_global_policy("float32")
    logger.info(
        "precision_mode=%s: running in float32 (device layer not built yet)",
        config.precision_mode,
    )
    pending = {
        "over_dump": config.over_dump,
        "data_dump_flag": config.data_dump_flag,
        "profiling": config.profiling,
        "use_mixlist": config.use_mixlist,
        "fusion_off_flag": config.fusion_off_flag,
    }
    for flag, value in pending.items():
        if value:
            logger.warning("--%s is accepted but does nothing yet", flag)
    return session
