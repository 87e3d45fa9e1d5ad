"""Callbacks of a distributed `fit`: NPU broadcast, restored-epoch agreement, weight digest."""

import logging


from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.util.digest import weights_digest

logger = logging.getLogger(__name__)


class NpuBroadcastVariables(keras.callbacks.Callback):
    """Copies rank 0's weights to every NPU rank when training begins.

    Runs after `BackupAndRestore` has restored a resumed run, so every rank
    starts from rank 0's state.

    Args:
        npu_distribute: the `npu_device.distribute` module.
    """

    def __init__(self, npu_distribute):
        super().__init__()
        self.npu_distribute = npu_distribute

    def on_train_begin(self, logs=None):
        self.npu_distribute.broadcast(list(self.model.weights), root_rank=0)


class AgreeOnRestoredEpoch(keras.callbacks.Callback):
    """Checks that every worker resumes from the same epoch.

    Each worker restores its own backup; a worker killed while the others
    were saving an epoch's backup would start one epoch behind them and the
    cluster would hang on mismatched collectives. This turns that into an
    error naming the epochs.

    Args:
        strategy: the `MultiWorkerMirroredStrategy`.
    """

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        epoch = compat.restored_epoch(self.model)  # BackupAndRestore ran first
        values = self.strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant([epoch], tf.int64)
        )
        epochs = sorted(set(self.strategy.gather(values, axis=0).numpy().tolist()))
        if len(epochs) > 1:
            raise RuntimeError(
                f"workers restored different epochs {epochs} from their backups "
                "(a worker died while the others saved); delete the phase's "
                "backup folders (OUTPUT_DIR/backup/<phase> and "
                "OUTPUT_DIR/workertemp_*/backup/<phase>) to restart that phase"
            )
        if epoch:
            logger.info("distribute: every worker resumes at epoch %d", epoch + 1)


class WeightsDigest(keras.callbacks.Callback):
    """Logs a digest of `target`'s weights when training ends.

    Replicas apply the same all-reduced gradients, so every worker or rank
    logs the same digest; a different one means they drifted apart.

    Args:
        target: the model whose weights are digested.
        label: this process in the log (e.g. `worker:1`).
    """

    def __init__(self, target, label):
        super().__init__()
        self.target = target
        self.label = label
        self.digest = None

    def on_train_end(self, logs=None):
        self.digest = weights_digest(self.target)
        logger.info(
            "distribute: %s final weights of %s: digest %s",
            self.label,
            self.target.name,
            self.digest,
        )

