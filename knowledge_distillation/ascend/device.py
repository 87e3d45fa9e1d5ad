"""Device set-up: Ascend through `npu_device`, or the GPU/CPU equivalents.

The trainer and the quantizer call `setup_device` once, before they build any
model, and use the returned `DeviceSession` for per-model preparation, the
optimizer, extra Keras callbacks and compile arguments:

```python
session = setup_device(config.device, output_dir)
model = session.prepare_model(build_model(...))
model.compile(optimizer=session.wrap_optimizer(keras.optimizers.Adam()),
              loss=..., **session.compile_kwargs())
model.fit(train_ds, callbacks=[*my_callbacks, *session.callbacks()])
```

When `import npu_device` succeeds, the ModelZoo flags configure
`npu_device.global_options()` exactly as ModelZoo's `npu_config()` does and
CANN does the work. Elsewhere each flag does its nearest TensorFlow/Keras
equivalent: `precision.py` (precision modes, mixlists),
`fusion.py` (fusion switches), `dump.py` and `monitors.py` (data dump,
overflow detection, static shapes, profiling).
"""

import importlib
import json
import logging
import os
import tempfile

import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.ascend import dump as data_dump
from knowledge_distillation.ascend import monitors
from knowledge_distillation.ascend import fusion as device_fusion
from knowledge_distillation.ascend import precision as device_precision
from knowledge_distillation.config import DEFAULT_STEPS_PER_EXECUTION, DeviceConfig
from knowledge_distillation.ascend.probe import StepProbe
from knowledge_distillation.util import cpu as cpu_info
from knowledge_distillation.util.files import read_json_file

logger = logging.getLogger(__name__)

# Flag -> folder under the output directory when the flag's path is not given.
DEFAULT_DUMP_DIRS = {
    "data_dump_path": "data_dump",
    "over_dump_path": "over_dump",
    "profiling_dump_path": "profiling",
}
_ENABLING_FLAG = {
    "data_dump_path": "data_dump_flag",
    "over_dump_path": "over_dump",
    "profiling_dump_path": "profiling",
}

# Process-wide state that TensorFlow or CANN keep anyway: which npu_device
# module was opened (open() must run once), and what the fusion switch
# changed (so a later setup_device starts from TensorFlow's defaults).
_opened_npu_device = None
_fusion_switcher = device_fusion.FusionSwitcher()


def parse_dump_steps(text):
    """Parses `--data_dump_step`: `"10"`, `"10|20"` or Ascend's `"0|5|10-20"`.

    Returns:
        A sorted tuple of global steps (from 0).
    """
    steps = set()
    for part in str(text).split("|"):
        part = part.strip()
        try:
            if "-" in part:
                first, last = (int(p) for p in part.split("-"))
                if first > last:
                    raise ValueError
                steps.update(range(first, last + 1))
            else:
                steps.add(int(part))
        except ValueError:
            raise ValueError(
                f"--data_dump_step must be steps separated by '|', each a number or "
                f"a range like 10-20 (e.g. \"10\" or \"0|5|10-20\"), got {text!r}"
            ) from None
    if min(steps) < 0:
        raise ValueError(f"--data_dump_step steps must be >= 0, got {text!r}")
    return tuple(sorted(steps))


def _output_dir(flag, path):
    """Creates `path` and proves it writable; errors name the flag."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"--{flag}={path} cannot be written: {e.strerror or e}"
        ) from None
    return path


def _output_dirs(config, output_dir):
    paths = {}
    for flag, default in DEFAULT_DUMP_DIRS.items():
        if getattr(config, _ENABLING_FLAG[flag]):
            given = getattr(config, flag)
            paths[flag] = _output_dir(flag, given or os.path.join(output_dir, default))
    return paths


def _import_npu_device():
    try:
        return importlib.import_module("npu_device")
    except ModuleNotFoundError as e:
        if e.name != "npu_device":
            raise ImportError(
                f"npu_device is installed but one of its imports is missing: {e}"
            ) from e
        return None


def _profiling_options(path):
    # Same keys, values and order as ModelZoo's npu_config().
    return json.dumps(
        {
            "output": path,
            "training_trace": "on",
            "task_trace": "on",
            "aicpu": "on",
            "aic_metrics": "PipeUtilization",
            "fp_point": "",
            "bp_point": "",
        }
    )


def configure_npu(npu_device, config, paths):
    """Sets `npu_device.global_options()` as ModelZoo's `npu_config()` does.

    Args:
        npu_device: the imported `npu_device` module.
        config: the device flags.
        paths: `{flag: absolute folder}` of the enabled dump/profiling flags.
    """
    options = npu_device.global_options()
    if config.data_dump_flag:
        options.dump_config.enable_dump = True
        options.dump_config.dump_path = paths["data_dump_path"]
        options.dump_config.dump_step = config.data_dump_step
        options.dump_config.dump_mode = "all"
    if config.over_dump:
        options.dump_config.enable_dump_debug = True
        options.dump_config.dump_path = paths["over_dump_path"]
        options.dump_config.dump_debug_mode = "all"
    if config.profiling:
        options.profiling_config.enable_profiling = True
        options.profiling_config.profiling_options = _profiling_options(
            paths["profiling_dump_path"]
        )
    options.precision_mode = config.precision_mode
    if config.use_mixlist and device_precision.base_mode(config.precision_mode) == "allow_mix_precision":
        options.modify_mixlist = os.path.abspath(config.mixlist_file)
    if config.fusion_off_flag:
        options.fusion_switch_file = os.path.abspath(config.fusion_off_file)


class DeviceSession:
    """What the device set-up decided, for the trainer and the quantizer.

    Build it with `setup_device`.

    Attributes:
        config: the device flags.
        output_dir: the run's output folder (default home of dump paths).
        on_npu: whether `npu_device` was opened.
        low_policy: the low-precision Keras policy on GPU/CPU
            (`"mixed_float16"`, `"mixed_bfloat16"`, or `"float32"` on a CPU
            that cannot run bfloat16 well); None on Ascend.
        mixlist: the `MixList` in force (allow_mix_precision on GPU/CPU).
        fusion_plan: the `FusionPlan` applied, or None.
        paths: `{flag: absolute folder}` of the enabled dump/profiling flags.
        dump_steps: the `--data_dump_step` steps when data dump is on.
    """

    def __init__(
        self,
        config,
        output_dir,
        on_npu=False,
        low_policy=None,
        mixlist=None,
        fusion_plan=None,
        paths=None,
        dump_steps=(),
    ):
        self.config = config
        self.output_dir = output_dir
        self.on_npu = on_npu
        self.low_policy = low_policy
        self.mixlist = mixlist
        self.fusion_plan = fusion_plan
        self.paths = dict(paths or {})
        self.dump_steps = tuple(dump_steps)

    def prepare_model(self, model):
        """Applies the precision mode to `model`'s layers, in place.

        Each layer gets a dtype policy (see `precision.py`); weights
        are kept. Call it before `compile`; a Distiller may be passed whole
        (teacher and student are both prepared). On Ascend, CANN applies the
        precision mode and the model is returned unchanged.

        Returns:
            `model`.
        """
        if self.on_npu:
            return model
        mode = self.config.precision_mode
        plan = device_precision.plan_layer_policies(
            model, mode, self.low_policy, self.mixlist
        )
        device_precision.apply_layer_policies(plan)
        if plan and getattr(model, "train_function", None) is not None:
            # Already traced under the old dtypes: trace again.
            model.train_function = None
            model.test_function = None
            model.predict_function = None
        logger.info(
            "precision_mode=%s on %s: %s",
            mode,
            model.name,
            device_precision.summarize_plan(plan) if plan else "dtypes kept as built",
        )
        return model

    def wrap_optimizer(self, optimizer):
        """Adds dynamic loss scaling where layers compute in float16.

        Keras wraps the optimizer itself only when the *model's* policy is
        mixed_float16; per-layer float16 (allow_fp32_to_fp16, a loaded model)
        needs it done here. bfloat16 has float32's range and needs none.

        Returns:
            A `keras.optimizers.LossScaleOptimizer` around `optimizer`, or
            `optimizer` itself.
        """
        optimizer = keras.optimizers.get(optimizer)
        if (
            self.on_npu
            or self.low_policy != "mixed_float16"
            or self.config.precision_mode in device_precision.FLOAT32_MODES
            or isinstance(optimizer, compat.LossScaleOptimizer)
        ):
            return optimizer
        logger.info("float16 compute: dynamic loss scaling (LossScaleOptimizer)")
        return compat.LossScaleOptimizer(optimizer)

    def compile_kwargs(self):
        """Extra `Model.compile` arguments: `jit_compile=False` where XLA must be off.

        Off on Ascend (npu_device compiles the graph itself), when fusions are
        switched off (XLA would fuse them again), and with data dump or
        overflow detection (their in-step probe writes variables whose shape
        changes with the batch). Otherwise Keras' "auto" stands: XLA on GPU,
        not on CPU.
        """
        if self._xla_off_reasons():
            return compat.jit_compile_off()
        return {}

    def steps_per_execution(self, requested=None):
        """Training steps per compiled call, and why.

        `requested` (the flag) wins, except where a callback inspects every
        step (data dump, overflow detection, the profiler window), which
        needs 1. Left unset: 1 on Ascend (npu_device runs the loop) and with
        those callbacks, else `DEFAULT_STEPS_PER_EXECUTION`.

        Returns:
            `(steps, reason)`.

        Raises:
            ValueError: `requested` > 1 with a per-step callback on.
        """
        per_step = self._per_step_flags()
        if requested is not None:
            if requested > 1 and per_step:
                raise ValueError(
                    f"--steps_per_execution {requested}: {', '.join(per_step)} inspects "
                    "every training step and needs --steps_per_execution 1")
            return requested, "--steps_per_execution"
        if self.on_npu:
            return 1, "npu_device runs the training loop"
        if per_step:
            return 1, f"{', '.join(per_step)} inspects every step"
        return DEFAULT_STEPS_PER_EXECUTION, "default on GPU/CPU"

    def _per_step_flags(self):
        if self.on_npu:
            return []
        names = ("data_dump_flag", "over_dump", "profiling")
        return [f"--{name}" for name in names if getattr(self.config, name)]

    def _xla_off_reasons(self):
        reasons = []
        if self.on_npu:
            reasons.append("npu_device")
        else:
            if self.fusion_plan is not None and self.fusion_plan.xla_off:
                reasons.append("--fusion_off_flag")
            if self.config.data_dump_flag:
                reasons.append("--data_dump_flag")
            if self.config.over_dump:
                reasons.append("--over_dump")
        return reasons

    def callbacks(self):
        """Fresh callbacks for one `fit` (build a new list for every fit).

        On GPU/CPU: `DataDump`, `OverflowMonitor`, `ProfilerWindow` for their
        flags. Everywhere: `StaticShapeGuard` with `--static`.
        """
        config = self.config
        dump = config.data_dump_flag and not self.on_npu
        overflow = config.over_dump and not self.on_npu
        probe = None
        if dump or overflow or config.static:
            probe = StepProbe(capture=dump, check_finite=overflow)
        callbacks = []
        if config.static:
            callbacks.append(monitors.StaticShapeGuard(probe))
        if dump:
            callbacks.append(
                data_dump.DataDump(
                    probe, self.paths["data_dump_path"], self.dump_steps
                )
            )
        if overflow:
            callbacks.append(
                monitors.OverflowMonitor(probe, self.paths["over_dump_path"])
            )
        if config.profiling and not self.on_npu:
            callbacks.append(
                monitors.ProfilerWindow(self.paths["profiling_dump_path"])
            )
        return callbacks


def _read_mixlist(config, on_npu):
    if not config.use_mixlist:
        return None
    if device_precision.base_mode(config.precision_mode) != "allow_mix_precision":
        logger.warning(
            "--use_mixlist is ignored with --precision_mode=%s: mixlists apply only "
            "to allow_mix_precision (as on Ascend)",
            config.precision_mode,
        )
        return None
    data = read_json_file(config.mixlist_file, "mixlist_file")
    return device_precision.parse_mixlist(
        data, config.mixlist_file, check_op_types=not on_npu
    )


def setup_device(config: DeviceConfig, output_dir: str) -> DeviceSession:
    """Configures the device from the ModelZoo flags. Call once per process.

    Everything that can fail on the user's input fails here, before any
    training: output folders are created and proven writable, the mixlist
    and fusion switch files are read and checked, dump steps are parsed.

    Args:
        config: the device flags.
        output_dir: the run's output folder; dump and profiling folders go
            under it unless their flags name one.

    Returns:
        A `DeviceSession`.
    """
    global _opened_npu_device
    npu_device = _import_npu_device()
    on_npu = npu_device is not None
    paths = _output_dirs(config, output_dir)
    dump_steps = parse_dump_steps(config.data_dump_step) if config.data_dump_flag else ()
    mixlist = _read_mixlist(config, on_npu)
    fusion_plan = None
    if config.fusion_off_flag:
        fusion_plan = device_fusion.load_fusion_switch(
            config.fusion_off_file, map_passes=not on_npu
        )

    if on_npu:
        keras.mixed_precision.set_global_policy("float32")
        if _opened_npu_device is npu_device:
            logger.warning("npu_device is already open; its options stay as first set")
        else:
            configure_npu(npu_device, config, paths)
            npu_device.open().as_default()
            _opened_npu_device = npu_device
            logger.info(
                "Ascend NPU: npu_device opened with precision_mode=%s",
                config.precision_mode,
            )
        return DeviceSession(
            config, output_dir, on_npu=True, paths=paths, dump_steps=dump_steps,
            fusion_plan=fusion_plan,
        )

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    mode = config.precision_mode
    low_policy = device_precision.mode_low_policy(mode, device_precision.low_precision_policy(has_gpu))
    if (not has_gpu and mode not in device_precision.FLOAT32_MODES
            and not compat.cpu_runs_bfloat16()):
        logger.warning(
            "--precision_mode=%s: %s cannot run bfloat16 convolutions on the CPU, so "
            "every layer computes in float32 here (on Ascend, CANN applies the mode)",
            mode, compat.STACK)
        low_policy = "float32"
    elif (not has_gpu and mode not in device_precision.FLOAT32_MODES
          and mode not in device_precision.BF16_MODES and cpu_info.has_bf16() is False):
        # Emulated bfloat16 is slower than float32 (cnn teacher: 335 against 650
        # examples/s, 2-core Xeon without avx512_bf16); the bf16 modes still ask for it.
        bf16_twin = {v: k for k, v in device_precision.BF16_MODES.items()}.get(mode)
        logger.info(
            "--precision_mode=%s: this CPU has no bfloat16 instructions (avx512_bf16/"
            "amx_bf16/bf16), where bfloat16 is emulated and slower than float32, so every "
            "layer computes in float32 here%s", mode,
            f"; --precision_mode={bf16_twin} forces bfloat16" if bf16_twin else "")
        low_policy = "float32"
    global_policy = device_precision.global_policy_for(mode, low_policy)
    keras.mixed_precision.set_global_policy(global_policy)
    _log_precision_choice(mode, low_policy, has_gpu, global_policy)

    if fusion_plan is not None:
        _fusion_switcher.apply(fusion_plan, config.fusion_off_file)
    else:
        _fusion_switcher.reset()
    session = DeviceSession(
        config,
        output_dir,
        low_policy=low_policy,
        mixlist=(mixlist or device_precision.MixList())
        if device_precision.base_mode(mode) == "allow_mix_precision"
        else None,
        fusion_plan=fusion_plan,
        paths=paths,
        dump_steps=dump_steps,
    )
    for flag, path in paths.items():
        logger.info("--%s: %s", flag, path)
    reasons = session._xla_off_reasons()
    if reasons:
        logger.info("XLA jit_compile off because of %s", ", ".join(reasons))
    return session


def _log_precision_choice(mode, low_policy, has_gpu, global_policy):
    low = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(low_policy, "float32")
    if mode in device_precision.FLOAT32_MODES:
        why = "no low precision in this mode"
    elif low == "float16":
        why = "a GPU is present: float16 with dynamic loss scaling"
    elif low == "float32":
        why = ("no GPU, and no bfloat16 CPU kernels in this TensorFlow"
               if not compat.cpu_runs_bfloat16() else
               "no GPU, and no bfloat16 instructions on this CPU")
    elif mode in device_precision.BF16_MODES:
        why = "the mode asks for bfloat16 (float32's range, no loss scaling)"
    else:
        why = "no GPU: CPUs compute low precision in bfloat16 (float32's range, no loss scaling)"
    meaning = {
        "must_keep_origin_dtype": "every layer keeps the dtype it was built with",
        "allow_fp32_to_fp16": f"matrix layers (Conv, Dense, Einsum) compute in {low}, "
        "the others keep float32",
        "allow_mix_precision": f"white-list layers compute in {low}, black-list ones "
        "(Softmax by default) keep float32, the others follow their input",
        "force_fp16": f"every floating-point layer computes in {low}",
        "force_fp32": "every floating-point layer computes in float32, even one built low",
        "allow_fp32_to_bf16": f"matrix layers (Conv, Dense, Einsum) compute in {low}, "
        "the others keep float32",
        "allow_mix_precision_bf16": f"white-list layers compute in {low}, black-list ones "
        "(Softmax by default) keep float32, the others follow their input",
    }[mode]
    logger.info(
        "precision_mode=%s: %s; variables stay float32; global policy %s (%s). "
        "Losses and the distillation softmax/KL are computed in float32.",
        mode,
        meaning,
        global_policy,
        why,
    )
    if (low == "bfloat16" and mode not in device_precision.FLOAT32_MODES and not has_gpu
            and cpu_info.has_bf16() is False):
        logger.warning(
            "this CPU has no bfloat16 instructions (avx512_bf16/amx_bf16): bfloat16 "
            "is emulated and slower than float32 (what allow_mix_precision computes in here)"
        )
