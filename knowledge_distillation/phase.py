"""One training phase of a run (teacher, scratch, distilled): its files, callbacks and checks."""

import glob
import json
import os

import numpy as np
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.callbacks import EpochCheckpoint, ResumeShuffle, ThroughputLogger
from knowledge_distillation.kd.augment import ResumeEpoch


class Phase:
    """Paths and callbacks of one training phase (teacher, scratch, distilled)."""

    def __init__(self, config, name, backup_root=None):
        self.config = config
        self.name = name
        out = config.output_dir
        self.model_path = os.path.join(out, f"{name}{compat.MODEL_EXT}")
        # backup_root: where this process's BackupAndRestore backs up (the
        # distributed context's `backup_root`); defaults to the output folder.
        self.backup_dir = os.path.join(backup_root or out, "backup", name)
        self.checkpoint_dir = os.path.join(out, "checkpoints", name)
        self.csv_path = os.path.join(out, "logs", f"{name}.csv")
        self.tensorboard_dir = os.path.join(out, "logs", "tensorboard", name)
        self.throughput = ThroughputLogger(config.batch_size, config.log_steps, name)

    @property
    def finished(self):
        return os.path.isfile(self.model_path)

    def callbacks(self, target, session, train_ds, augment=None):
        """The callbacks of the phase's `fit` of `train_ds` (with `augment`, a `BatchAugment`)."""
        os.makedirs(os.path.dirname(self.csv_path), exist_ok=True)
        # After BackupAndRestore: a resumed run goes on with the shuffle order
        # and the augmentation stream where the killed one stopped.
        resume = [ResumeShuffle(train_ds, compat.restored_epoch)]
        if augment is not None:
            resume.append(ResumeEpoch(augment.counter, compat.restored_epoch))
        return [
            compat.backup_and_restore(self.backup_dir),
            *resume,
            EpochCheckpoint(target, self.checkpoint_dir),
            keras.callbacks.CSVLogger(self.csv_path, append=True),
            keras.callbacks.TensorBoard(self.tensorboard_dir, profile_batch=0),
            self.throughput,
            *session.callbacks(),
        ]


def check_backup(phase):
    """A resume state that cannot be read is an error naming the file, before `fit` reads it.

    Keras 3 backs up `.weights.h5` and `.json` files; Keras 2.6 a TensorFlow
    checkpoint (`checkpoint`, `*.index`, `*.data-*`), read back in full here.
    """
    if not os.path.isdir(phase.backup_dir):
        return
    import h5py

    for root, _, names in os.walk(phase.backup_dir):
        for name in names:
            path = os.path.join(root, name)
            try:
                if name.endswith(".h5"):
                    h5py.File(path, "r").close()
                elif name.endswith(".json"):
                    with open(path, encoding="utf-8") as f:
                        json.load(f)
                elif name.endswith(".index"):
                    path = _check_tf_checkpoint(os.path.join(root, name[: -len(".index")]))
            except (OSError, ValueError, tf.errors.OpError) as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(
                    f"{path}: the {phase.name} phase's resume state cannot be read ({reason}); "
                    f"delete {phase.backup_dir} to restart that phase from its first epoch"
                ) from None


def _check_tf_checkpoint(prefix):
    """Reads every tensor of the checkpoint `prefix`; returns the file to blame if one fails."""
    reader = tf.train.load_checkpoint(prefix)
    for key in reader.get_variable_to_shape_map():
        try:
            reader.get_tensor(key)
        except (tf.errors.OpError, IndexError) as e:  # TF 2.6: "Read less bytes than requested"
            data = sorted(glob.glob(prefix + ".data-*"))
            message = str(getattr(e, "message", e)).strip().splitlines()[0]
            raise ValueError(f"{data[0] if data else prefix}: {message}") from None
    return prefix + ".index"


def check_finite_weights(model, phase):
    bad = [compat.variable_path(w) for w in model.weights
           if not np.all(np.isfinite(compat.to_numpy(w)))]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise RuntimeError(
            f"{phase}: training produced non-finite weights ({bad[0]}{more}); nothing was "
            "saved. Rerun with --over_dump to find the step and layer that overflowed")


def finite_or_null(value):
    """`value` with every NaN or infinite float replaced by None (strict JSON)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value
