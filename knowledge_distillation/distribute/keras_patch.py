"""The one change to Keras that tf.distribute needs here, scoped and checked.

Before `fit`, `evaluate` and `predict`, Keras 3's TensorFlow trainer builds a
model created in a strategy scope from a real input batch, which it pulls
from the input pipeline and reduces across replicas:

1. pulling it advances seeded or generator pipelines by a batch (and more,
   through prefetching), so a distributed run does not see the batches a
   single-device run sees;
2. `MultiWorkerMirroredStrategy` cannot reduce a nested batch with integer
   labels at all (keras-team/keras#20585);
3. under `MultiWorkerMirroredStrategy` the per-step logs are reduced with
   `axis=0`, which fails on scalar losses and metrics.

Only shapes and dtypes matter to that build, so the patch builds from the
pipeline's element spec and pulls nothing (1, 2), and averages scalar logs
over all replicas, as `MirroredStrategy` already does (3). Runs without a
strategy are left to Keras.

`patched_trainer()` applies it for the length of a `with` block (the
distributed context's `scope()` enters it) and restores Keras' own functions
on the way out. Keras 2.6's trainer needs none of it and is left alone.
It was written against Keras 3.15's private trainer
internals: outside `SUPPORTED_KERAS`, or when one of the attributes it
touches is missing, it fails with an error naming what changed.
"""

import contextlib
import logging

from knowledge_distillation import compat
from knowledge_distillation.compat import keras


logger = logging.getLogger(__name__)

# [lowest, first unsupported): the Keras versions whose TensorFlow trainer
# has the internals below (3.15.1 is the one tested).
SUPPORTED_KERAS = ((3, 12), (3, 16))
ISSUE = "keras-team/keras#20585"

_depth = 0
_originals = None


def _version(text):
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _changed(what):
    return RuntimeError(
        f"Keras {keras.__version__}: {what}; the tf.distribute patch in "
        "knowledge_distillation/distribute/keras_patch.py was written for Keras "
        f"{'.'.join(map(str, SUPPORTED_KERAS[0]))} to <{'.'.join(map(str, SUPPORTED_KERAS[1]))} "
        f"({ISSUE}): check whether Keras fixed the build from a pulled batch and update it"
    )


def _trainer_module():
    low, high = SUPPORTED_KERAS
    if not low <= _version(keras.__version__) < high:
        raise _changed("outside the supported version range")
    from keras.src.backend.tensorflow import trainer as tf_trainer

    for name in ("_collective_all_reduce_multi_worker", "reduce_per_replica", "TensorFlowTrainer"):
        if not hasattr(tf_trainer, name):
            raise _changed(f"keras.src.backend.tensorflow.trainer has no {name}")
    for name in ("_maybe_symbolic_build", "_symbolic_build"):
        if not hasattr(tf_trainer.TensorFlowTrainer, name):
            raise _changed(f"TensorFlowTrainer has no {name}")
    return tf_trainer


def _element_spec(iterator):
    adapter = getattr(iterator, "data_adapter", None)
    if adapter is None or not hasattr(adapter, "get_tf_dataset"):
        raise _changed("the epoch iterator has no data_adapter.get_tf_dataset()")
    return adapter.get_tf_dataset().element_spec


def _apply(tf_trainer):
    import tensorflow as tf

    is_multi_worker = tf_trainer._collective_all_reduce_multi_worker
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica

    def local_value(strategy, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if not hasattr(self, "_distribute_strategy"):
            raise _changed("the trainer has no _distribute_strategy")
        strategy = self._distribute_strategy
        if strategy is None:
            return original_build(self, iterator=iterator, data_batch=data_batch)
        if iterator is not None:
            # TensorSpecs have the .shape and .dtype the build reads.
            data_batch = _element_spec(iterator)
        else:
            data_batch = keras.tree.map_structure(lambda v: local_value(strategy, v), data_batch)
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):
            return keras.tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None)
                if isinstance(v, tf.distribute.DistributedValues)
                else v,
                values,
            )
        return original_reduce(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    return original_build, original_reduce


@contextlib.contextmanager
def patched_trainer():
    """Keras' TensorFlow trainer with the tf.distribute fixes, for the `with` block.

    Re-entrant: nested blocks share one patch, removed when the outermost
    one ends.

    Raises:
        RuntimeError: the installed Keras is outside `SUPPORTED_KERAS` or
            lacks an attribute the patch touches.
    """
    global _depth, _originals
    if not compat.KERAS3:  # Keras 2.6's trainer runs tf.distribute unpatched
        yield
        return
    tf_trainer = _trainer_module()
    if _depth == 0:
        _originals = _apply(tf_trainer)
        logger.info("distribute: Keras %s trainer patched for tf.distribute (builds from the "
                    "input spec; %s)", keras.__version__, ISSUE)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            build, reduce = _originals
            tf_trainer.TensorFlowTrainer._maybe_symbolic_build = build
            tf_trainer.reduce_per_replica = reduce
            _originals = None


def check_supported():
    """Fails early, before any training, when the patch cannot apply to this Keras."""
    if compat.KERAS3:
        _trainer_module()


def is_patched():
    """Whether a `patched_trainer()` block is active."""
    return _depth > 0
