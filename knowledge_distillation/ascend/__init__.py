"""The ModelZoo device flags: npu_device set-up on Ascend, the nearest real thing on GPU/CPU.

`device.setup_device` reads a `DeviceConfig` and returns the `DeviceSession`
the trainer and the quantizer use. On an Ascend host it sets npu_device's
global options as ModelZoo's `npu_config()` does; elsewhere each flag does
its GPU/CPU equivalent: `precision` (precision modes and mixlists as Keras
dtype policies), `fusion` (fusion switches as Grappler options), `dump`
(tensor dumps), `monitors` (overflow detection, the static-shape guard,
profiling), all watching steps through `probe`.
"""

from knowledge_distillation.ascend.device import DeviceSession, setup_device

__all__ = ["DeviceSession", "setup_device"]
