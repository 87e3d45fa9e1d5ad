"""A phase's resume state: a backup that cannot be read is named before training."""

import os
import types

import numpy as np
import pytest

from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.phase import Phase, check_backup


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt  # a kill after the epoch's backup was written


def _interrupted_phase(tmp_path):
    """A scratch phase whose backup holds the end of its first epoch, as a kill leaves it."""
    config = types.SimpleNamespace(output_dir=str(tmp_path), batch_size=16, log_steps=100)
    phase = Phase(config, "scratch")
    compat.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(64), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    x, y = np.ones((32, 4), np.float32), np.zeros((32, 2), np.float32)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=3, verbose=0,
                  callbacks=[compat.backup_and_restore(phase.backup_dir), _StopAfterFirstEpoch()])
    return phase


def test_an_intact_backup_passes_and_a_truncated_one_is_named(tmp_path):
    phase = _interrupted_phase(tmp_path)
    check_backup(phase)  # what a kill leaves behind is readable
    files = [os.path.join(root, name) for root, _, names in os.walk(phase.backup_dir)
             for name in names]
    largest = max(files, key=os.path.getsize)  # the weights
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    with pytest.raises(ValueError, match="resume state cannot be read") as e:
        check_backup(phase)
    assert os.path.basename(largest) in str(e.value)
    assert f"delete {phase.backup_dir}" in str(e.value)
