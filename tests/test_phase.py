"""A phase's resume state: a backup that cannot be read is named before training, and a
resumed fit trains on the batches an uninterrupted one would."""

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


class _StopAfterSecondEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt  # killed after the second epoch's backup


def _fit_three_epochs(small_data, backup_dir, pipeline, interrupt=False, resume_shuffle=True):
    """What one process does: a new pipeline (its shuffle starts over), a new model, `fit`."""
    from knowledge_distillation.callbacks import ResumeShuffle
    from knowledge_distillation.data import make_dataset
    from knowledge_distillation.kd import augment

    x, y = small_data.x_train[:96], small_data.y_train[:96]
    batch_augment = (augment.BatchAugment(augment.Augmentation(shift=2, flip=True), 3, 10)
                     if pipeline == "augmented" else None)
    compat.set_random_seed(0)  # as the trainer does: the shuffle's order depends on it too
    ds = make_dataset(x, y, 16, shuffle=True, seed=1, augment=batch_augment)
    if pipeline == "unknown_length":  # Keras cannot count its batches
        ds = ds.filter(lambda images, labels: True)
        assert int(ds.cardinality()) < 0
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [compat.backup_and_restore(backup_dir)]
    if resume_shuffle:
        callbacks.append(ResumeShuffle(ds, compat.restored_epoch))
    if batch_augment:
        callbacks.append(augment.ResumeEpoch(batch_augment.counter, compat.restored_epoch))
    if interrupt:
        callbacks.append(_StopAfterSecondEpoch())
    model.fit(ds, epochs=3, verbose=0, callbacks=callbacks)
    return model.get_weights()


@pytest.mark.parametrize("pipeline", ["plain", "augmented", "unknown_length"])
def test_a_resumed_fit_trains_on_the_batches_of_an_uninterrupted_one(
        small_data, tmp_path, pipeline):
    whole = _fit_three_epochs(small_data, str(tmp_path / "whole"), pipeline)

    def killed_and_resumed(resume_shuffle):
        backup = str(tmp_path / f"resumed-{resume_shuffle}")
        with pytest.raises(KeyboardInterrupt):
            _fit_three_epochs(small_data, backup, pipeline, interrupt=True)
        return _fit_three_epochs(small_data, backup, pipeline, resume_shuffle=resume_shuffle)

    def same(a, b):
        return all(np.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a, b))

    # The third epoch, trained after the restart, sees the third epoch's
    # batches: the weights of the uninterrupted fit.
    assert same(whole, killed_and_resumed(True))
    # Without moving the shuffle on, it would train on another epoch's order.
    assert not same(whole, killed_and_resumed(False))
