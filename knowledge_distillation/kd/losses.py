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
