"""`Distiller`: a student learns from a teacher's outputs and the labels.

The API is the keras-io / ModelZoo one (`compile(optimizer, metrics,
student_loss_fn, distillation_loss_fn, alpha, temperature)`), and it also
takes `keras.distillation.DistillationLoss` objects. The block quantizer reuses
the same loop: float block as teacher, quantized block as student, `alpha=0`
and an MSE `FeatureDistillation` loss.
"""

import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.kd.losses import as_distillation_loss, loss_temperature, replica_mean

DEFAULT_TEMPERATURE = 10.0
_DISTILLER_COMPILE_KEYS = ("student_loss_fn", "distillation_loss_fn", "alpha", "temperature")


def _scale_for_replicas(value):
    # Each replica averages over its own slice of the global batch; the
    # gradient all-reduce sums replicas, so divide to get the global mean.
    # Every term reaching here is a plain mean (see losses.replica_mean).
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        value = value * (1.0 / replicas)
    return value


@compat.serializable
class Distiller(compat.LossModel):
    """Trains `student` on `alpha * label loss + (1 - alpha) * distillation loss`.

    Only the student's weights train; the teacher runs in inference mode.
    Losses are computed in float32 whatever the models' compute dtype, so
    mixed precision cannot underflow the softened probabilities.

    Args:
        teacher: a Keras model producing the teacher outputs (logits). May be
            `None` only with `teacher_outputs_in_data=True`.
        student: the Keras model to train.
        teacher_outputs_in_data: if True, training data is
            `((x, teacher_outputs), y)` (or `((x, teacher_outputs),)` when
            `alpha=0`): precomputed teacher outputs, so the teacher is not
            run every step. Plain `(x, y)` data still works for evaluation.
            Defaults to False.
        teacher_input_in_data: if True, training data is
            `((x, teacher_x), y)`: the teacher's own copy of each batch (e.g.
            at a larger resolution), which the teacher runs on every step.
            Defaults to False.

    Example:

    ```python
    distiller = Distiller(teacher=teacher, student=student)
    distiller.compile(
        optimizer=keras.optimizers.Adam(),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True),
        distillation_loss_fn=keras.losses.KLDivergence(),
        alpha=0.1,
        temperature=10,
    )
    distiller.fit(x_train, y_train, epochs=3)
    distiller.evaluate(x_test, y_test)
    ```
    """

    def __init__(
        self,
        teacher=None,
        student=None,
        teacher_outputs_in_data=False,
        teacher_input_in_data=False,
        name="distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if teacher_outputs_in_data and teacher_input_in_data:
            raise ValueError("teacher_outputs_in_data and teacher_input_in_data exclude each "
                             "other: the second input is the teacher's outputs or its input")
        if not isinstance(student, keras.Model):
            raise ValueError(
                f"student must be a keras.Model, got {type(student).__name__}"
            )
        if teacher is None and not teacher_outputs_in_data:
            raise ValueError(
                "teacher is None: pass a teacher model, or "
                "teacher_outputs_in_data=True with precomputed teacher outputs"
            )
        if teacher is not None and not isinstance(teacher, keras.Model):
            raise ValueError(
                f"teacher must be a keras.Model, got {type(teacher).__name__}"
            )
        self.teacher = teacher
        self.student = student
        self.teacher_outputs_in_data = bool(teacher_outputs_in_data)
        self.teacher_input_in_data = bool(teacher_input_in_data)
        if teacher_input_in_data and teacher is None:
            raise ValueError("teacher_input_in_data=True needs a teacher model")
        if teacher is not None:
            teacher.trainable = False
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(
            name="distillation_loss"
        )
        self.alpha = 0.1
        self.temperature = 10.0
        self.student_loss_fn = None
        self.distillation_loss = None

    def compile(
        self,
        optimizer="adam",
        metrics=None,
        student_loss_fn=None,
        distillation_loss_fn=None,
        alpha=0.1,
        temperature=None,
        **kwargs,
    ):
        """Configures the distiller.

        Args:
            optimizer: optimizer of the student weights. Defaults to "adam".
            metrics: metrics of the student predictions against the labels.
            student_loss_fn: loss of the student logits against the labels.
                Defaults to sparse categorical cross-entropy from logits
                (unused when `alpha=0`).
            distillation_loss_fn: `None` for Hinton's `KDLoss(temperature)`;
                a `keras.distillation.DistillationLoss` (used as is); or a
                Keras loss on softened probabilities, keras-io style
                (`loss(softmax(t/T), softmax(s/T)) * T^2`).
            alpha: weight of the student loss, in [0, 1]. Defaults to 0.1.
            temperature: softmax temperature, > 0. Defaults to 10.0, or to
                the temperature a `DistillationLoss` object carries; giving
                one that disagrees with the loss object's is an error.
            **kwargs: passed to `keras.Model.compile` (e.g. `jit_compile`).
        """
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be between 0.0 and 1.0, got {alpha}")
        if temperature is not None and not float(temperature) > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if kwargs.get("loss") is not None:
            raise ValueError(
                "Distiller.compile takes student_loss_fn and "
                "distillation_loss_fn, not loss"
            )
        kwargs.pop("loss", None)
        self.alpha = float(alpha)
        if student_loss_fn is None and self.alpha > 0:
            student_loss_fn = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            )
        elif isinstance(student_loss_fn, str):
            student_loss_fn = keras.losses.get(student_loss_fn)
        self.student_loss_fn = student_loss_fn
        own = (
            loss_temperature(distillation_loss_fn)
            if isinstance(distillation_loss_fn, compat.DistillationLoss)
            else None
        )
        if own is not None and temperature is not None and float(temperature) != own:
            raise ValueError(
                f"temperature={temperature} disagrees with the temperature {own} of "
                f"the {type(distillation_loss_fn).__name__} passed as "
                "distillation_loss_fn: set it in one place"
            )
        if temperature is None:
            temperature = own if own is not None else DEFAULT_TEMPERATURE
        self.temperature = float(temperature)
        self.distillation_loss = as_distillation_loss(
            distillation_loss_fn, self.temperature
        )
        if getattr(self.distillation_loss, "teacher_layer_name", None) or getattr(
            self.distillation_loss, "student_layer_name", None
        ):
            raise ValueError(
                "Distiller distils final outputs; for intermediate-layer "
                "FeatureDistillation use keras.distillation.Distiller or "
                "distil a sub-model"
            )
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def _split_inputs(self, inputs):
        """`(student input, teacher outputs or None, teacher input)`."""
        for flag, what in ((self.teacher_outputs_in_data, "teacher_outputs"),
                           (self.teacher_input_in_data, "teacher_input")):
            if flag and isinstance(inputs, (tuple, list)):
                if len(inputs) != 2:
                    raise ValueError(
                        f"with {what}_in_data=True the model input must be "
                        f"(x, {what}), got {len(inputs)} items")
                if self.teacher_input_in_data:
                    return inputs[0], None, inputs[1]
                return inputs[0], inputs[1], inputs[0]
        return inputs, None, inputs

    def call(self, inputs, training=None):
        x, _, _ = self._split_inputs(inputs)
        return self.student(x, training=training)

    def teacher_outputs(self, x):
        """Teacher outputs for `x`, in inference mode."""
        if self.teacher is None:
            raise ValueError(
                "this Distiller has no teacher model: pass "
                "(x, teacher_outputs) as input"
            )
        return tf.stop_gradient(self.teacher(x, training=False))

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if sample_weight is not None:
            # Keras turns fit(class_weight=...) into sample weights too.
            raise ValueError(
                "Distiller does not support sample_weight or class_weight: the "
                "distillation term has no per-example weighting; resample the "
                "data instead"
            )
        images, teacher_out, teacher_in = self._split_inputs(x)
        if y_pred is None:
            y_pred = self.student(images, training=training)
        y_pred32 = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), y_pred)

        student_loss = tf.constant(0.0)
        if self.alpha > 0.0:
            if y is None:
                raise ValueError(
                    f"alpha={self.alpha} needs labels: the data has no y"
                )
            student_loss = replica_mean(self.student_loss_fn, y, y_pred32)

        distillation_loss = tf.constant(0.0)
        if self.alpha < 1.0:
            if teacher_out is None:
                teacher_out = self.teacher_outputs(teacher_in)
            teacher_out = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), teacher_out)
            distillation_loss = tf.cast(
                self.distillation_loss.compute_loss(teacher_out, y_pred32), tf.float32
            )

        total = self.alpha * student_loss + (1.0 - self.alpha) * distillation_loss
        if self.student.losses:
            total = total + tf.add_n([tf.cast(l, tf.float32) for l in self.student.losses])
        self.student_loss_tracker.update_state(student_loss)
        self.distillation_loss_tracker.update_state(distillation_loss)
        return _scale_for_replicas(total)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "teacher": compat.serialize(self.teacher),
                "student": compat.serialize(self.student),
                "teacher_outputs_in_data": self.teacher_outputs_in_data,
                "teacher_input_in_data": self.teacher_input_in_data,
            }
        )
        return config

    def get_compile_config(self):
        config = super().get_compile_config()
        if not config:
            return config
        config.update(
            {
                "student_loss_fn": compat.serialize(
                    self.student_loss_fn
                ),
                "distillation_loss_fn": compat.serialize(
                    self.distillation_loss
                ),
                "alpha": self.alpha,
                "temperature": self.temperature,
            }
        )
        return config

    def compile_from_config(self, config):
        config = dict(config)
        own = {key: config.pop(key) for key in _DISTILLER_COMPILE_KEYS if key in config}
        config = compat.deserialize(config)
        for key in ("student_loss_fn", "distillation_loss_fn"):
            if own.get(key) is not None:
                own[key] = compat.deserialize(own[key])
        loss = own.get("distillation_loss_fn")
        if loss_temperature(loss) is not None:
            own["temperature"] = None  # the loss object carries it
        self.compile(**config, **own)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("teacher", "student"):
            if config.get(key) is not None:
                config[key] = compat.deserialize(config[key])
        return cls(**config)
