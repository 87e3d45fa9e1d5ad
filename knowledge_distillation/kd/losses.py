"""Knowledge-distillation losses.

`KDLoss` is Hinton's soft-target loss in the `keras.distillation`
`DistillationLoss` protocol, so it plugs into Keras' own distiller as well as
ours. It is computed in float32 from log-softmax, whatever the compute dtype of
the logits, and always carries the explicit T^2 factor.
"""

import logging

import keras
import tensorflow as tf
from keras import ops

logger = logging.getLogger(__name__)

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


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
    t = ops.cast(teacher_logits, "float32") / temperature
    s = ops.cast(student_logits, "float32") / temperature
    log_p_teacher = ops.log_softmax(t, axis=-1)
    log_p_student = ops.log_softmax(s, axis=-1)
    per_example = ops.sum(
        ops.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1
    )
    return ops.mean(per_example)


@keras.saving.register_keras_serializable(package="knowledge_distillation")
class KDLoss(keras.distillation.DistillationLoss):
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


@keras.saving.register_keras_serializable(package="knowledge_distillation")
class KerasLossDistillation(keras.distillation.DistillationLoss):
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
        t = ops.cast(teacher_outputs, "float32") / self.temperature
        s = ops.cast(student_outputs, "float32") / self.temperature
        value = replica_mean(self.loss, ops.softmax(t, axis=-1), ops.softmax(s, axis=-1))
        return value * (self.temperature**2)

    def get_config(self):
        return {"loss": keras.losses.serialize(self.loss), "temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(keras.losses.deserialize(config["loss"]), config["temperature"])


@keras.saving.register_keras_serializable(package="knowledge_distillation")
class OutputLoss(keras.distillation.DistillationLoss):
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
        t = ops.cast(teacher_outputs, "float32")
        s = ops.cast(student_outputs, "float32")
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

    Under tf.distribute a `keras.losses.Loss` with a mean reduction returns
    its mean divided by `num_replicas_in_sync` (Keras' convention, so that
    compiled losses sum to the global mean); a plain loss function returns
    per-example values. This undoes the division, as Keras' own trainer does
    for its loss trackers, so every term of the Distiller's loss is a plain
    mean and is scaled once, in `Distiller.compute_loss`.

    Args:
        loss_fn: a Keras loss object or a callable returning per-example values.
        y_true: targets.
        y_pred: predictions.

    Returns:
        Scalar tensor.
    """
    value = ops.mean(loss_fn(y_true, y_pred))
    if isinstance(loss_fn, keras.losses.Loss) and loss_fn.reduction in _MEAN_REDUCTIONS:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value * float(replicas)
    return value


def _single_leaf(loss, what):
    leaves = [leaf for leaf in keras.tree.flatten(loss) if leaf is not None]
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
    if isinstance(loss_obj, keras.distillation.LogitsDistillation):
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
    if isinstance(distillation_loss_fn, (keras.distillation.LogitsDistillation,
                                         keras.distillation.FeatureDistillation)):
        return _from_keras_distillation(distillation_loss_fn)
    if isinstance(distillation_loss_fn, keras.distillation.DistillationLoss):
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
