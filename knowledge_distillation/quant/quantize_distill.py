"""Block distillation: each quantized block learns to reproduce its float block.

Blocks are distilled one after another, in topological order, with the
project's `Distiller`: the float block is the teacher (its outputs are
computed once and fed as data), the quantized block the student, the loss the
MSE of the block outputs (`alpha=0`, `FeatureDistillation("mse")`), the
optimizer AdamW.

The student's input is the output of the already-quantized model up to the
block (so a block learns to correct the error its predecessors left), unless
that drifts too far from the float input: when the relative error
`mean((x_q - x_f)^2) / mean(x_f^2)` exceeds `max_input_drift`, the block
learns from the float input instead, and the log says so.

Before training, the activation clip ranges are calibrated on `batch_num`
batches of the student input (min/max); the weight scales start from a
per-channel MSE search. With `epochs=0` this is calibration-only
quantization (round to nearest), the baseline distillation must beat.
"""

import collections
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from knowledge_distillation.kd.distiller import Distiller
from knowledge_distillation.quant import quantize_layers
from knowledge_distillation.quant.quantize_build import float32_policy
from knowledge_distillation.quant.quantize_layers import QuantizedLayer
from knowledge_distillation.util.inference import array_batches, batched_predict

logger = logging.getLogger(__name__)

# AdaRound / BRECQ schedule of the rounding regulariser.
ROUND_REG_LAMBDA = 0.01
ROUND_WARMUP = 0.2
ROUND_BETA = (20.0, 2.0)
# From this fraction of the steps on, the forward pass rounds hard (as at
# inference) with the gradient still through the soft rounding: a short
# schedule leaves many soft roundings between 0 and 1, and training on them
# then rounding would lose what was learned (measured on MobileNetV2 INT4).
ROUND_HARD_FROM = 0.7
# Block outputs (float and quantized) kept in memory for the blocks after
# them; memory-mapped dumps do not count.
CARRY_BYTES = 1 << 30


class RoundingSchedule(keras.callbacks.Callback):
    """Anneals the AdaRound regulariser over the block's training steps.

    No regulariser for the first `warmup` fraction of steps (the rounding
    moves freely), then weight `reg_weight` with the exponent `beta` going
    linearly from `beta[0]` to `beta[1]`, which pushes the soft roundings
    towards 0 or 1; from `hard_from` on, the forward pass rounds hard.
    """

    def __init__(self, layers, total_steps, reg_weight, warmup=ROUND_WARMUP, beta=ROUND_BETA,
                 hard_from=None):
        super().__init__()
        self.hard_from = ROUND_HARD_FROM if hard_from is None else hard_from
        self.layers = [layer for layer in layers if layer.learned_rounding]
        self.total_steps = max(int(total_steps), 1)
        self.reg_weight = float(reg_weight)
        self.warmup = warmup
        self.beta = beta
        self.step = 0

    def on_train_batch_begin(self, batch, logs=None):
        progress = self.step / self.total_steps
        if progress < self.warmup:
            beta, weight = self.beta[0], 0.0
        else:
            rel = (progress - self.warmup) / (1.0 - self.warmup)
            beta = self.beta[1] + (self.beta[0] - self.beta[1]) * max(0.0, 1.0 - rel)
            weight = self.reg_weight
        hard = 1.0 if progress >= self.hard_from else 0.0
        for layer in self.layers:
            layer.round_beta.assign(beta)
            layer.round_reg_weight.assign(weight)
            layer.round_hard.assign(hard)
        self.step += 1


def predict(model, x, batch_size=256):
    """`model(x)` in inference mode, batched, as a NumPy array.

    `x` is an array, or a list of arrays for a model with several inputs.
    Runs eagerly: a quantized layer's frozen/unfrozen switch is a Python
    attribute, which a cached `predict` trace would not see change.
    """
    return batched_predict(model, array_batches(x, batch_size))


def relative_error(x, reference):
    """`mean((x - reference)^2) / mean(reference^2)` (0 for a zero reference)."""
    denom = float(np.mean(np.square(reference, dtype=np.float64)))
    num = float(np.mean(np.square(x - reference, dtype=np.float64)))
    return num / denom if denom > 0 else num


def mse(x, reference):
    return float(np.mean(np.square(x - reference, dtype=np.float64)))


def _dataset(x, t, batch_size, seed):
    n = len(x)
    rng = np.random.default_rng(seed)

    def batches():
        while True:
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                idx = np.sort(order[start:start + batch_size])
                yield ((np.asarray(x[idx]), np.asarray(t[idx])),)

    spec = ((tf.TensorSpec((None,) + x.shape[1:], tf.float32),
             tf.TensorSpec((None,) + t.shape[1:], tf.float32)),)
    return tf.data.Dataset.from_generator(batches, output_signature=spec).prefetch(2)


class CarriedOutputs:
    """Float and quantized block outputs kept for the blocks after them.

    A block's input is computed from the nearest tensors whose values are
    at hand (the outputs of the blocks before it, else the model input), so
    a chain of blocks costs one pass of each block, not a pass of the whole
    prefix per block. The oldest outputs are dropped beyond `max_bytes`
    (a residual branch reaching further back is then recomputed from the
    model input or the outputs still kept).
    """

    def __init__(self, images, max_bytes=CARRY_BYTES):
        self.images = images
        self.max_bytes = max_bytes
        self.values = collections.OrderedDict()

    def add(self, tensor_id, float_value, quant_value):
        self.values[tensor_id] = (float_value, quant_value)
        self.values.move_to_end(tensor_id)
        while len(self.values) > 1 and self._bytes() > self.max_bytes:
            self.values.popitem(last=False)

    def _bytes(self):
        return sum(np.asarray(v).nbytes for pair in self.values.values() for v in pair
                   if not isinstance(v, np.memmap))

    def inputs(self, qmodel, tensor_id):
        """`(float, quantized)` values of the tensor `tensor_id`."""
        if tensor_id == qmodel.graph.input_id:
            return self.images, self.images
        if tensor_id in self.values:
            return self.values[tensor_id]
        sources = qmodel.segment_sources(tensor_id, self.values)
        values = []
        for which, (model, ids) in enumerate(qmodel.segment_models(sources, tensor_id)):
            arrays = [self._value(qmodel, s, which) for s in ids]
            values.append(arrays[0] if model is None else predict(model, arrays))
        return tuple(values)

    def _value(self, qmodel, tensor_id, which):
        if tensor_id == qmodel.graph.input_id:
            return self.images
        return self.values[tensor_id][which]


def range_images(num_images, batch_size, batch_num):
    """How many images set the activation ranges: AMCT's `batch_num` batches of `batch_size`."""
    return min(int(num_images), int(batch_size) * int(batch_num))


def calibrate_block(student, x_in, batch_size, batch_num):
    """Initialises the activation ranges of a block's quantized layers.

    The block's layers run in order on `batch_num` batches of its input;
    each quantized layer takes the min/max of what reaches it (after the
    earlier layers of the block are calibrated and quantized).
    """
    x = np.asarray(x_in[: batch_size * batch_num])
    for layer in student.layers[1:]:
        if isinstance(layer, QuantizedLayer) and layer.state is None:
            layer.calibrate(float(np.min(x)), float(np.max(x)))
        x = predict(layer, x)


def _dump(dump_dir, index, name, array):
    path = os.path.join(dump_dir, f"block{index:03d}_{name}.npy")
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def distill(
    qmodel,
    images,
    *,
    epochs=1,
    batch_size=32,
    batch_num=None,
    max_input_drift=0.1,
    learning_rate=quantize_layers.BASE_LR,
    weight_decay=0.0,
    seed=0,
    dump_dir=None,
):
    """Calibrates and distils every block of `qmodel`, then freezes it.

    Args:
        qmodel: a `QuantizedModel` (from `create_quant_model`).
        images: preprocessed float32 training images `(N, H, W, C)` (the
            calibration set, e.g. a slice of the training split).
        epochs: passes over `images` per block; 0 calibrates only.
            Defaults to 1 (AMCT's one pass).
        batch_size: examples per step. Defaults to 32.
        batch_num: batches used to calibrate the activation ranges.
            Defaults to the distill config's `batch_num`.
        max_input_drift: the largest relative error of the quantized
            predecessor's output for the block to learn from it; beyond
            it the block learns from the float input. Defaults to 0.1.
        learning_rate: AdamW learning rate of the rounding logits; the
            activation clips learn 10x and the weight clips 0.01x as fast
            (AMCT's 0.1 and 1e-4 at the default). Defaults to 1e-2.
        weight_decay: AdamW weight decay. Defaults to 0.0: the variables
            are clips and rounding logits, not weights to shrink.
        seed: seed of the shuffling and the optimizer. Defaults to 0.
        dump_dir: if set, each block's input and target are written there
            as `.npy` and read back memory-mapped (the config's `data_dump`).

    Returns:
        A list with one dict per block: `layers`, `input` ("quantized" or
        "float"), `input_drift`, `loss_before` (calibrated), `loss_after`,
        `kept` ("distilled", or "calibrated" when distillation did not lower
        the block's loss and its calibrated factors were kept), `seconds`.
    """
    with float32_policy():
        return _distill(qmodel, images, epochs, batch_size, batch_num, max_input_drift,
                        learning_rate, weight_decay, seed, dump_dir)


def _distill(qmodel, images, epochs, batch_size, batch_num, max_input_drift, learning_rate,
             weight_decay, seed, dump_dir):
    images = np.asarray(images, np.float32)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f"distill needs a non-empty batch of images, got shape {images.shape}")
    batch_num = batch_num or qmodel.config.batch_num
    logger.info(
        "activation ranges: min/max of the first %d of the %d calibration images "
        "(batch_num %d x batch_size %d)", range_images(len(images), batch_size, batch_num),
        len(images), batch_num, batch_size)
    keras.utils.set_random_seed(seed)
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    reports = []
    carried = CarriedOutputs(images)
    total = len(qmodel.blocks)
    for index, block in enumerate(qmodel.blocks):
        start = time.perf_counter()
        x_float, x_quant = carried.inputs(qmodel, qmodel.block_input_id(block))
        drift = relative_error(x_quant, x_float)
        use_float = drift > max_input_drift
        x_in = x_float if use_float else x_quant
        teacher, student = qmodel.block_models(block)
        target = predict(teacher, x_float)
        if dump_dir:
            x_in = _dump(dump_dir, index, "input", x_in)
            target = _dump(dump_dir, index, "target", target)
        calibrate_block(student, x_in, batch_size, batch_num)
        loss_before = mse(predict(student, x_in), target)
        layers = qmodel.block_quant_layers(block)
        trainable = [v for layer in layers for v in layer.trainable_variables]
        calibrated = {layer.name: layer.learned_state() for layer in layers}
        kept = "calibrated"
        if epochs > 0 and trainable:
            _fit_block(teacher, student, layers, x_in, target, epochs, batch_size,
                       learning_rate, weight_decay, seed + index)
            kept = "distilled"
        for layer in layers:
            layer.freeze()
        y_student = predict(student, x_in)
        loss_after = mse(y_student, target)
        if kept == "distilled" and loss_after > loss_before:
            for layer in layers:
                layer.freeze(calibrated[layer.name])
            distilled_loss = loss_after
            y_student = predict(student, x_in)
            loss_after = mse(y_student, target)
            kept = "calibrated"
            logger.warning(
                "block %s: distillation raised the loss (%.4g -> %.4g); keeping the "
                "calibrated factors (loss %.4g)", block, loss_before, distilled_loss, loss_after)
        # The quantized model's output of the block is the student on the
        # quantized input, whichever input it learned from.
        carried.add(qmodel.block_output_id(block), target,
                    predict(student, x_quant) if use_float else y_student)
        seconds = time.perf_counter() - start
        source = "float input" if use_float else "quantized predecessor"
        relation = ">" if use_float else "<="
        logger.info(
            "block %d/%d %s: input from %s (drift %.3g %s %.3g); MSE loss before %.4g "
            "after %.4g (%.1f s)", index + 1, total, block, source, drift, relation,
            max_input_drift, loss_before, loss_after, seconds)
        reports.append({
            "layers": list(block),
            "input": "float" if use_float else "quantized",
            "input_drift": drift,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "kept": kept,
            "seconds": seconds,
        })
    return reports


def _fit_block(teacher, student, layers, x_in, target, epochs, batch_size,
               learning_rate, weight_decay, seed):
    steps_per_epoch = -(-len(x_in) // batch_size)
    steps = epochs * steps_per_epoch
    channels = int(target.shape[-1])
    distiller = Distiller(teacher=teacher, student=student, teacher_outputs_in_data=True)
    distiller.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay),
        student_loss_fn=None,
        distillation_loss_fn=keras.distillation.FeatureDistillation(loss="mse"),
        alpha=0.0,
        jit_compile=False,
    )
    # BRECQ sums the squared error over channels; MSE averages it, so the
    # rounding regulariser is divided by the channel count to keep its ratio.
    schedule = RoundingSchedule(layers, steps, ROUND_REG_LAMBDA / channels)
    distiller.fit(_dataset(x_in, target, batch_size, seed), epochs=epochs,
                  steps_per_epoch=steps_per_epoch, callbacks=[schedule], verbose=0)
