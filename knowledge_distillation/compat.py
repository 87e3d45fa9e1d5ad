"""The one seam between the two stacks the trainer runs on.

| stack   | Python  | TensorFlow | Keras                | where                        |
|---------|---------|------------|----------------------|------------------------------|
| Ascend  | 3.7-3.9 | 2.6.5      | 2.6 (`tf.keras`)     | hosts with CANN + npu_device |
| current | 3.10+   | 2.16+      | 3.12-3.15 (tested 3.15) | GPU/CPU hosts             |

`npu_device` exists only for TensorFlow 2.6.5, so the trainer must run on
Keras 2.6 as well as on Keras 3. Every module of the trainer imports `keras`
from here and uses TensorFlow ops and `tf.nest` (which both stacks share) for
its own arithmetic; what differs between the two Keras versions is answered
by the functions below, and nowhere else. The quantizer is Keras 3 only
(`require_keras3`).
"""

import inspect
import logging
import os
import platform
import random
import sys

import numpy as np
import tensorflow as tf


def _import_keras():
    try:
        import keras as standalone
    except ImportError:  # TensorFlow without the keras package: tf.keras is Keras 2
        return tf.keras, False
    if int(standalone.__version__.split(".")[0]) >= 3:
        return standalone, True
    # TensorFlow 2.6's `import keras` is the bare package; its public API is tf.keras.
    return tf.keras, False


keras, KERAS3 = _import_keras()
KERAS_VERSION = keras.__version__ if KERAS3 else tf.keras.__version__
if not KERAS3 and not KERAS_VERSION.startswith("2.6."):
    raise ImportError(
        f"knowledge_distillation runs on Keras 2.6 (TensorFlow 2.6.5, the npu_device stack) "
        f"or Keras 3; this is TensorFlow {tf.__version__} with Keras {KERAS_VERSION}")
STACK = (
    f"TensorFlow {tf.__version__} + Keras {KERAS_VERSION}"
    + ("" if KERAS3 else " (tf.keras)")
)
PACKAGE = "knowledge_distillation"

# The model file the trainer writes: Keras 3's `.keras` archive, or HDF5,
# which Keras 2.6 writes and reloads and Keras 3 loads too.
MODEL_EXT = ".keras" if KERAS3 else ".h5"
H5_EXTS = (".h5", ".hdf5")
MODEL_EXTS = ((".keras",) if KERAS3 else ()) + H5_EXTS


def require_keras3(what):
    """Raises one clear error when `what` (a flag or command) runs on the Keras 2.6 stack."""
    if not KERAS3:
        raise RuntimeError(
            f"{what} needs Keras 3 (TensorFlow 2.16+ on Python 3.10+); this is {STACK}. "
            "Quantize on a Keras 3 host: it loads the .h5 models this stack writes"
        )


# -- serialization ---------------------------------------------------------

if KERAS3:
    _register = keras.saving.register_keras_serializable
    serialize = keras.saving.serialize_keras_object
    deserialize = keras.saving.deserialize_keras_object
else:
    _register = keras.utils.register_keras_serializable
    serialize = keras.utils.serialize_keras_object
    deserialize = keras.utils.deserialize_keras_object


def serializable(cls):
    """Registers `cls` under the package name, so saved files name it."""
    return _register(package=PACKAGE)(cls)


# -- distillation losses -----------------------------------------------------

if KERAS3:
    DistillationLoss = keras.distillation.DistillationLoss
    LogitsDistillation = keras.distillation.LogitsDistillation
    FeatureDistillation = keras.distillation.FeatureDistillation
else:

    class DistillationLoss:
        """Keras 3's `keras.distillation.DistillationLoss` protocol, for Keras 2.6."""

        def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
            raise NotImplementedError(f"{type(self).__name__} must implement compute_loss")

        def get_config(self):
            return {}

        @classmethod
        def from_config(cls, config):
            return cls(**config)

    # Keras 2.6 has no keras.distillation: nothing is an instance of `()`.
    LogitsDistillation = FeatureDistillation = ()

MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "auto")


if KERAS3:

    def classification_loss():
        """Sparse cross-entropy from logits (Keras 3 casts low-precision logits to float32)."""
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

else:

    @serializable
    class Float32SparseCategoricalCrossentropy(keras.losses.SparseCategoricalCrossentropy):
        """Sparse cross-entropy of float32 logits: Keras 2.6 has no bfloat16 kernel for it
        and does not cast a mixed-precision model's logits itself, as Keras 3 does."""

        def call(self, y_true, y_pred):
            return super().call(y_true, tf.cast(y_pred, tf.float32))

    def classification_loss():
        """Sparse cross-entropy from logits, computed in float32."""
        return Float32SparseCategoricalCrossentropy(from_logits=True)


def loss_object_mean(loss_fn, y_true, y_pred):
    """The plain mean over this replica's batch of a `keras.losses.Loss` with a mean reduction.

    Keras 3's `Loss.__call__` (masks, dtype conversion) divides that mean by
    the replica count under tf.distribute, which is undone here. Keras 2.6
    refuses the "auto" reduction inside a strategy, so its unreduced values
    (`.call`) are averaged; Keras 2.6 losses carry no masks.
    """
    if KERAS3:
        value = tf.reduce_mean(loss_fn(y_true, y_pred))
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return value * float(replicas) if replicas > 1 else value
    return tf.reduce_mean(loss_fn.call(tf.convert_to_tensor(y_true), tf.convert_to_tensor(y_pred)))


# -- models and their files --------------------------------------------------


def set_random_seed(seed):
    """Seeds Python, NumPy and TensorFlow (Keras 2.6 has no `keras.utils.set_random_seed`)."""
    if KERAS3:
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def load_model_file(path):
    """Loads a model file without its compile state; `.keras` with safe_mode on."""
    if KERAS3:
        if path.endswith(".keras"):
            return keras.saving.load_model(path, compile=False, safe_mode=True)
        # Keras 2 writes a mixed layer's dtype as a "Policy" object, which
        # Keras 3 knows as DTypePolicy.
        return keras.saving.load_model(
            path, compile=False, custom_objects={"Policy": keras.DTypePolicy})
    return keras.models.load_model(path, compile=False)


def is_compiled(model):
    return bool(getattr(model, "compiled", getattr(model, "_is_compiled", False)))


# Keras 2.6's BackupAndRestore restores every worker from the chief's
# checkpoint (`backup_dir/chief`; other workers' saves go to a temporary
# folder), so all workers must be given the chief's backup_dir. Keras 3's
# restores each worker from its own.
WORKERS_SHARE_BACKUP = not KERAS3


def backup_and_restore(backup_dir):
    """The epoch-level resume callback of this Keras."""
    if KERAS3:
        # double_checkpoint: a worker failing mid-save (collectives abort the
        # save) leaves the previous epoch's backup to restore from.
        return keras.callbacks.BackupAndRestore(
            backup_dir, delete_checkpoint=True, double_checkpoint=True
        )
    return keras.callbacks.experimental.BackupAndRestore(backup_dir)


# -- variables, layers, optimizers ------------------------------------------


def to_numpy(value):
    """A tensor or variable of either Keras as a NumPy array."""
    if KERAS3:
        return keras.ops.convert_to_numpy(value)
    return np.asarray(value)


def variable_value(variable):
    """The tensor a variable holds, inside a traced step."""
    return variable.value if KERAS3 else tf.convert_to_tensor(variable)


def variable_path(variable):
    """A variable's unique name: Keras 3's `path`, Keras 2's `name` without ':0'."""
    if KERAS3:
        return variable.path
    return variable.name.split(":")[0]


def set_dtype_policy(layer, policy):
    """Sets a built layer's dtype policy; its float32 variables are kept.

    Keras 2.6 autocasts variables only when they were created under a mixed
    policy, so there a layer whose variables are plain float32 gets them
    wrapped in `AutoCastVariable`, as it would have had it been built so.
    """
    if KERAS3:
        layer.dtype_policy = policy
        return
    layer._set_dtype_policy(keras.mixed_precision.Policy(policy))
    if layer._dtype_policy.compute_dtype == layer._dtype_policy.variable_dtype:
        return
    from keras.mixed_precision import autocast_variable

    if isinstance(layer, _float32_variable_layers()):
        return  # Keras 2.6 reads these layers' variables in float32 even under a mixed policy
    for attr in ("_trainable_weights", "_non_trainable_weights"):
        wrapped = [
            v if isinstance(v, autocast_variable.AutoCastVariable) or not v.dtype.is_floating
            else autocast_variable.create_autocast_variable(v)
            for v in getattr(layer, attr)
        ]
        setattr(layer, attr, wrapped)
        by_id = {id(getattr(w, "_variable", w)): w for w in wrapped}
        for name, value in list(vars(layer).items()):
            if isinstance(value, tf.Variable) and id(value) in by_id and by_id[id(value)] is not value:
                object.__setattr__(layer, name, by_id[id(value)])


def layer_classes(*names):
    """The `keras.layers` classes of these names that this Keras has.

    Keras 2.6 keeps some under `layers.experimental` (EinsumDense) and
    `layers.experimental.preprocessing` (Rescaling), and lacks others
    (DepthwiseConv1D).
    """
    homes = [keras.layers]
    if not KERAS3:
        homes += [keras.layers.experimental, keras.layers.experimental.preprocessing]
    found = []
    for name in names:
        for home in homes:
            if hasattr(home, name):
                found.append(getattr(home, name))
                break
    return tuple(found)


def leaky_relu(slope, **kwargs):
    """`LeakyReLU` with this slope (Keras 3 calls it `negative_slope`, Keras 2.6 `alpha`)."""
    if KERAS3:
        return keras.layers.LeakyReLU(negative_slope=slope, **kwargs)
    return keras.layers.LeakyReLU(alpha=slope, **kwargs)


def leaky_slope(layer):
    """The negative slope of a `LeakyReLU` or `ReLU` layer (0 for a plain ReLU)."""
    value = getattr(layer, "negative_slope", None) if KERAS3 else getattr(
        layer, "alpha", getattr(layer, "negative_slope", None))
    return float(value or 0.0)


def _float32_variable_layers():
    # Keras 2.6 creates their weights with experimental_autocast=False.
    return layer_classes("BatchNormalization", "LayerNormalization", "Embedding")


def stateful_random_layers(model):
    """Names of `model`'s layers whose training-time randomness a replayed step cannot repeat.

    Keras 3 layers draw from seed-generator variables, which a replay restores;
    Keras 2.6's Dropout and noise layers use stateful random ops.
    """
    if KERAS3:
        return []
    kinds = layer_classes("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                          "GaussianNoise", "GaussianDropout", "AlphaDropout")
    return [layer.name for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, kinds)]


def inbound_layers(layer):
    """Layers feeding `layer` in a functional graph, or None when unknown."""
    nodes = getattr(layer, "_inbound_nodes", None)
    if not nodes:
        return None
    if KERAS3:
        return [parent.operation for parent in nodes[0].parent_nodes]
    return [parent.layer for parent in nodes[0].parent_nodes]


# The Keras versions `fit_iterators_per_epoch` was measured on (the pinned ones).
FIT_ITERATORS_MEASURED = ("3.15.1", "2.6.0")


def fit_iterators_per_epoch(dataset):
    """How many iterators `fit` opens over `dataset` per epoch.

    Each one draws the next order of a `shuffle(reshuffle_each_iteration=True)`
    upstream, used or not. Measured on `FIT_ITERATORS_MEASURED` (and checked
    by `tests/test_phase.py`): Keras 3 opens one at the start of every epoch
    and, when the dataset's cardinality is known, one more at its end; Keras
    2.6 one per epoch (and one before the first, in a resumed fit too).
    """
    if KERAS3 and int(dataset.cardinality()) >= 0:
        return 2
    return 1


def restored_epoch(model):
    """The epoch (from 0) a fit resumes at, once BackupAndRestore's `on_train_begin` ran."""
    if KERAS3:
        return int(getattr(model, "_initial_epoch", None) or 0)
    state = getattr(model, "_training_state", None)
    saved = int(state._ckpt_saved_epoch.numpy()) if state is not None else -1
    return saved + 1 if saved >= 0 else 0


def save_model(model, path):
    """`model.save(path)`; Keras 2.6 HDF5 without the compile state, so that any
    Keras, this package imported or not, loads the file."""
    if KERAS3:
        model.save(path)
    else:
        model.save(path, include_optimizer=False)


def build_optimizer(optimizer, variables):
    """Creates the optimizer's slots now (Keras 3 `build`; Keras 2.6 `_create_all_weights`)."""
    if KERAS3:
        if not optimizer.built:
            optimizer.build(variables)
        return
    optimizer._create_all_weights(variables)


LossScaleOptimizer = (
    keras.optimizers.LossScaleOptimizer if KERAS3 else keras.mixed_precision.LossScaleOptimizer
)


def cpu_runs_bfloat16():
    """Whether this TensorFlow's CPU kernels run a bfloat16 Conv2D inside a graph.

    TensorFlow 2.6's do not ("Missing 0-th output from Conv2D" once traced);
    TensorFlow 2.16+ does, natively where the CPU has AVX512-BF16/AMX and
    emulated elsewhere.
    """
    if KERAS3:
        return True
    x = tf.ones([1, 4, 4, 1], tf.bfloat16)
    kernel = tf.ones([3, 3, 1, 1], tf.bfloat16)
    try:
        with tf.device("/CPU:0"):
            tf.function(lambda: tf.nn.conv2d(x, kernel, 1, "SAME"))()
    except (tf.errors.InternalError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError):
        return False
    return True


def jit_compile_off():
    """`Model.compile` arguments that keep XLA off (Keras 2.6 compiles without XLA unless asked)."""
    return {"jit_compile": False} if KERAS3 else {}


def numpy_function(fn, inputs, dtype):
    """`tf.numpy_function` of a pure function (`stateful=False` where TensorFlow has it)."""
    if "stateful" in inspect.signature(tf.numpy_function).parameters:
        return tf.numpy_function(fn, inputs, dtype, stateful=False)
    return tf.numpy_function(fn, inputs, dtype)


def metrics_variables(model):
    """The variables of every metric `model` tracks (its loss tracker included)."""
    if KERAS3:
        return list(model.metrics_variables)
    return [v for metric in model.metrics for v in metric.variables]


def model_loss(model, x, y, y_pred, sample_weight=None):
    """The training loss `model.fit` minimises for one batch, as its train step computes it."""
    if KERAS3 or isinstance(model, LossModel):
        return model.compute_loss(x, y, y_pred, sample_weight, training=True)
    return model.compiled_loss(y, y_pred, sample_weight, regularization_losses=model.losses)


def loss_scale_good_steps(optimizer):
    """Finite steps since a `LossScaleOptimizer` last changed its scale, as float32;
    -1 on Keras 3, whose scale has no floor that would need it."""
    if KERAS3 or not optimizer.dynamic:
        return tf.constant(-1.0)
    return tf.cast(tf.identity(optimizer.dynamic_counter), tf.float32)


def loss_scale_value(optimizer):
    """The current dynamic loss scale of a `LossScaleOptimizer`, as a float32 tensor."""
    scale = optimizer.dynamic_scale if KERAS3 else optimizer.loss_scale
    return tf.cast(tf.identity(scale), tf.float32)


# -- the training step -------------------------------------------------------

if KERAS3:
    LossModel = keras.Model
else:

    class LossModel(keras.Model):
        """Keras 3's `compute_loss` protocol on Keras 2.6.

        Keras 3 trains and evaluates by calling `compute_loss(x, y, y_pred,
        sample_weight, training)`; Keras 2.6 has no such hook, so these steps
        call it the way Keras 3's do: the loss is per replica (already
        divided by the replica count), gradients are summed across replicas
        by the optimizer, and the reported "loss" is the global mean.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_tracker = keras.metrics.Mean(name="loss")

        def _step_logs(self, y, y_pred, sample_weight, loss):
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            batch = tf.shape(tf.nest.flatten(y_pred)[0])[0]
            self.loss_tracker.update_state(loss * float(replicas), sample_weight=batch)
            if y is not None:
                self.compiled_metrics.update_state(y, y_pred, sample_weight)
            return {m.name: m.result() for m in self.metrics}

        def train_step(self, data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred, sample_weight, training=True)
            self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
            return self._step_logs(y, y_pred, sample_weight, loss)

        def test_step(self, data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            y_pred = self(x, training=False)
            loss = self.compute_loss(x, y, y_pred, sample_weight, training=False)
            return self._step_logs(y, y_pred, sample_weight, loss)


def end_multi_worker_process(code=0):
    """Ends a finished multi-worker process where TensorFlow cannot shut it down.

    TensorFlow 2.6's collective executor aborts interpreter shutdown after a
    MultiWorkerMirroredStrategy run ("terminate called without an active
    exception", SIGABRT) although every output is written; there the process
    flushes and exits with `code` at once. Keras 3's TensorFlow shuts down
    normally, and this returns.
    """
    if KERAS3:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def environment():
    """What the run's summary records about the stack."""
    return {
        "stack": STACK,
        "tensorflow": tf.__version__,
        "keras": KERAS_VERSION,
        "python": platform.python_version(),
    }
