"""Tensor dumps on GPU/CPU, as CANN writes them on Ascend for `--data_dump_flag`.

- `DataDump` (`--data_dump_flag`): at the chosen steps, every layer's output
  and every trainable weight's gradient as `.npy`, with an `index.json`.
- `TensorDumpWriter` writes a step's tensors; `OverflowMonitor`
  (`monitors.py`) reuses it for the step that overflowed.
- `_ProbeCallback`, the base of the callbacks that look at every step
  through one `StepProbe` per `fit` (see `probe.py`);
  `DeviceSession.callbacks()` builds a fresh set for every `fit`.
"""

import json
import logging
import os

import numpy as np

from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.util.files import atomic_write
from knowledge_distillation.ascend.probe import inspected_model, safe_file_name

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
    atomic_write(path, json.dumps(obj, indent=1))


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
        target = inspected_model(self.model)
        self.writer = TensorDumpWriter(
            os.path.join(self.path, self.model.name), self.model.name, target.name
        )
        random_layers = compat.stateful_random_layers(target)
        # In index.json: the layers whose replayed masks differ from the step's.
        self.writer.header["masks_not_replayed"] = random_layers
        if random_layers:
            logger.warning(
                "--data_dump_flag on %s: %s draws its random masks from stateful ops, so "
                "the dumped replay of a step uses new masks for %s: its outputs and "
                "gradients there are not the ones the step applied",
                target.name, compat.STACK, ", ".join(random_layers))

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
