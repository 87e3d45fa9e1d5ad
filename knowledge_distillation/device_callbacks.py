"""Keras callbacks doing on GPU/CPU what CANN does on Ascend for the debug flags.

- `DataDump` (`--data_dump_flag`): at the chosen steps, every layer's output
  and every trainable weight's gradient as `.npy`, with an `index.json`.
- `OverflowMonitor` (`--over_dump`): inf/nan detection every step, a report
  naming the first non-finite tensor and a dump of that step; stops training,
  or under dynamic loss scaling logs the skipped step and goes on.
- `StaticShapeGuard` (`--static`): the train step is traced once, with fully
  known shapes, for the whole `fit`.
- `ProfilerWindow` (`--profiling`): a TensorFlow profiler trace of a window
  of steps, in the layout TensorBoard's profile plugin reads.

All but the profiler share one `StepProbe` per `fit` (see `device_probe.py`);
`DeviceSession.callbacks()` builds a fresh set for every `fit`.
"""

import json
import logging
import math
import os

import keras
import numpy as np
import tensorflow as tf

from knowledge_distillation.device_probe import inspected_model, safe_file_name

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training hit inf/nan that loss scaling cannot absorb.

    Attributes:
        step: the global training step (from 0) of the first overflow.
        report_path: the JSON report naming the first non-finite tensor.
    """

    def __init__(self, message, step, report_path):
        super().__init__(message)
        self.step = step
        self.report_path = report_path


class TensorDumpWriter:
    """Writes replayed steps under `root` and keeps `root/index.json` current.

    Files are `root/step_<n>/<layer>.npy` for a layer's output
    (`<layer>.output_<i>.npy` for several), `<layer>.<weight>.grad.npy` for
    gradients, `input.npy` and `loss.npy`. bfloat16 tensors are stored as
    float32 (numpy has no bfloat16) and keep `"dtype": "bfloat16"` in the
    index.

    Args:
        root: folder of this model's dump.
        model_name: the fitted model's name.
        inspected_name: the model whose layers are dumped (a Distiller's
            student).
    """

    def __init__(self, root, model_name, inspected_name):
        self.root = root
        self.header = {"model": model_name, "inspected_model": inspected_name}
        self.steps = []
        self.entries = []

    def write(self, step, tensors):
        """Writes one `StepTensors`; returns its index entries."""
        step_dir = f"step_{step}"
        os.makedirs(os.path.join(self.root, step_dir), exist_ok=True)
        written = []

        def save(kind, layer, tensor, array, suffix=""):
            stem = safe_file_name(layer)
            if tensor not in (layer, "output"):
                stem += "." + safe_file_name(tensor)
            file = f"{step_dir}/{stem}{suffix}.npy"
            np.save(os.path.join(self.root, file), array)
            entry = {
                "step": step,
                "layer": layer,
                "kind": kind,
                "tensor": tensor,
                "shape": list(array.shape),
                "dtype": tensors.dtypes.get(id(array), str(array.dtype)),
                "file": file,
            }
            if entry["dtype"] != str(array.dtype):
                entry["stored_dtype"] = str(array.dtype)
            written.append(entry)

        for name, array in tensors.inputs:
            save("input", name, name, array)
        for layer, name, array in tensors.outputs:
            save("output", layer, name, array)
        save("loss", "loss", "loss", tensors.loss)
        for layer, name, array in tensors.gradients:
            save("gradient", layer, name, array, suffix=".grad")
        self.steps.append({"step": step, "loss_scale": tensors.loss_scale})
        self.entries.extend(written)
        _write_json(
            os.path.join(self.root, "index.json"),
            {**self.header, "steps": self.steps, "tensors": self.entries},
        )
        return written


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def non_finite_tensors(tensors):
    """Non-finite tensors of a replayed step, in the order they went wrong.

    Forward first (inputs, then layer outputs in layer order, then the loss),
    then gradients from the last layer back to the first, as backpropagation
    computes them, then weights that only the optimizer's update made
    non-finite (a learning rate too large). A gradient counts as non-finite
    when its loss-scaled value overflowed, even if unscaling would hide it.
    """
    found = []

    def check(kind, layer, tensor, array, scaled_finite=True):
        values = np.asarray(array, dtype=np.float64)
        nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        if nan or inf or not scaled_finite:
            found.append(
                {"kind": kind, "layer": layer, "tensor": tensor, "nan": nan, "inf": inf}
            )

    for name, array in tensors.inputs:
        check("input", name, name, array)
    for layer, name, array in tensors.outputs:
        check("output", layer, name, array)
    check("loss", "loss", "loss", tensors.loss)
    pairs = list(zip(tensors.gradients, tensors.scaled_gradients_finite))
    for (layer, name, array), scaled_finite in reversed(pairs):
        check("gradient", layer, name, array, scaled_finite)
    if not found:
        found.extend(
            {"kind": "update", "layer": layer, "tensor": name, "nan": None, "inf": None}
            for layer, name in tensors.non_finite_after_update
        )
    return found


def describe(entry):
    """`output of layer 'conv2d' (3 nan, 0 inf)` for a `non_finite_tensors` entry."""
    if entry["kind"] == "update":
        return (
            f"weight {entry['layer']}/{entry['tensor']} after the optimizer update "
            "(finite gradients: is the learning rate too large?)"
        )
    what = {
        "input": f"model input {entry['layer']!r}",
        "output": f"{entry['tensor']} of layer {entry['layer']!r}",
        "loss": "loss",
        "gradient": f"gradient of {entry['layer']}/{entry['tensor']}",
    }[entry["kind"]]
    return f"{what} ({entry['nan']} nan, {entry['inf']} inf)"


class _StepCounting(keras.callbacks.Callback):
    """Tracks the global training step (from 0, across epochs) in `self.step`."""

    def __init__(self):
        super().__init__()
        self.step = -1
        self._epoch = 0
        self._batches = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        steps = self.params.get("steps") if self.params else None
        self.step = self._epoch * steps + batch if steps else self._batches
        self._batches += 1


class _ProbeCallback(_StepCounting):
    def __init__(self, probe):
        super().__init__()
        self.probe = probe

    def set_model(self, model):
        super().set_model(model)
        self.probe.install(model)

    def on_train_begin(self, logs=None):
        if getattr(self.model, "steps_per_execution", 1) != 1:
            raise ValueError(
                f"{type(self).__name__} inspects every step: compile "
                f"{self.model.name!r} with steps_per_execution=1, got "
                f"{self.model.steps_per_execution}"
            )
        replicas = self.model.distribute_strategy.num_replicas_in_sync
        if replicas > 1:
            raise ValueError(
                "--data_dump_flag and --over_dump replay one device's step; they "
                f"do not run with --distributed ({replicas} replicas): train on "
                "one device to dump"
            )

    def on_train_end(self, logs=None):
        self.probe.uninstall()


class DataDump(_ProbeCallback):
    """Dumps every layer output and weight gradient at the chosen steps.

    Args:
        probe: the `StepProbe` of this fit (with `capture=True`).
        path: the `--data_dump_path` folder; this model's dump goes to
            `path/<model name>/`.
        steps: global steps (from 0) to dump.
    """

    def __init__(self, probe, path, steps):
        super().__init__(probe)
        self.path = path
        self.steps = frozenset(steps)
        self.dumped = []
        self.writer = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.probe.before_fit()
        self.writer = TensorDumpWriter(
            os.path.join(self.path, self.model.name),
            self.model.name,
            inspected_model(self.model).name,
        )

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        self.probe.request_capture(self.step in self.steps)

    def on_train_batch_end(self, batch, logs=None):
        if self.step in self.steps:
            entries = self.writer.write(self.step, self.probe.recompute())
            self.dumped.append(self.step)
            logger.info(
                "data dump: step %d of %s, %d tensors -> %s",
                self.step,
                self.model.name,
                len(entries),
                self.writer.root,
            )

    def on_train_end(self, logs=None):
        missing = sorted(self.steps - set(self.dumped))
        if missing:
            logger.warning(
                "--data_dump_step: step(s) %s of %s never ran (training ran %d steps)",
                missing,
                self.model.name,
                self._batches,
            )
        super().on_train_end(logs)


class OverflowMonitor(_ProbeCallback):
    """Detects inf/nan every step; reports and dumps the first overflow.

    Every step it checks that the loss and the updated weights are finite
    and, with a `LossScaleOptimizer`, whether the loss scale dropped (the
    optimizer found non-finite gradients and skipped the update). On the first
    overflow it replays the step to name the first non-finite tensor (inputs,
    then layer outputs in order, the loss, then gradients backwards), writes
    `path/<model>/overflow_report.json` and dumps the step's tensors beside it.

    Without loss scaling it then raises `NonFiniteError`. With dynamic loss
    scaling the skipped step is logged and training goes on, until the loss
    scale falls below 1: scaling cannot fix that overflow, so it raises too.

    Args:
        probe: the `StepProbe` of this fit (with `check_finite=True`).
        path: the `--over_dump_path` folder.
    """

    def __init__(self, probe, path):
        super().__init__(probe)
        self.path = path
        self.overflow_steps = []
        self.report_path = None
        self.loss_scaling = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.probe.before_fit()
        self.loss_scaling = isinstance(
            self.model.optimizer, keras.optimizers.LossScaleOptimizer
        )
        logger.info(
            "overflow detection on %s: %s",
            self.model.name,
            "dynamic loss scaling skips an overflowing step, which is logged, and "
            "training goes on"
            if self.loss_scaling
            else "training stops at the first overflow",
        )

    def on_train_batch_end(self, batch, logs=None):
        finite, scale_before, scale_after = self.probe.status()
        loss = _as_float((logs or {}).get("loss"))
        skipped = self.loss_scaling and scale_after < scale_before
        bad_loss = not self.loss_scaling and loss is not None and not math.isfinite(loss)
        if finite and not skipped and not bad_loss:
            return
        self.overflow_steps.append(self.step)
        first = None
        if self.report_path is None:
            first = self._report(finite)
        where = f"report: {self.report_path}"
        if self.loss_scaling and finite:
            logger.warning(
                "overflow at step %d of %s: dynamic loss scaling skipped the update "
                "(loss scale %g -> %g); training goes on%s",
                self.step,
                self.model.name,
                scale_before,
                scale_after,
                f"; first non-finite tensor: {first}; {where}" if first else "",
            )
            if scale_after >= 1.0:
                return
            raise NonFiniteError(
                f"overflow at step {self.step} of {self.model.name}: the loss scale "
                f"fell to {scale_after:g} after {len(self.overflow_steps)} skipped "
                f"steps, so loss scaling cannot absorb it; {where}",
                self.step,
                self.report_path,
            )
        raise NonFiniteError(
            f"overflow at step {self.step} of {self.model.name}: "
            f"{'first non-finite tensor: ' + first if first else 'non-finite values'}; "
            f"{where}",
            self.step,
            self.report_path,
        )

    def _report(self, weights_finite):
        tensors = self.probe.recompute()
        root = os.path.join(self.path, self.model.name)
        writer = TensorDumpWriter(
            root, self.model.name, inspected_model(self.model).name
        )
        writer.write(self.step, tensors)
        found = non_finite_tensors(tensors)
        first = describe(found[0]) if found else (
            "none when the step is replayed (its tensors are dumped)"
        )
        self.report_path = os.path.join(root, "overflow_report.json")
        _write_json(
            self.report_path,
            {
                "model": self.model.name,
                "inspected_model": inspected_model(self.model).name,
                "step": self.step,
                "first_non_finite": found[0] if found else None,
                "first_layer": found[0]["layer"] if found else None,
                "non_finite_tensors": found,
                "loss": float(tensors.loss),
                "loss_scale": tensors.loss_scale,
                "weights_finite_after_step": weights_finite,
                "action": "step skipped by dynamic loss scaling, training goes on"
                if self.loss_scaling and weights_finite
                else "training stopped",
                "dump_index": "index.json",
            },
        )
        return first


def _as_float(value):
    if value is None:
        return None
    return float(np.asarray(value))


class StaticShapeGuard(_ProbeCallback):
    """`--static`: one trace of the train step, with fully known shapes.

    Raises `ValueError` when the step is traced with an unknown dimension (the
    data has a partial last batch: batch with `drop_remainder=True`) and
    `RuntimeError` when it is traced a second time in the same `fit`.

    Args:
        probe: the `StepProbe` of this fit.
    """

    def __init__(self, probe):
        super().__init__(probe)
        probe.trace_listeners.append(self._on_trace)

    @property
    def traces(self):
        """How many times the train step was traced in this fit."""
        return self.probe.traces

    def on_train_begin(self, logs=None):
        self._stepped = False  # any steps_per_execution is fine for counting traces

    def on_train_batch_end(self, batch, logs=None):
        self._stepped = True

    def _on_trace(self, probe, shapes):
        name = probe.model.name
        if (
            not getattr(self, "_stepped", False)
            and probe.traces == 2
            and shapes == probe.trace_shapes[0]
        ):
            # tf.function traces a first call again when that trace created
            # variables (state Keras builds lazily); the retrace with the same
            # shapes, before any step ran, is that one and not a shape change.
            probe.traces -= 1
            probe.trace_shapes.pop()
            return
        if any(dim is None for shape in shapes for dim in shape):
            raise ValueError(
                f"--static: the train step of {name!r} got input shapes {shapes} "
                "with an unknown dimension; static shapes need full batches "
                "(batch the dataset with drop_remainder=True)"
            )
        if probe.traces > 1:
            raise RuntimeError(
                f"--static: the train step of {name!r} was traced again (trace "
                f"{probe.traces}, input shapes {shapes}; first trace "
                f"{probe.trace_shapes[0]}); static shapes allow one trace per run"
            )

    def on_train_end(self, logs=None):
        logger.info(
            "--static: train step of %s traced %d time(s), input shapes %s",
            self.model.name,
            self.probe.traces,
            self.probe.trace_shapes[0] if self.probe.trace_shapes else None,
        )
        super().on_train_end(logs)


class ProfilerWindow(_StepCounting):
    """A TensorFlow profiler trace of steps `[start_step, start_step + num_steps)`.

    Written to `logdir/<model name>/plugins/profile/<run>/*.xplane.pb`; open
    it with `tensorboard --logdir <logdir>` and the profile plugin. The first
    steps (tracing) are skipped unless the whole fit is shorter.

    Args:
        logdir: the `--profiling_dump_path` folder.
        start_step: first profiled global step. Defaults to 3.
        num_steps: profiled steps. Defaults to 10.
    """

    def __init__(self, logdir, start_step=3, num_steps=10):
        super().__init__()
        self.logdir = logdir
        self.start_step = start_step
        self.num_steps = num_steps
        self.profiled = []
        self._active = False

    def on_train_begin(self, logs=None):
        steps = self.params.get("steps") if self.params else None
        epochs = self.params.get("epochs", 1) if self.params else 1
        if steps and steps * epochs <= self.start_step:
            self.start_step = 0

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        if not self._active and self.step == self.start_step:
            run_dir = os.path.join(self.logdir, self.model.name)
            try:
                tf.profiler.experimental.start(run_dir)
            except tf.errors.OpError as e:
                raise RuntimeError(
                    f"--profiling: cannot start the TensorFlow profiler in {run_dir} "
                    f"(is another profiler session running?): {e}"
                ) from e
            self._active = True

    def on_train_batch_end(self, batch, logs=None):
        if self._active:
            self.profiled.append(self.step)
            if len(self.profiled) >= self.num_steps:
                self._stop()

    def on_train_end(self, logs=None):
        if self._active:
            self._stop()
        elif not self.profiled:
            logger.warning(
                "--profiling: %s ran %d steps, fewer than the profiling start step %d",
                self.model.name,
                self._batches,
                self.start_step,
            )

    def _stop(self):
        tf.profiler.experimental.stop()
        self._active = False
        logger.info(
            "profiling: steps %d-%d of %s -> %s (tensorboard --logdir %s)",
            self.profiled[0],
            self.profiled[-1],
            self.model.name,
            os.path.join(self.logdir, self.model.name),
            self.logdir,
        )
