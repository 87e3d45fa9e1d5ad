"""Keras callbacks of the trainer: throughput log, per-epoch checkpoints, resumed shuffle order."""

import logging
import os
import time


from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.util.files import save_weights_atomic

logger = logging.getLogger(__name__)


class ThroughputLogger(keras.callbacks.Callback):
    """Logs examples/sec every `log_steps` steps, like ModelZoo's TimeHistory.

    The whole-fit figure excludes the first call, which includes tracing,
    unless it was the only one (a fit of one compiled call).
    With Keras `steps_per_execution` > 1 each batch callback spans several
    steps (`begin` to `end`), and they are all counted.

    Args:
        batch_size: examples per step.
        log_steps: steps between two log lines.
        label: phase name shown in the log.
    """

    def __init__(self, batch_size, log_steps, label):
        super().__init__()
        self.batch_size = batch_size
        self.log_steps = log_steps
        self.label = label
        self.steps = 0
        self.timed_steps = 0
        self.timed_seconds = 0.0
        self.all_seconds = 0.0
        self.fit_seconds = 0.0
        self._window_start = None
        self._window_steps = 0
        self._step_start = None
        self._begin = 0
        self._fit_start = None

    def on_train_begin(self, logs=None):
        self._fit_start = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self._step_start = time.perf_counter()
        self._begin = batch
        if self._window_start is None:
            self._window_start = self._step_start

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        steps = batch - self._begin + 1
        if self.steps > 0:
            self.timed_steps += steps
            self.timed_seconds += now - self._step_start
        self.steps += steps
        self.all_seconds += now - self._step_start
        self._window_steps += steps
        if self._window_steps >= self.log_steps:
            elapsed = now - self._window_start
            logger.info(
                "%s: step %d, %.1f examples/sec",
                self.label,
                self.steps,
                self._window_steps * self.batch_size / max(elapsed, 1e-9),
            )
            self._window_start = None
            self._window_steps = 0

    def on_epoch_end(self, epoch, logs=None):
        self._window_start = None
        self._window_steps = 0

    def on_train_end(self, logs=None):
        if self._fit_start is not None:
            self.fit_seconds += time.perf_counter() - self._fit_start

    @property
    def examples_per_sec(self):
        """Mean training throughput over all calls but the first (if others ran)."""
        if self.timed_steps == 0:
            return self.steps * self.batch_size / self.all_seconds if self.steps else 0.0
        return self.timed_steps * self.batch_size / self.timed_seconds


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves `target`'s weights after every epoch (`epoch_001.weights.h5`, ...).

    Unlike `ModelCheckpoint` it can save a sub-model, so a Distiller's
    checkpoints hold the student alone.

    Args:
        target: the model whose weights are saved.
        directory: folder of the checkpoint files.
    """

    def __init__(self, target, directory):
        super().__init__()
        self.target = target
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        path = os.path.join(self.directory, f"epoch_{epoch + 1:03d}.weights.h5")
        save_weights_atomic(self.target, path)


class ResumeShuffle(keras.callbacks.Callback):
    """Moves `dataset`'s seeded shuffle on to the epoch `fit` resumes at.

    `shuffle(seed=..., reshuffle_each_iteration=True)` takes each new
    iterator's order from a seed generator that a new process starts over,
    so a run resumed at epoch e would train epoch e in the order of epoch 0.
    Opening (not reading: no element is produced, no image loaded) the
    iterators `fit` would have opened over the finished epochs brings it to
    the order an uninterrupted run has at epoch e. The generator is shared
    by every dataset built on this one (Keras's distributed copy included).

    Put it after `BackupAndRestore` in the callback list.

    Args:
        dataset: the `tf.data.Dataset` handed to `fit`.
        restored_epoch: `model -> epoch` (from 0) the fit resumes at
            (`compat.restored_epoch`).
    """

    def __init__(self, dataset, restored_epoch):
        super().__init__()
        self.dataset = dataset
        self.restored_epoch = restored_epoch

    def on_train_begin(self, logs=None):
        epoch = self.restored_epoch(self.model)
        for _ in range(epoch * compat.fit_iterators_per_epoch(self.dataset)):
            iter(self.dataset)
        if not epoch:
            return
        logger.info("resuming at epoch %d: the shuffle order moved on past the %d finished "
                    "epoch(s), as in an uninterrupted run", epoch + 1, epoch)
        if compat.KERAS_VERSION not in compat.FIT_ITERATORS_MEASURED:
            logger.warning("resuming under Keras %s: the iterators fit opens per epoch were "
                           "counted on Keras %s; if this Keras opens others, the resumed "
                           "shuffle order differs (tests/test_phase.py checks it)",
                           compat.KERAS_VERSION, " and ".join(compat.FIT_ITERATORS_MEASURED))
