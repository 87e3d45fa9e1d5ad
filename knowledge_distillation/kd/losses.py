"""Knowledge-distillation losses.

`KDLoss` is Hinton's soft-target loss in the `keras.distillation`
`DistillationLoss` protocol, so it plugs into Keras' own distiller as well as
ours. It is computed in float32 from log-softmax, whatever the compute dtype of
the logits, and always carries the explicit T^2 factor.
"""

import logging

import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.config import DEFAULT_TEMPERATURES, DISTILLATION_LOSSES

logger = logging.getLogger(__name__)


def soft_kl_divergence(teacher_logits, student_logits, temperature):
    """Mean over the batch of KL(softmax(t/T) || softmax(s/T)), in float32.

    Log-softmax keeps it finite where float16 softmax would underflow to 0.

    Args:
        teacher_logits: tensor `(batch, classes)`.
        student_logits: tensor `(batch, classes)`.
        temperature: positive float.

    Returns:
        Scalar float32 tensor (without the T^2 factor).
    """
    t = tf.cast(teacher_logits, tf.float32) / temperature
    s = tf.cast(student_logits, tf.float32) / temperature
    log_p_teacher = tf.nn.log_softmax(t, axis=-1)
    log_p_student = tf.nn.log_softmax(s, axis=-1)
    per_example = tf.reduce_sum(
        tf.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1
    )
    return tf.reduce_mean(per_example)


@compat.serializable
class KDLoss(compat.DistillationLoss):
    """Hinton et al. (2015) soft-target loss: `T^2 * KL(p_t^T || p_s^T)`.

    The T^2 factor keeps the soft-target gradients on the same scale as the
    hard-label gradients when the temperature changes.

    Args:
        temperature: softmax temperature, > 0. Defaults to 10.0.

    Example:

    ```python
    loss = KDLoss(temperature=4.0)
    value = loss.compute_loss(teacher_logits, student_logits)
    ```
    """

    def __init__(self, temperature=10.0):
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(
                f"temperature must be a positive number, got {temperature!r}"
            )
        self.temperature = float(temperature)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return (self.temperature**2) * soft_kl_divergence(
            teacher_outputs, student_outputs, self.temperature
        )

    def get_config(self):
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _pearson(a, b, axis, eps=1e-8):
    """Pearson correlation of `a` and `b` along `axis`."""
    a = a - tf.reduce_mean(a, axis=axis, keepdims=True)
    b = b - tf.reduce_mean(b, axis=axis, keepdims=True)
    cov = tf.reduce_sum(a * b, axis=axis)
    norm = tf.sqrt(tf.reduce_sum(a * a, axis=axis) * tf.reduce_sum(b * b, axis=axis))
    return cov / (norm + eps)


@compat.serializable
class DISTLoss(compat.DistillationLoss):
    """DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher").

    It matches relations rather than exact probabilities:
    `beta * T^2 * (1 - mean_i pearson(p_s[i, :], p_t[i, :]))` (inter-class:
    each example's ranking of the classes) plus
    `gamma * T^2 * (1 - mean_c pearson(p_s[:, c], p_t[:, c]))` (intra-class:
    each class's ranking of the examples in the batch), with
    `p = softmax(logits / T)`. The paper's ImageNet setting is T = 1,
    beta = gamma = 1, added to a cross-entropy of weight 1 (the Distiller's
    `alpha = 0.5`: the same ratio).

    Args:
        temperature: softmax temperature, > 0. Defaults to 1.0.
        beta: weight of the inter-class term. Defaults to 1.0.
        gamma: weight of the intra-class term. Defaults to 1.0.
    """

    def __init__(self, temperature=1.0, beta=1.0, gamma=1.0):
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.beta = float(beta)
        self.gamma = float(gamma)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        t = tf.nn.softmax(tf.cast(teacher_outputs, tf.float32) / self.temperature, axis=-1)
        s = tf.nn.softmax(tf.cast(student_outputs, tf.float32) / self.temperature, axis=-1)
        inter = 1.0 - tf.reduce_mean(_pearson(s, t, axis=1))
        intra = 1.0 - tf.reduce_mean(_pearson(s, t, axis=0))
        return (self.temperature ** 2) * (self.beta * inter + self.gamma * intra)

    def get_config(self):
        return {"temperature": self.temperature, "beta": self.beta, "gamma": self.gamma}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@compat.serializable
class LabelCrossentropy(keras.losses.Loss):
    """Cross-entropy from logits of integer labels `(B,)` or soft labels `(B, classes)`, in float32.

    Mixup and cutmix (`kd.augment`) make soft labels for training while the
    test split keeps integer ones; this one loss takes both.
    """

    def __init__(self, name="label_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        logits = tf.cast(y_pred, tf.float32)
        y_true = tf.convert_to_tensor(y_true)
        if y_true.shape.rank == logits.shape.rank and y_true.shape[-1] != 1:
            return tf.nn.softmax_cross_entropy_with_logits(tf.cast(y_true, tf.float32), logits)
        labels = tf.cast(tf.reshape(y_true, tf.shape(logits)[:-1]), tf.int32)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)

    def get_config(self):
        return {"name": self.name}


@compat.serializable
def label_accuracy(y_true, y_pred):
    """Per-example 1/0: the arg-max of the logits is the label (the largest soft-label weight)."""
    y_true, y_pred = tf.convert_to_tensor(y_true), tf.convert_to_tensor(y_pred)
    predicted = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
    if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] != 1:
        labels = tf.argmax(y_true, axis=-1, output_type=tf.int32)
    else:
        labels = tf.cast(tf.reshape(y_true, tf.shape(predicted)), tf.int32)
    return tf.cast(tf.equal(predicted, labels), tf.float32)


def accuracy_metric(soft_labels=False):
    """The training accuracy metric, named "accuracy"; one for soft labels too when asked."""
    if soft_labels:
        return keras.metrics.MeanMetricWrapper(label_accuracy, name="accuracy")
    return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


def distillation_loss(name, temperature=None):
    """The loss object of a `--distillation_loss` choice.

    - `kd`: Hinton's `T^2 * KL` at `temperature` (default 10);
    - `kl`: plain `KL(p_t || p_s)` at T = 1 (function matching, Beyer et al.
      2022); another temperature is an error;
    - `dist`: `DISTLoss` at `temperature` (default 1).
    """
    if name not in DISTILLATION_LOSSES:
        raise ValueError(f"--distillation_loss must be one of {', '.join(DISTILLATION_LOSSES)}, "
                         f"got {name!r}")
    if temperature is None:
        temperature = DEFAULT_TEMPERATURES[name]
    if name == "kl":
        if float(temperature) != 1.0:
            raise ValueError(f"--distillation_loss kl is KL at T=1 (function matching); got "
                             f"--temperature {temperature}: use --distillation_loss kd for a "
                             "softened KL")
        return KDLoss(1.0)
    if name == "dist":
        return DISTLoss(float(temperature))
    return KDLoss(float(temperature))


@compat.serializable
class KerasLossDistillation(compat.DistillationLoss):
    """Adapts a plain Keras loss the way the keras-io / ModelZoo code uses it.

    `loss(softmax(t/T), softmax(s/T)) * T^2`, evaluated in float32, e.g. with
    `keras.losses.KLDivergence()`.

    Args:
        loss: a Keras loss or callable on probabilities.
        temperature: softmax temperature, > 0.
    """

    def __init__(self, loss, temperature):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.loss = loss
        self.temperature = float(temperature)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        t = tf.cast(teacher_outputs, tf.float32) / self.temperature
        s = tf.cast(student_outputs, tf.float32) / self.temperature
        value = replica_mean(self.loss, tf.nn.softmax(t, axis=-1), tf.nn.softmax(s, axis=-1))
        return value * (self.temperature**2)

    def get_config(self):
        return {"loss": keras.losses.serialize(self.loss), "temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(keras.losses.deserialize(config["loss"]), config["temperature"])


@compat.serializable
class OutputLoss(compat.DistillationLoss):
    """A Keras loss between teacher and student outputs, each divided by `temperature`.

    What `keras.distillation.LogitsDistillation` does with a non-KL loss and
    `FeatureDistillation` (temperature 1) does with any loss, but through
    `replica_mean`, so a `keras.losses.Loss` object is not divided by the
    replica count twice.

    Args:
        loss: a Keras loss object or a callable `loss(teacher, student)`.
        temperature: divides both outputs first. Defaults to 1.0.
    """

    def __init__(self, loss, temperature=1.0):
        self.loss = loss
        self.temperature = float(temperature)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        t = tf.cast(teacher_outputs, tf.float32)
        s = tf.cast(student_outputs, tf.float32)
        if self.temperature != 1.0:
            t, s = t / self.temperature, s / self.temperature
        return replica_mean(self.loss, t, s)

    def get_config(self):
        return {"loss": keras.losses.serialize(self.loss), "temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(keras.losses.deserialize(config["loss"]), config["temperature"])


def replica_mean(loss_fn, y_true, y_pred):
    """Mean of `loss_fn` over this replica's batch, never pre-divided by the replica count.

    Under tf.distribute a Keras 3 `keras.losses.Loss` with a mean reduction
    returns its mean divided by `num_replicas_in_sync` (so that compiled
    losses sum to the global mean), and Keras 2.6 refuses its "auto"
    reduction there. `compat.loss_object_mean` gives the plain mean on both,
    so every term of the Distiller's loss is scaled once, in
    `Distiller.compute_loss`.

    Args:
        loss_fn: a Keras loss object or a callable returning per-example values.
        y_true: targets.
        y_pred: predictions.

    Returns:
        Scalar tensor.
    """
    if isinstance(loss_fn, keras.losses.Loss) and loss_fn.reduction in compat.MEAN_REDUCTIONS:
        return compat.loss_object_mean(loss_fn, y_true, y_pred)
    return tf.reduce_mean(loss_fn(y_true, y_pred))


def _single_leaf(loss, what):
    leaves = [leaf for leaf in tf.nest.flatten(loss) if leaf is not None]
    if len(leaves) != 1:
        raise ValueError(
            f"{what} has {len(leaves)} losses: this Distiller distils one output, "
            "so give it one loss (e.g. keras.distillation.LogitsDistillation(temperature=T))"
        )
    return leaves[0]


def _is_kl(loss):
    return isinstance(loss, keras.losses.KLDivergence) or loss is keras.losses.kl_divergence


def _from_keras_distillation(loss_obj):
    """Keras' `LogitsDistillation` / `FeatureDistillation` as the project's losses.

    Keras applies them per leaf with `ops.mean(loss(t, s))`, which divides a
    `keras.losses.Loss` leaf by the replica count on top of the Distiller's
    own scaling, and its `LogitsDistillation()` default (the string
    "kl_divergence") resolves to a function that takes logits for
    probabilities. The conversions keep what each one means: KL on logits
    becomes Hinton's KD (T^2 KL of the softened distributions), any other
    leaf the same loss through `replica_mean`.
    """
    if isinstance(loss_obj, compat.LogitsDistillation):
        leaf = _single_leaf(loss_obj.loss, "LogitsDistillation")
        if _is_kl(leaf):
            if not isinstance(leaf, keras.losses.KLDivergence):
                logger.info(
                    "LogitsDistillation(loss='kl_divergence') would take KL of logits, "
                    "not probabilities: using Hinton's KD at temperature %s instead",
                    loss_obj.temperature)
            return KDLoss(float(loss_obj.temperature))
        return OutputLoss(leaf, float(loss_obj.temperature))
    return OutputLoss(_single_leaf(loss_obj.loss, "FeatureDistillation"), 1.0)


def loss_temperature(loss):
    """The temperature a distillation loss carries, or None."""
    value = getattr(loss, "temperature", None)
    return None if value is None else float(value)


def as_distillation_loss(distillation_loss_fn, temperature):
    """Normalises what `Distiller.compile` accepts into a `DistillationLoss`.

    Args:
        distillation_loss_fn: `None` (the default `KDLoss`), a
            `keras.distillation.DistillationLoss` (it owns its temperature;
            Keras' `LogitsDistillation` and `FeatureDistillation` are
            converted, see `_from_keras_distillation`; any other subclass is
            used as is and must return the plain mean over this replica's
            batch), or a Keras loss / callable on softened probabilities
            (keras-io style).
        temperature: the temperature for `None` and for Keras losses.

    Returns:
        A `keras.distillation.DistillationLoss`.
    """
    if distillation_loss_fn is None:
        return KDLoss(temperature)
    if isinstance(distillation_loss_fn, (compat.LogitsDistillation, compat.FeatureDistillation)):
        return _from_keras_distillation(distillation_loss_fn)
    if isinstance(distillation_loss_fn, compat.DistillationLoss):
        return distillation_loss_fn
    if isinstance(distillation_loss_fn, str):
        distillation_loss_fn = keras.losses.get(distillation_loss_fn)
    if not callable(distillation_loss_fn):
        raise ValueError(
            "distillation_loss_fn must be None, a keras.distillation."
            "DistillationLoss, a Keras loss or a callable, got "
            f"{distillation_loss_fn!r}"
        )
    return KerasLossDistillation(distillation_loss_fn, temperature)
