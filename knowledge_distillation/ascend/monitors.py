"""Keras callbacks that watch every step on GPU/CPU, as CANN does on Ascend.

- `OverflowMonitor` (`--over_dump`): inf/nan detection every step, a report
  naming the first non-finite tensor and a dump of that step; stops training,
  or under dynamic loss scaling logs the skipped step and goes on.
- `StaticShapeGuard` (`--static`): the train step is traced once, with fully
  known shapes, for the whole `fit`.
- `ProfilerWindow` (`--profiling`): a TensorFlow profiler trace of a window
  of steps, in the layout TensorBoard's profile plugin reads.
"""

import logging
import math
import os

import numpy as np
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.ascend.probe import inspected_model
from knowledge_distillation.ascend.dump import (
    NonFiniteError,
    TensorDumpWriter,
    _ProbeCallback,
    _StepCounting,
    _write_json,
    describe,
    non_finite_tensors,
)

logger = logging.getLogger(__name__)


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
            self.model.optimizer, compat.LossScaleOptimizer
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
        finite, scale_before, scale_after, good_steps = self.probe.status()
        loss = _as_float((logs or {}).get("loss"))
        skipped = self.loss_scaling and scale_after < scale_before
        bad_loss = not self.loss_scaling and loss is not None and not math.isfinite(loss)
        # Keras 2.6's loss scale stops at 1: an overflow there skips the update
        # and resets the scaler's good-step count, but leaves the scale as it is.
        at_floor = self.loss_scaling and scale_after == scale_before and good_steps == 0
        if finite and not skipped and not bad_loss and not at_floor:
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
            if skipped and scale_after >= 1.0:
                return
            raise NonFiniteError(
                f"overflow at step {self.step} of {self.model.name}: the loss scale "
                f"{'fell to' if skipped else 'stays at'} {scale_after:g} after "
                f"{len(self.overflow_steps)} skipped steps, so loss scaling cannot absorb it; "
                f"{where}",
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
