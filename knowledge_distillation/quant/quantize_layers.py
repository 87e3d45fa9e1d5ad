"""`QuantizedLayer`: a Conv2D, DepthwiseConv2D, Conv1D, Conv2DTranspose or Dense with fake quantization.

(A SeparableConv2D becomes two: its depthwise and its pointwise part.)

It holds the float layer's kernel and bias with BatchNorm already folded in
(fixed), and learns the quantization factors:

- the input activation's clip range (ULQ: `clip_min`, `clip_max`, per
  tensor, initialised by calibration), from which the INT8 scale and zero
  point follow;
- with `ulq_distill` weights, the weights' clip value per output channel
  (symmetric scale, LSQ-style through a straight-through rounding);
- with `arq_distill` weights, the rounding of every weight (AdaRound: a soft
  rounding `floor(w / s) + h(V)` during training, pushed to 0/1 by an
  annealed regulariser; hard `floor(w / s) + (V >= 0)` at inference), the
  scale staying at its per-channel MSE-searched start.

`freeze()` turns the learned state into the exact integers and float32
scales that the record file and the ONNX models hold; a frozen layer
computes `conv(q - offset_d, w_int) * (scale_d * scale_w) + bias` with
`q = quantize(x, scale_d, offset_d)`: the fake-quant product in an order
where every partial sum is an exact integer, which is bitwise what ONNX
Runtime computes on the exported models.
"""

import numpy as np
import tensorflow as tf
import keras

from knowledge_distillation.quant import quantize_math as qm

KINDS = ("conv2d", "depthwise", "dense", "conv1d", "conv_transpose")
WEIGHT_ALGOS = ("arq_distill", "ulq_distill")

# Learning rates. The optimizer's is BASE_LR, that of the rounding logits
# (AdaRound uses 1e-3 over 20k steps; a block here gets a few hundred, and
# 1e-2 measured best on MobileNetV2 INT4). The activation clips (AMCT: 0.1)
# and weight clips (AMCT: 1e-4) reach theirs through variables scaled by
# lr / BASE_LR: Adam's step size does not depend on the gradient's scale.
BASE_LR = 1e-2
ACT_CLIP_LR = 0.1
WEIGHT_CLIP_LR = 1e-4


# --- float kernels, BatchNorm folded ------------------------------------------


def layer_kernels(layer, kind):
    """`(kernel, bias)` of a quantizable layer in float64: bias zeros when it has none.

    For "separable" the kernel is the pointwise one (the depthwise kernel
    is `layer.depthwise_kernel`).
    """
    kernel = layer.pointwise_kernel if kind == "separable" else layer.kernel
    kernel = np.asarray(keras.ops.convert_to_numpy(kernel), np.float64)
    channels = output_channels(kind, kernel.shape)
    bias = getattr(layer, "bias", None)
    if bias is None or not getattr(layer, "use_bias", True):
        bias = np.zeros(channels)
    else:
        bias = np.asarray(keras.ops.convert_to_numpy(bias), np.float64).reshape(channels)
    return kernel, bias


def output_channels(kind, kernel_shape):
    if kind == "depthwise":
        return kernel_shape[2] * kernel_shape[3]
    if kind == "conv_transpose":
        return kernel_shape[2]
    return kernel_shape[-1]


def fold_batchnorm(layer, bn=None, kind=None):
    """The kernel and bias of `layer` (of quantizer `kind`; default: depthwise
    for a DepthwiseConv2D, else a kernel with output channels last) with the
    inference BatchNorm `bn` folded.

    `bn(conv(x, W) + b) = conv(x, W * a) + (b - mean) * a + beta` with
    `a = gamma / sqrt(var + eps)` per output channel, computed in float64.

    Returns:
        `(kernel, bias)` float32 arrays; bias is zeros when the layer has none.
    """
    if kind is None:
        kind = "depthwise" if isinstance(layer, keras.layers.DepthwiseConv2D) else "dense"
    kernel, bias = layer_kernels(layer, kind)
    channels = output_channels(kind, kernel.shape)
    if bn is not None:
        gamma = bn.gamma.numpy() if bn.scale else np.ones(channels)
        beta = bn.beta.numpy() if bn.center else np.zeros(channels)
        mean = bn.moving_mean.numpy()
        var = bn.moving_variance.numpy()
        a = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + bn.epsilon)
        if kind == "depthwise":
            kernel = kernel * a.reshape(kernel.shape[2], kernel.shape[3])
        elif kind == "conv_transpose":
            kernel = kernel * a.reshape(1, 1, -1, 1)
        else:
            kernel = kernel * a
        bias = (bias - mean) * a + beta
    return kernel.astype(np.float32), bias.astype(np.float32)


class QuantState:
    """The frozen quantization factors of one layer (what the record holds).

    Attributes:
        scale_d: float32 input scale.
        offset_d: int input zero point.
        scale_w: float32 `(channels,)` weight scales.
        dst_type_d: activation type ("INT8").
        dst_type_w: weight type ("INT8" or "INT4").
        round_up: optional bool array shaped like the kernel (learned
            rounding), or `None` for round-half-to-even.
    """

    def __init__(self, scale_d, offset_d, scale_w, dst_type_w, round_up=None, dst_type_d="INT8"):
        self.scale_d = np.float32(scale_d)
        self.offset_d = int(offset_d)
        self.scale_w = np.asarray(scale_w, np.float32).reshape(-1)
        self.dst_type_w = qm.check_dst_type(dst_type_w)
        self.dst_type_d = qm.check_dst_type(dst_type_d)
        self.round_up = None if round_up is None else np.asarray(round_up, bool)

    @property
    def multiplier(self):
        """`scale_d * scale_w` in float32: turns the integer accumulator to float."""
        return (self.scale_d * self.scale_w).astype(np.float32)


class QuantizedLayer(keras.layers.Layer):
    """A quantized Conv2D / DepthwiseConv2D / Dense with BatchNorm folded.

    Args:
        kind: "conv2d", "depthwise", "dense", "conv1d" or "conv_transpose".
        kernel: folded float kernel in the Keras layout of `kind`.
        bias: folded float bias `(channels,)`.
        strides, padding, dilation_rate: the convolution's arguments
            (ignored for Dense); groups follow from the kernel's shape.
            Conv1D's "causal" padding pads the start of the sequence.
        output_padding: Conv2DTranspose's, or None.
        activation: the float layer's own activation (a Keras activation
            name or function), applied after the bias.
        weight_dst_type: "INT8" or "INT4". Defaults to "INT8".
        weight_algo: "arq_distill" (learned scale and rounding) or
            "ulq_distill" (learned scale, round to nearest).
            Defaults to "arq_distill".
        channel_wise: one weight scale per output channel. Defaults to True.
        fixed_min: keep the activation clip minimum at 0 (not learned).
            `None` decides at calibration: fixed when the input is never
            negative. Defaults to None.
        clip_init: optional `(clip_min, clip_max)` that replaces calibration.
        act_dst_type: activation type; only "INT8". Defaults to "INT8".
        **kwargs: `keras.layers.Layer` arguments (`name`).
    """

    def __init__(
        self,
        kind,
        kernel,
        bias,
        strides=1,
        padding="valid",
        dilation_rate=1,
        activation=None,
        output_padding=None,
        weight_dst_type="INT8",
        weight_algo="arq_distill",
        channel_wise=True,
        fixed_min=None,
        clip_init=None,
        act_dst_type="INT8",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if weight_algo not in WEIGHT_ALGOS:
            raise ValueError(
                f"weight algo must be one of {', '.join(WEIGHT_ALGOS)}, got {weight_algo!r}"
            )
        if act_dst_type != "INT8":
            raise ValueError(
                f"activations are quantized to INT8 only, got dst_type {act_dst_type!r}"
            )
        self.kind = kind
        self.float_kernel = np.asarray(kernel, np.float32)
        self.float_bias = np.asarray(bias, np.float32)
        self.strides = strides
        self.padding = padding
        self.dilation_rate = dilation_rate
        self.output_padding = output_padding
        self.activation = keras.activations.get(activation)
        self.weight_dst_type = qm.check_dst_type(weight_dst_type)
        self.act_dst_type = act_dst_type
        self.weight_algo = weight_algo
        self.channel_wise = bool(channel_wise)
        self.fixed_min = fixed_min
        self.clip_init = clip_init
        self.learned_rounding = weight_algo == "arq_distill"
        if kind == "depthwise":
            # Output channel c * multiplier + j comes from kernel[:, :, c, j].
            self.scale_shape = (1, 1) + self.float_kernel.shape[2:]
        elif kind == "conv_transpose":  # (kh, kw, out, in)
            self.scale_shape = (1, 1, self.float_kernel.shape[2], 1)
        else:
            self.scale_shape = (1,) * (self.float_kernel.ndim - 1) + (self.float_kernel.shape[-1],)
        self.channels = int(np.prod(self.scale_shape))
        self.state = None  # QuantState once frozen

    # -- weights ------------------------------------------------------------

    def build(self, input_shape):
        qmin_w, qmax_w = qm.weight_range(self.weight_dst_type)
        self._w_qmax = qmax_w
        self._w_qmin = qmin_w
        self._act_k = ACT_CLIP_LR / BASE_LR
        self._w_k = WEIGHT_CLIP_LR / BASE_LR
        const = keras.initializers.Constant
        self.kernel = self.add_weight(
            name="kernel", shape=self.float_kernel.shape,
            initializer=const(self.float_kernel), trainable=False)
        self.bias = self.add_weight(
            name="bias", shape=self.float_bias.shape,
            initializer=const(self.float_bias), trainable=False)
        lo, hi = self.clip_init if self.clip_init is not None else (0.0, 1.0)
        self.clip_min_raw = self.add_weight(
            name="clip_min", shape=(), initializer=const(lo / self._act_k),
            trainable=not self.fixed_min)
        self.clip_max_raw = self.add_weight(
            name="clip_max", shape=(), initializer=const(hi / self._act_k), trainable=True)
        scales = self._flat_kernel_scales()
        # With learned rounding the scale stays at its MSE-searched value:
        # moving it would shift floor(w / s) under the rounding being learned.
        self.weight_clip_raw = self.add_weight(
            name="weight_clip", shape=(self.channels,),
            initializer=const(scales * qmax_w / self._w_k),
            trainable=not self.learned_rounding)
        if self.learned_rounding:
            self.round_v = self.add_weight(
                name="round_v", shape=self.float_kernel.shape,
                initializer=const(self._adaround_init(scales)), trainable=True)
        # Annealing state of the rounding regulariser, set by the distiller.
        self.round_beta = self.add_weight(
            name="round_beta", shape=(), initializer=const(20.0), trainable=False)
        self.round_reg_weight = self.add_weight(
            name="round_reg_weight", shape=(), initializer=const(0.0), trainable=False)
        self.round_hard = self.add_weight(
            name="round_hard", shape=(), initializer=const(0.0), trainable=False)
        self._frozen_scale_d = self.add_weight(
            name="scale_d", shape=(), initializer="ones", trainable=False)
        self._frozen_offset_d = self.add_weight(
            name="offset_d", shape=(), initializer="zeros", trainable=False)
        self._frozen_w_int = self.add_weight(
            name="weight_int", shape=self.float_kernel.shape,
            initializer="zeros", trainable=False)
        self._frozen_multiplier = self.add_weight(
            name="dequant_scale", shape=(self.channels,), initializer="zeros", trainable=False)
        super().build(input_shape)

    def _channel_view(self, kernel):
        """The kernel with one output channel per index of its last axis."""
        # Depthwise output channel c * multiplier + j is kernel[:, :, c, j]:
        # a row-major reshape puts it at index c * multiplier + j.
        if self.kind == "depthwise":
            return kernel.reshape(kernel.shape[:2] + (-1,))
        if self.kind == "conv_transpose":
            return np.swapaxes(kernel, 2, 3)
        return kernel

    def _from_channel_view(self, view):
        if self.kind == "conv_transpose":
            return np.swapaxes(view, 2, 3)
        return view.reshape(self.float_kernel.shape)

    def _flat_kernel_scales(self):
        return qm.weight_scales(
            self._channel_view(self.float_kernel), -1, self.weight_dst_type, self.channel_wise)

    def _adaround_init(self, scales):
        view = qm.adaround_init(self._channel_view(self.float_kernel), scales, -1)
        return self._from_channel_view(view)

    # -- calibration --------------------------------------------------------

    def calibrate(self, x_min, x_max):
        """Initialises the activation clip range from observed input values.

        A range given by the config (`clip_init`) is kept. `fixed_min=None`
        becomes True when the input was never negative.
        """
        if self.fixed_min is None:
            self.fixed_min = bool(x_min >= 0.0)
            self.clip_min_raw.trainable = not self.fixed_min
        if self.clip_init is None:
            lo = 0.0 if self.fixed_min else float(x_min)
            self.clip_min_raw.assign(lo / self._act_k)
            self.clip_max_raw.assign(float(x_max) / self._act_k)
        elif self.fixed_min:
            self.clip_min_raw.assign(0.0)

    # -- forward ------------------------------------------------------------

    def _act_params(self):
        qmin, qmax = qm.int_range(self.act_dst_type)
        return qm.tf_activation_params(
            self.clip_min_raw * self._act_k, self.clip_max_raw * self._act_k, qmin, qmax)

    def _weight_scale(self):
        clip = tf.maximum(self.weight_clip_raw * self._w_k, 1e-8)
        return tf.reshape(clip / float(self._w_qmax), self.scale_shape)

    def _fake_quant_kernel(self, training):
        scale = self._weight_scale()
        scaled = self.kernel / scale
        if self.learned_rounding:
            base = tf.stop_gradient(tf.floor(scaled))
            if training:
                soft = qm.adaround_h(self.round_v)
                hard = tf.cast(self.round_v >= 0.0, self.kernel.dtype)
                # In the hard phase the forward pass rounds as at inference
                # while the gradient still flows through the soft rounding.
                rounding = soft + self.round_hard * tf.stop_gradient(hard - soft)
            else:
                rounding = tf.cast(self.round_v >= 0.0, self.kernel.dtype)
            q = base + rounding
        else:
            q = qm.round_ste(scaled)
        q = tf.clip_by_value(q, float(self._w_qmin), float(self._w_qmax))
        return q * scale

    def call(self, inputs, training=None):
        qmin, qmax = qm.int_range(self.act_dst_type)
        if self.state is not None:
            # (q - offset_d) and w_int are integers held in float32: every
            # partial sum of the convolution is an exact integer (below 2^24),
            # whatever the summation order, so this is bitwise what ONNX
            # Runtime computes on the exported models.
            x = qm.tf_quantize(inputs, self._frozen_scale_d, self._frozen_offset_d, qmin, qmax)
            acc = self._op(x - self._frozen_offset_d, self._frozen_w_int)
            return self.activation(acc * self._frozen_multiplier + self.bias)
        scale, zero_point = self._act_params()
        x = qm.tf_fake_quantize(inputs, scale, zero_point, qmin, qmax)
        kernel = self._fake_quant_kernel(training)
        if training and self.learned_rounding:
            self.add_loss(self.round_reg_weight * qm.adaround_regularizer(
                self.round_v, self.round_beta))
        return self.activation(self._op(x, kernel) + self.bias)

    def _op(self, x, kernel):
        if self.kind == "dense":
            return keras.ops.matmul(x, kernel)
        if self.kind == "depthwise":
            return keras.ops.depthwise_conv(
                x, kernel, strides=self.strides, padding=self.padding,
                data_format="channels_last", dilation_rate=self.dilation_rate)
        if self.kind == "conv_transpose":
            return keras.ops.conv_transpose(
                x, kernel, strides=self.strides, padding=self.padding,
                output_padding=self.output_padding, data_format="channels_last",
                dilation_rate=self.dilation_rate)
        padding = self.padding
        if padding == "causal":  # zeros before the sequence: real 0 in every domain
            dilation = self.dilation_rate[0] if isinstance(self.dilation_rate, (list, tuple)) \
                else self.dilation_rate
            x = keras.ops.pad(x, [[0, 0], [dilation * (kernel.shape[0] - 1), 0], [0, 0]])
            padding = "valid"
        return keras.ops.conv(
            x, kernel, strides=self.strides, padding=padding,
            data_format="channels_last", dilation_rate=self.dilation_rate)

    def compute_output_shape(self, input_shape):
        if self.kind == "dense":
            return tuple(input_shape[:-1]) + (self.float_kernel.shape[-1],)
        spec = keras.KerasTensor(input_shape)
        shape = self.float_kernel.shape
        if self.kind in ("conv2d", "conv1d"):  # grouped kernels hold in/groups input channels
            shape = shape[:-2] + (input_shape[-1], shape[-1])
        return self._op(spec, keras.KerasTensor(shape)).shape

    # -- freezing -----------------------------------------------------------

    def learned_state(self):
        """The `QuantState` the current (unfrozen) variables round to."""
        act_k = np.float32(self._act_k)
        lo = np.float32(self.clip_min_raw.numpy()) * act_k
        hi = np.float32(self.clip_max_raw.numpy()) * act_k
        if self.fixed_min:
            lo = np.float32(0.0)
        scale_d, offset_d = qm.activation_params(lo, hi, self.act_dst_type)
        clip_w = np.maximum(self.weight_clip_raw.numpy() * np.float32(self._w_k), 1e-8)
        scale_w = (clip_w / np.float32(self._w_qmax)).astype(np.float32)
        round_up = (self.round_v.numpy() >= 0.0) if self.learned_rounding else None
        return QuantState(scale_d, offset_d, scale_w, self.weight_dst_type, round_up, self.act_dst_type)

    def integer_kernel(self, state=None):
        """The int8 kernel of `state` (values within the INT4 range for INT4)."""
        state = state or self.state
        round_up = None if state.round_up is None else self._channel_view(state.round_up)
        q = qm.quantize_weights(
            self._channel_view(self.float_kernel), state.scale_w, -1,
            self.weight_dst_type, round_up)
        return self._from_channel_view(q)

    def freeze(self, state=None):
        """Fixes the layer to `state` (default: the learned one).

        Afterwards the layer computes exactly what the exported ONNX models
        compute, with hard rounding, in training mode too.
        """
        state = state or self.learned_state()
        if state.scale_w.shape != (self.channels,):
            raise ValueError(
                f"layer {self.name}: record has {state.scale_w.size} weight "
                f"scales, the layer has {self.channels} output channels")
        if state.dst_type_w != self.weight_dst_type:
            raise ValueError(
                f"layer {self.name}: record weight dst_type {state.dst_type_w} "
                f"does not match the config's {self.weight_dst_type}")
        if state.round_up is not None and state.round_up.shape != self.float_kernel.shape:
            flat = state.round_up.reshape(-1)
            size = self.float_kernel.size
            if flat.size != -(-size // 8) * 8:
                raise ValueError(
                    f"layer {self.name}: record rounding has {flat.size} bits, the "
                    f"kernel has {size} weights")
            state = QuantState(state.scale_d, state.offset_d, state.scale_w, state.dst_type_w,
                               flat[:size].reshape(self.float_kernel.shape), state.dst_type_d)
        self.state = state
        w_int = self.integer_kernel(state).astype(np.float32)
        self._frozen_w_int.assign(w_int)
        self._frozen_multiplier.assign(state.multiplier)
        self._frozen_scale_d.assign(state.scale_d)
        self._frozen_offset_d.assign(float(state.offset_d))
        for variable in self.trainable_variables:
            variable.trainable = False
        return state
