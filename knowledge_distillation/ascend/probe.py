"""A probe in a model's compiled train step, and the step recomputation it allows.

Keras offers no hook inside the compiled train step, and a callback sees
neither the batch nor the weights as they were before the update. The probe
wraps `model.train_step` when a callback is attached (`Callback.set_model`
runs before `fit` builds its train function) and, inside the compiled step:

- counts its traces and records the traced input shapes (`--static`);
- when asked, copies the step's batch and the pre-step weights of the
  inspected model into variables (`--data_dump_flag`, `--over_dump`);
- after the update, records whether the weights stayed finite and the
  dynamic loss scale before and after the step (`--over_dump`).

`recompute()` then replays the captured step eagerly on a feature-extractor
model under a GradientTape: every layer's output, the loss and every
trainable weight's gradient, exactly as the step saw them (the RNG state is
part of the restored weights, so dropout draws the same masks). The model's
weights are put back afterwards. For a Distiller, the inspected model is the
student; the loss is still the Distiller's.
"""

import dataclasses
import re

import numpy as np
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.compat import keras


def inspected_model(model):
    """The model whose layers are dumped: a Distiller's student, else `model`."""
    student = getattr(model, "student", None)
    return student if isinstance(student, keras.Model) else model


def _inputs_of(model, x):
    # A Distiller may get (x, teacher_outputs); its student only sees x.
    split = getattr(model, "_split_inputs", None)
    return split(x)[0] if callable(split) and model is not inspected_model(model) else x


def _layer_outputs(target):
    """`(layer name, tensor name, KerasTensor)` for every layer of `target`."""
    entries = []
    for layer in target.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            outputs = tf.nest.flatten(layer.output)
        except (AttributeError, ValueError) as e:
            raise ValueError(
                f"cannot read the output of layer {layer.name!r} of {target.name!r} "
                f"(a layer called more than once cannot be dumped): {e}"
            ) from e
        if len(outputs) == 1:
            entries.append((layer.name, "output", outputs[0]))
        else:
            entries.extend(
                (layer.name, f"output_{i}", t) for i, t in enumerate(outputs)
            )
    return entries


def build_extractor(target):
    """A model returning `target`'s outputs followed by every layer's output."""
    inputs = getattr(target, "inputs", None)
    outputs = getattr(target, "outputs", None)
    if not inputs or not outputs:
        raise ValueError(
            f"data dump and overflow detection read every layer's output, which "
            f"needs a Functional or Sequential model; {target.name!r} is a "
            f"{type(target).__name__} without a layer graph"
        )
    entries = _layer_outputs(target)
    extractor = keras.Model(
        inputs[0] if len(inputs) == 1 else inputs,
        list(outputs) + [t for _, _, t in entries],
        name=f"{target.name}_extractor",
    )
    return extractor, len(outputs), [(layer, name) for layer, name, _ in entries]


@dataclasses.dataclass
class StepTensors:
    """One replayed training step.

    Attributes:
        inputs: `[(name, array)]` of the inspected model's inputs.
        outputs: `[(layer, tensor, array)]` in layer order.
        loss: the (unscaled) loss.
        loss_scale: the dynamic loss scale of the step, or None.
        gradients: `[(layer, weight, array)]` of the unscaled gradients.
        scaled_gradients_finite: per gradient, whether the scaled gradient
            (what a loss-scale optimizer checks) is finite.
        non_finite_after_update: `[(layer, weight)]` whose value after the
            real step's update is not finite.
        dtypes: `{id(array): dtype name}` of tensors computed in a dtype numpy
            lacks (bfloat16 is stored as float32).
    """

    inputs: list
    outputs: list
    loss: np.ndarray
    loss_scale: float
    gradients: list
    scaled_gradients_finite: list
    non_finite_after_update: list
    dtypes: dict


def _to_numpy(tensor, dtypes):
    tensor = tf.convert_to_tensor(tensor)
    if tensor.dtype == tf.bfloat16:
        array = tensor.numpy().astype(np.float32)
        dtypes[id(array)] = "bfloat16"
        return array
    return tensor.numpy()


class StepProbe:
    """Wraps one model's train step; shared by the callbacks of one `fit`.

    Args:
        capture: whether steps may be captured for `recompute`.
        check_finite: whether to record, every step, if the weights stayed
            finite and the loss scale before/after (implies capturing every
            step).
    """

    def __init__(self, capture=False, check_finite=False):
        self.check_finite = check_finite
        self.capture = capture or check_finite
        self.model = None
        self._installed = False
        self.traces = 0
        self.trace_shapes = []
        self.trace_listeners = []  # called as listener(probe, input_shapes) per trace
        self._original = None
        self._structure = None
        self._batch_vars = None
        self._backup = None
        self._scale_var = None
        self._flag = None
        self._flag_value = None
        self._status = None
        self._extractor = None

    # -- installation -----------------------------------------------------

    def install(self, model):
        """Wraps `model.train_step`; idempotent for the same model."""
        if self.model is not None and self.model is not model:
            raise ValueError("a StepProbe serves one model; build one per fit")
        if self._installed:
            return
        original = model.train_step
        while hasattr(original, "_probe_original"):  # a probe left by a failed fit
            original = original._probe_original
        self.model, self._original, self._installed = model, original, True

        def train_step(data):
            return self._train_step(data)

        train_step._probe_original = original
        model.train_step = train_step
        model.train_function = None  # rebuilt by fit around the probe
        if self.capture and self._flag is None:
            self._flag = tf.Variable(self.check_finite, trainable=False, name="capture")
            self._flag_value = self.check_finite
            self._status = tf.Variable([1.0, 0.0, 0.0, -1.0], trainable=False, name="status")

    def uninstall(self):
        """Gives the model its own train step back (next fit retraces)."""
        model = self.model
        if self._installed and "train_step" in model.__dict__:
            del model.train_step
            model.train_function = None
        self._installed = False

    def before_fit(self):
        """Builds what the probe reads in the step: optimizer, feature extractor.

        Keras builds the optimizer during the first trace, after the probe has
        read the loss scale; building it first is what Keras does under a
        distribution strategy. A model without a layer graph fails here,
        before training.
        """
        optimizer = self.model.optimizer
        if optimizer is not None:
            compat.build_optimizer(optimizer, self.model.trainable_variables)
        self.check_inspectable()

    def check_inspectable(self):
        """Builds the feature extractor now, so a bad model fails before training."""
        if self._extractor is None:
            self._extractor = build_extractor(inspected_model(self.model))
        return self._extractor

    # -- inside the compiled step ------------------------------------------

    def _train_step(self, data):
        if not tf.executing_eagerly() and _first_replica():
            shapes = [tuple(t.shape) for t in tf.nest.flatten(data) if t is not None]
            # tf.function throws away a first trace that creates variables (the
            # capture slots below) and traces again: count only the kept one.
            if not (self.capture and self._batch_vars is None):
                self.traces += 1
                self.trace_shapes.append(shapes)
            for listener in self.trace_listeners:
                listener(self, shapes)
        if not self.capture:
            return self._original(data)
        scale_before = self._capture(data)
        logs = self._original(data)
        if self.check_finite:
            weights = [compat.variable_value(v) for v in self.model.trainable_variables]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(w)) for w in weights])
            scale_after = self._loss_scale()
            self._status.assign(
                tf.stack(
                    [tf.cast(finite, tf.float32), scale_before, scale_after, self._good_steps()]
                )
            )
        return logs

    def _loss_scale(self):
        optimizer = self.model.optimizer
        if isinstance(optimizer, compat.LossScaleOptimizer):
            return compat.loss_scale_value(optimizer)
        return tf.constant(0.0)

    def _good_steps(self):
        optimizer = self.model.optimizer
        if isinstance(optimizer, compat.LossScaleOptimizer):
            return compat.loss_scale_good_steps(optimizer)
        return tf.constant(-1.0)

    def _capture(self, data):
        leaves = [t for t in tf.nest.flatten(data) if t is not None]
        variables = inspected_model(self.model).variables
        if self._batch_vars is None:
            self._structure = tf.nest.map_structure(lambda t: t is not None, data)
            with tf.init_scope():
                # Unknown shape: the last batch of an epoch may be smaller.
                self._batch_vars = [
                    tf.Variable(
                        tf.zeros([0], t.dtype), shape=tf.TensorShape(None), trainable=False
                    )
                    for t in leaves
                ]
                self._backup = [
                    tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False)
                    for v in variables
                ]
                self._scale_var = tf.Variable(0.0, trainable=False)
        scale = self._loss_scale()

        def capture():
            for var, t in zip(self._batch_vars, leaves):
                var.assign(t)
            for backup, v in zip(self._backup, variables):
                backup.assign(compat.variable_value(v))
            self._scale_var.assign(scale)
            return tf.constant(True)

        tf.cond(self._flag, capture, lambda: tf.constant(False))
        return scale

    # -- from callbacks -----------------------------------------------------

    def request_capture(self, wanted):
        """Captures the next step if `wanted` (always when checking finiteness)."""
        value = bool(wanted) or self.check_finite
        if value != self._flag_value:
            self._flag.assign(value)
            self._flag_value = value

    def status(self):
        """`(weights_finite, loss_scale_before, loss_scale_after, good_steps_after)` of the last step.

        `good_steps_after` is the loss scaler's count of finite steps since it
        last changed the scale (0 right after an overflow), or -1 where Keras
        does not keep one.
        """
        finite, before, after, good = self._status.numpy().tolist()
        return finite > 0.5, before, after, good

    def recompute(self):
        """Replays the last captured step; see the module docstring.

        Returns:
            A `StepTensors`.
        """
        if self._batch_vars is None:
            raise RuntimeError("no training step has been captured yet")
        model = self.model
        target = inspected_model(model)
        extractor, n_outputs, names = self.check_inspectable()
        leaves = iter([v.value() for v in self._batch_vars])
        data = tf.nest.map_structure(
            lambda present: next(leaves) if present else None, self._structure
        )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        scale = float(self._scale_var.numpy()) or None
        weights = model.trainable_weights
        connected = []

        def replay():
            with tf.GradientTape() as tape:
                outs = extractor(_inputs_of(model, x), training=True)
                y_pred = outs[0] if n_outputs == 1 else outs[:n_outputs]
                loss = compat.model_loss(model, x, y, y_pred, sample_weight)
                scaled = loss * scale if scale else loss
            grads = tape.gradient(scaled, weights)
            connected[:] = [g is not None for g in grads]
            return outs[n_outputs:], loss, [g for g in grads if g is not None]

        # Put the pre-step weights back, replay (in a replica context, which a
        # one-replica strategy's variables need), restore the post-step state.
        state = list(target.variables) + compat.metrics_variables(model)
        after = [tf.identity(compat.variable_value(v)) for v in state]
        for v, backup in zip(target.variables, self._backup):
            v.assign(backup.value())
        try:
            strategy = model.distribute_strategy
            outs, loss, grads = tf.nest.map_structure(
                lambda t: strategy.experimental_local_results(t)[0], strategy.run(replay)
            )
        finally:
            for v, value in zip(state, after):
                v.assign(value)

        owners = _weight_owners(target)
        named = [
            (owners.get(id(w), target.name), _weight_name(w, owners.get(id(w), target.name)))
            for w in weights
        ]
        after_by_id = {id(v): value for v, value in zip(state, after)}
        dtypes = {}
        images = tf.nest.flatten(_inputs_of(model, x))
        return StepTensors(
            inputs=[
                (f"input_{i}" if len(images) > 1 else "input", _to_numpy(t, dtypes))
                for i, t in enumerate(images)
            ],
            outputs=[
                (layer, name, _to_numpy(t, dtypes)) for (layer, name), t in zip(names, outs)
            ],
            loss=_to_numpy(loss, dtypes),
            loss_scale=scale,
            gradients=[
                (layer, name, _to_numpy(g / scale if scale else g, dtypes))
                for (layer, name), g in zip(
                    [n for n, c in zip(named, connected) if c], grads
                )
            ],
            scaled_gradients_finite=[bool(tf.reduce_all(tf.math.is_finite(g))) for g in grads],
            non_finite_after_update=[
                name
                for name, w in zip(named, weights)
                if not bool(tf.reduce_all(tf.math.is_finite(after_by_id.get(id(w), 0.0))))
            ],
            dtypes=dtypes,
        )


def _first_replica():
    # Under a tf.distribute strategy the step is traced once per replica.
    context = tf.distribute.get_replica_context()
    if context is None:
        return True
    return tf.get_static_value(context.replica_id_in_sync_group) in (0, None)


def _weight_owners(target):
    """`{id(weight): top-level layer name}`, the layers the dump is named by."""
    return {id(w): layer.name for layer in target.layers for w in layer.trainable_weights}


def _weight_name(weight, owner):
    path = compat.variable_path(weight)
    start = path.find(owner + "/")
    return path[start + len(owner) + 1 :] if start >= 0 else path.rsplit("/", 1)[-1]


def safe_file_name(name):
    """A file-name-safe spelling of a layer or tensor name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
