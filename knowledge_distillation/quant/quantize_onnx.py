"""Keras graph -> ONNX: the float, fake-quant and deploy models.

The exporter walks the model's layer graph and writes each layer as ONNX
nodes itself, so the quantization nodes carry exactly the factors of the
record (no converter re-derives a scale from a min/max). Image tensors are
kept in NCHW between convolutions (one Transpose after the NHWC input, and
back to NHWC only where Keras' layout matters: Flatten, Reshape, Dense on
images, layers exported through tf2onnx). A layer with no handler here is
converted on its own with `tf2onnx.convert.from_function` and spliced in (it
stays float), and the log names it.

Modes, for each quantized layer (`QuantizedLayer`, frozen):

- "fake_quant": `QuantizeLinear -> DequantizeLinear` on the input (int8,
  scale_d, offset_d) and on the weights (float initializer holding
  `w_int * scale_w`, int8/int4 per-channel QuantizeLinear), dequantized to
  the integer levels (scale 1), a float Conv / MatMul, then
  `Mul(scale_d * scale_w) -> Add(bias)`: the fake-quant product with the
  scales applied after the sums, so every partial sum is an exact integer
  and ONNX Runtime computes bitwise what the TF simulation and the deploy
  model compute.
- "deploy": int8 (or int4, cast to int8) weight initializers with BatchNorm
  folded; the input is quantized to 8 bits and the layer runs as
  `ConvInteger` / `MatMulInteger` (8-bit x int8 -> int32, an integer kernel
  in ONNX Runtime), then `Cast -> Mul(scale_d * scale_w) -> Add(bias)`: the
  AMCT quant / integer conv / dequant sequence.
- "float": the float model, for reference (size, ONNX-vs-Keras checks).

The deploy model's activations are int8 or uint8 (`activation_dtype`); the
two give bit-identical logits. The uint8 model quantizes with the zero point
`offset_d + 128`, so its `QuantizeLinear` yields `x_q + 128` and the integer
op subtracts `offset_d + 128`: `x_u - z_u == x_q - z_d` exactly. They differ
only in which ONNX Runtime kernel runs:

- "int8" (int8 x int8, S8S8): both operands signed and the weights within
  -127..127, so no pair of products can saturate the 16-bit sums of AVX2's
  `vpmaddubsw`, the failure of uint8 x int8 kernels on x86 CPUs without
  VNNI. Correct everywhere, but ONNX Runtime has no fast S8S8 kernel on x86:
  on an AVX-512 VNNI CPU it ran 2.8-3.8x slower than the float model at
  batch 32.
- "uint8" (uint8 x int8, U8S8): ONNX Runtime's VNNI kernel (`vpdpbusd`
  sums four u8 x s8 products into int32, nothing saturates): a fraction of
  the float model's time (0.27x at batch 32 there). On x86 without VNNI
  (plain AVX2) the same model runs through `vpmaddubsw` and loses accuracy.

`deploy_activation_dtype("auto")` picks uint8 on x86-64 CPUs with VNNI
(`avx512_vnni` or `avx_vnni` in /proc/cpuinfo) and int8 elsewhere, also where
the CPU flags cannot be read. The choice follows the CPU that builds the
model: pass "int8" or "uint8" explicitly to target another deployment CPU.
"""

import logging
import platform

import keras
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from knowledge_distillation.quant import quantize_graph
from knowledge_distillation.quant.quantize_io import atomic_write
from knowledge_distillation.quant.quantize_layers import QuantizedLayer

logger = logging.getLogger(__name__)

OPSET = 21  # INT4 QuantizeLinear / DequantizeLinear / Cast
IR_VERSION = 10
FALLBACK_OPSET = 18  # the newest tf2onnx 1.17 writes; its ops keep their meaning at 21
MODES = ("float", "fake_quant", "deploy")
ACTIVATION_DTYPES = ("int8", "uint8")  # of the deploy model's integer ops
CPUINFO = "/proc/cpuinfo"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # Linux names of AVX512-VNNI and AVX-VNNI
X86_64_MACHINES = ("x86_64", "amd64", "x64")
NCHW, KERAS = "nchw", "keras"
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class _Builder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self, activation_dtype="int8"):
        self.activation_dtype = activation_dtype  # of the deploy model's integer ops
        self.nodes = []
        self.initializers = []
        self.used = set()
        self.values = {}  # keras tensor id -> (onnx name, layout, rank)
        self.converted = {}
        self.domains = {"": OPSET}
        self.fallbacks = []

    def unique(self, base):
        base = "".join(c if c.isalnum() or c in "_./:-" else "_" for c in base) or "t"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def const(self, base, array):
        name = self.unique(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def int4_const(self, base, values):
        """An INT4 initializer, packed two values per byte (raw data).

        ONNX packs INT4 with the first element in the low nibble; an odd
        count pads the last high nibble with 0. (`helper.make_tensor` from a
        list stores each packed byte as a varint in `int32_data`, about 1.5x
        the size.)
        """
        name = self.unique(base)
        values = np.asarray(values)
        flat = values.reshape(-1).astype(np.int8)
        if flat.size % 2:
            flat = np.append(flat, np.int8(0))
        nibbles = flat.view(np.uint8) & 0x0F
        packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
        self.initializers.append(helper.make_tensor(
            name, TensorProto.INT4, list(values.shape), packed.tobytes(), raw=True))
        return name

    def op(self, op_type, inputs, base, **attrs):
        out = self.unique(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def set(self, tensor_id, name, layout, rank):
        self.values[tensor_id] = (name, layout if rank == 4 else KERAS, rank)

    def rank(self, tensor_id):
        return self.values[tensor_id][2]

    def get(self, tensor_id, layout):
        name, current, rank = self.values[tensor_id]
        if rank != 4 or current == layout:
            return name
        key = (name, layout)
        if key not in self.converted:
            perm = TO_NCHW if layout == NCHW else TO_NHWC
            self.converted[key] = self.op("Transpose", [name], f"{name}/{layout}", perm=perm)
        return self.converted[key]


# --- helpers ----------------------------------------------------------------


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _spatial_attrs(padding, in_hw, kernel_hw, strides, dilations=(1, 1)):
    """ONNX pads of Keras 'valid'/'same' (TensorFlow's SAME: extra at the end)."""
    if padding == "valid":
        return {"pads": [0, 0, 0, 0]}
    if None in in_hw:
        return {"auto_pad": "SAME_UPPER"}
    begins, ends = [], []
    for size, k, s, d in zip(in_hw, kernel_hw, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        begins.append(total // 2)
        ends.append(total - total // 2)
    return {"pads": begins + ends}


def _conv_spec(layer, kind, input_shape, kernel_shape):
    strides = _pair(layer.strides)
    dilations = _pair(layer.dilation_rate)
    kernel_hw = kernel_shape[:2]
    attrs = dict(strides=list(strides), dilations=list(dilations), kernel_shape=list(kernel_hw))
    attrs.update(_spatial_attrs(layer.padding, input_shape[1:3], kernel_hw, strides, dilations))
    if kind == "depthwise":
        attrs["group"] = int(kernel_shape[2])
    else:
        attrs["group"] = int(input_shape[-1] // kernel_shape[2])
    return attrs


def onnx_kernel(kind, kernel):
    """A Keras kernel in ONNX layout: Conv `(out, in/group, kh, kw)`, MatMul `(in, out)`."""
    kernel = np.asarray(kernel)
    if kind == "dense":
        return kernel
    if kind == "depthwise":
        kernel = kernel.reshape(kernel.shape[:2] + (1, -1))
    return np.transpose(kernel, (3, 2, 0, 1))


def _channel_shape(kind, channels):
    return (1, channels, 1, 1) if kind != "dense" else (channels,)


_ACTIVATIONS = {
    "relu": lambda b, x, base: b.op("Relu", [x], base),
    "relu6": lambda b, x, base: _clip(b, x, 0.0, 6.0, base),
    "sigmoid": lambda b, x, base: b.op("Sigmoid", [x], base),
    "tanh": lambda b, x, base: b.op("Tanh", [x], base),
    "elu": lambda b, x, base: b.op("Elu", [x], base, alpha=1.0),
    "selu": lambda b, x, base: b.op("Selu", [x], base),
    "softplus": lambda b, x, base: b.op("Softplus", [x], base),
    "softsign": lambda b, x, base: b.op("Softsign", [x], base),
    "exponential": lambda b, x, base: b.op("Exp", [x], base),
    "hard_sigmoid": lambda b, x, base: b.op("HardSigmoid", [x], base, alpha=1.0 / 6.0, beta=0.5),
    "hard_silu": lambda b, x, base: b.op("HardSwish", [x], base),
    "silu": lambda b, x, base: b.op("Mul", [x, b.op("Sigmoid", [x], base + "/sigmoid")], base),
    "leaky_relu": lambda b, x, base: b.op("LeakyRelu", [x], base, alpha=0.2),
    "gelu": lambda b, x, base: b.op("Gelu", [x], base, approximate="none"),
    "mish": lambda b, x, base: b.op("Mish", [x], base),
}
_ACTIVATIONS["swish"] = _ACTIVATIONS["silu"]
_ACTIVATIONS["hard_swish"] = _ACTIVATIONS["hard_silu"]


def _clip(b, x, lo, hi, base):
    inputs = [x, b.const(base + "/min", np.float32(lo)),
              b.const(base + "/max", np.float32(hi)) if hi is not None else ""]
    return b.op("Clip", inputs, base)


class _Unsupported(Exception):
    """A layer configuration the native handlers do not cover."""


# --- handlers: each sets the ONNX value of node.outputs ---------------------


def _h_quantized(b, node, mode):
    layer = node.layer
    if layer.state is None:
        raise ValueError(
            f"layer {layer.name} is not frozen: distil the model or apply a record "
            "before exporting it")
    if mode == "float":
        raise ValueError("float export of a quantized model: export the float model")
    state = layer.state
    kind = layer.kind
    layout = KERAS if kind == "dense" else NCHW
    x = b.get(node.inputs[0], layout)
    base = layer.name
    w_int = onnx_kernel(kind, layer.integer_kernel())
    channels = state.scale_w.size
    axis = 1 if kind == "dense" else 0
    s_d = b.const(f"{base}/scale_d", np.float32(state.scale_d))
    if mode == "deploy" and b.activation_dtype == "uint8":
        # QuantizeLinear then yields x_q + 128, and x_u - z_u == x_q - z_d.
        z_d = b.const(f"{base}/offset_d_uint8", np.uint8(int(state.offset_d) + 128))
    else:
        z_d = b.const(f"{base}/offset_d", np.int8(state.offset_d))
    x_q = b.op("QuantizeLinear", [x, s_d, z_d], f"{base}/input_quant")
    attrs = {}
    if kind != "dense":
        attrs = _conv_spec(layer, kind, node.input_shapes[0], layer.float_kernel.shape)
    int4 = state.dst_type_w == "INT4"
    if mode == "fake_quant":
        # Dequantize to the integer levels (scale 1) and apply the scales
        # after the convolution: every partial sum is then an exact integer,
        # as in the deploy model's integer kernel and the TF simulation.
        one = b.const(f"{base}/unit_scale", np.float32(1.0))
        x_i = b.op("DequantizeLinear", [x_q, one, z_d], f"{base}/input_dequant")
        w_shape = [1] * w_int.ndim
        w_shape[axis] = channels
        w_float = w_int.astype(np.float32) * state.scale_w.reshape(w_shape)
        w = b.const(f"{base}/weight", w_float)
        s_w = b.const(f"{base}/scale_w", state.scale_w)
        if int4:
            z_w = b.int4_const(f"{base}/offset_w", np.zeros(channels, int))
            z_0 = b.int4_const(f"{base}/weight_zero", np.zeros((), int))
        else:
            z_w = b.const(f"{base}/offset_w", np.zeros(channels, np.int8))
            z_0 = b.const(f"{base}/weight_zero", np.int8(0))
        w_q = b.op("QuantizeLinear", [w, s_w, z_w], f"{base}/weight_quant", axis=axis)
        w_i = b.op("DequantizeLinear", [w_q, one, z_0], f"{base}/weight_dequant")
        if kind == "dense":
            acc = b.op("MatMul", [x_i, w_i], f"{base}/matmul")
        else:
            acc = b.op("Conv", [x_i, w_i], f"{base}/conv", **attrs)
    else:
        if int4:
            w4 = b.int4_const(f"{base}/weight_int4", w_int)
            w = b.op("Cast", [w4], f"{base}/weight_int8", to=TensorProto.INT8)
        else:
            w = b.const(f"{base}/weight_int8", w_int.astype(np.int8))
        if kind == "dense":
            acc = b.op("MatMulInteger", [x_q, w, z_d], f"{base}/matmul_integer")
        else:
            acc = b.op("ConvInteger", [x_q, w, z_d], f"{base}/conv_integer", **attrs)
        acc = b.op("Cast", [acc], f"{base}/acc_float", to=TensorProto.FLOAT)
    shape = _channel_shape(kind, channels)
    y = b.op("Mul", [acc, b.const(f"{base}/dequant_scale", state.multiplier.reshape(shape))],
             f"{base}/dequant")
    y = b.op("Add", [y, b.const(f"{base}/bias", layer.float_bias.reshape(shape))],
             f"{base}/bias_add")
    rank = len(node.output_shapes[0])
    _finish_activation(b, node, y, layout, rank, layer.activation, base)


def _finish_activation(b, node, y, layout, rank, fn, base):
    name = keras.activations.serialize(fn)
    if name in ("softmax", "log_softmax"):
        if rank == 4 and layout == NCHW:
            y = b.op("Transpose", [y], f"{base}/nhwc", perm=TO_NHWC)
        out = b.op("Softmax" if name == "softmax" else "LogSoftmax", [y], f"{base}/{name}", axis=-1)
        b.set(node.outputs[0], out, KERAS, rank)
        return
    if name == "linear":
        b.set(node.outputs[0], y, layout, rank)
        return
    if isinstance(name, str) and name in _ACTIVATIONS:
        b.set(node.outputs[0], _ACTIVATIONS[name](b, y, f"{base}/{name}"), layout, rank)
        return
    if rank == 4 and layout == NCHW:
        y = b.op("Transpose", [y], f"{base}/nhwc", perm=TO_NHWC)
    (out,) = _splice_tf_function(b, fn, [y], [node.output_shapes[0]], f"{base}/activation")
    b.fallbacks.append(f"{base} activation ({name!r})")
    b.set(node.outputs[0], out, KERAS, rank)


def _h_conv(b, node, mode):
    layer = node.layer
    kind = "depthwise" if isinstance(layer, keras.layers.DepthwiseConv2D) else "conv2d"
    if layer.data_format != "channels_last" or len(node.input_shapes[0]) != 4:
        raise _Unsupported("not a channels_last 2-D convolution")
    kernel, bias = quantize_graph.fold_batchnorm(layer)
    x = b.get(node.inputs[0], NCHW)
    attrs = _conv_spec(layer, kind, node.input_shapes[0], kernel.shape)
    w = b.const(f"{layer.name}/kernel", onnx_kernel(kind, kernel))
    y = b.op("Conv", [x, w, b.const(f"{layer.name}/bias", bias)], layer.name, **attrs)
    _finish_activation(b, node, y, NCHW, 4, layer.activation, layer.name)


def _h_dense(b, node, mode):
    layer = node.layer
    x = b.get(node.inputs[0], KERAS)
    y = b.op("MatMul", [x, b.const(f"{layer.name}/kernel", layer.kernel.numpy())], layer.name)
    if layer.use_bias:
        y = b.op("Add", [y, b.const(f"{layer.name}/bias", layer.bias.numpy())], f"{layer.name}/bias_add")
    _finish_activation(b, node, y, KERAS, len(node.output_shapes[0]), layer.activation, layer.name)


def _h_batchnorm(b, node, mode):
    layer = node.layer
    rank = len(node.input_shapes[0])
    axis = layer.axis if not isinstance(layer.axis, (list, tuple)) else layer.axis[0]
    if len(np.atleast_1d(layer.axis)) != 1 or axis % rank != rank - 1:
        raise _Unsupported("BatchNormalization not on the last axis")
    channels = node.input_shapes[0][-1]
    gamma = layer.gamma.numpy() if layer.scale else np.ones(channels, np.float32)
    beta = layer.beta.numpy() if layer.center else np.zeros(channels, np.float32)
    a = gamma / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
    shift = beta - layer.moving_mean.numpy() * a
    layout = NCHW if rank == 4 else KERAS
    shape = (1, channels, 1, 1) if rank == 4 else (channels,)
    x = b.get(node.inputs[0], layout)
    y = b.op("Mul", [x, b.const(f"{layer.name}/scale", a.astype(np.float32).reshape(shape))], f"{layer.name}/mul")
    y = b.op("Add", [y, b.const(f"{layer.name}/shift", shift.astype(np.float32).reshape(shape))], layer.name)
    b.set(node.outputs[0], y, layout, rank)


def _elementwise_layout(b, node):
    ranks = {b.rank(t) for t in node.inputs}
    return NCHW if ranks == {4} else KERAS


def _h_unary(op_type, **attrs):
    def handler(b, node, mode):
        layout = _elementwise_layout(b, node)
        x = b.get(node.inputs[0], layout)
        b.set(node.outputs[0], b.op(op_type, [x], node.name, **attrs), layout,
              len(node.output_shapes[0]))
    return handler


def _h_relu(b, node, mode):
    layer = node.layer
    slope = float(layer.negative_slope)
    if float(layer.threshold) != 0.0:
        raise _Unsupported("ReLU threshold")
    layout = _elementwise_layout(b, node)
    x = b.get(node.inputs[0], layout)
    if slope == 0.0:
        y = b.op("Relu", [x], node.name) if layer.max_value is None else \
            _clip(b, x, 0.0, float(layer.max_value), node.name)
    elif layer.max_value is None:
        y = b.op("LeakyRelu", [x], node.name, alpha=slope)
    else:
        raise _Unsupported("ReLU with both negative_slope and max_value")
    b.set(node.outputs[0], y, layout, len(node.output_shapes[0]))


def _h_leaky_relu(b, node, mode):
    _h_unary("LeakyRelu", alpha=float(node.layer.negative_slope))(b, node, mode)


def _h_elu(b, node, mode):
    _h_unary("Elu", alpha=float(node.layer.alpha))(b, node, mode)


def _h_activation(b, node, mode):
    layout = _elementwise_layout(b, node)
    x = b.get(node.inputs[0], layout)
    _finish_activation(b, node, x, layout, len(node.output_shapes[0]), node.layer.activation, node.name)


def _h_softmax(b, node, mode):
    axis = node.layer.axis
    if axis not in (-1, len(node.input_shapes[0]) - 1) or len(node.keras_node.input_tensors) != 1:
        raise _Unsupported("Softmax not on the last axis or with a mask")
    x = b.get(node.inputs[0], KERAS)
    b.set(node.outputs[0], b.op("Softmax", [x], node.name, axis=-1), KERAS, len(node.output_shapes[0]))


def _h_merge(op_type):
    def handler(b, node, mode):
        layout = _elementwise_layout(b, node)
        inputs = [b.get(t, layout) for t in node.inputs]
        y = inputs[0]
        for i, other in enumerate(inputs[1:]):
            y = b.op(op_type, [y, other], f"{node.name}/{i}")
        b.set(node.outputs[0], y, layout, len(node.output_shapes[0]))
    return handler


def _h_average(b, node, mode):
    layout = _elementwise_layout(b, node)
    inputs = [b.get(t, layout) for t in node.inputs]
    y = b.op("Sum", inputs, f"{node.name}/sum")
    y = b.op("Div", [y, b.const(f"{node.name}/n", np.float32(len(inputs)))], node.name)
    b.set(node.outputs[0], y, layout, len(node.output_shapes[0]))


def _h_concat(b, node, mode):
    rank = len(node.output_shapes[0])
    axis = node.layer.axis % rank
    layout = _elementwise_layout(b, node)
    if layout == NCHW:
        axis = {0: 0, 1: 2, 2: 3, 3: 1}[axis]
    inputs = [b.get(t, layout) for t in node.inputs]
    b.set(node.outputs[0], b.op("Concat", inputs, node.name, axis=axis), layout, rank)


def _h_pool(op_type):
    def handler(b, node, mode):
        layer = node.layer
        if layer.data_format != "channels_last" or len(node.input_shapes[0]) != 4:
            raise _Unsupported("not a channels_last 2-D pooling")
        pool = _pair(layer.pool_size)
        strides = _pair(layer.strides)
        attrs = dict(kernel_shape=list(pool), strides=list(strides))
        attrs.update(_spatial_attrs(layer.padding, node.input_shapes[0][1:3], pool, strides))
        x = b.get(node.inputs[0], NCHW)
        b.set(node.outputs[0], b.op(op_type, [x], node.name, **attrs), NCHW, 4)
    return handler


def _h_global_pool(op_type):
    def handler(b, node, mode):
        layer = node.layer
        if layer.data_format != "channels_last" or len(node.input_shapes[0]) != 4:
            raise _Unsupported("not a channels_last 2-D pooling")
        y = b.op(op_type, [b.get(node.inputs[0], NCHW)], node.name)
        if layer.keepdims:
            b.set(node.outputs[0], y, NCHW, 4)
        else:
            b.set(node.outputs[0], b.op("Flatten", [y], f"{node.name}/flatten", axis=1), KERAS, 2)
    return handler


def _h_flatten(b, node, mode):
    x = b.get(node.inputs[0], KERAS)
    b.set(node.outputs[0], b.op("Flatten", [x], node.name, axis=1), KERAS, 2)


def _h_reshape(b, node, mode):
    x = b.get(node.inputs[0], KERAS)
    shape = b.const(f"{node.name}/shape", np.array((0,) + tuple(node.layer.target_shape), np.int64))
    b.set(node.outputs[0], b.op("Reshape", [x, shape], node.name), KERAS, len(node.output_shapes[0]))


def _h_zero_padding(b, node, mode):
    layer = node.layer
    if layer.data_format != "channels_last":
        raise _Unsupported("not channels_last")
    (top, bottom), (left, right) = layer.padding
    pads = b.const(f"{node.name}/pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
    x = b.get(node.inputs[0], NCHW)
    b.set(node.outputs[0], b.op("Pad", [x, pads], node.name, mode="constant"), NCHW, 4)


def _h_rescaling(b, node, mode):
    layer = node.layer
    x = b.get(node.inputs[0], KERAS)
    y = b.op("Mul", [x, b.const(f"{node.name}/scale", np.asarray(layer.scale, np.float32))], f"{node.name}/mul")
    y = b.op("Add", [y, b.const(f"{node.name}/offset", np.asarray(layer.offset, np.float32))], node.name)
    b.set(node.outputs[0], y, KERAS, len(node.output_shapes[0]))


def _h_identity(b, node, mode):
    name, layout, rank = b.values[node.inputs[0]]
    b.set(node.outputs[0], name, layout, rank)


_HANDLERS = {
    QuantizedLayer: _h_quantized,
    keras.layers.Conv2D: _h_conv,
    keras.layers.DepthwiseConv2D: _h_conv,
    keras.layers.Dense: _h_dense,
    keras.layers.BatchNormalization: _h_batchnorm,
    keras.layers.ReLU: _h_relu,
    keras.layers.LeakyReLU: _h_leaky_relu,
    keras.layers.ELU: _h_elu,
    keras.layers.Activation: _h_activation,
    keras.layers.Softmax: _h_softmax,
    keras.layers.Add: _h_merge("Add"),
    keras.layers.Subtract: _h_merge("Sub"),
    keras.layers.Multiply: _h_merge("Mul"),
    keras.layers.Maximum: _h_merge("Max"),
    keras.layers.Minimum: _h_merge("Min"),
    keras.layers.Average: _h_average,
    keras.layers.Concatenate: _h_concat,
    keras.layers.MaxPooling2D: _h_pool("MaxPool"),
    keras.layers.AveragePooling2D: _h_pool("AveragePool"),
    keras.layers.GlobalAveragePooling2D: _h_global_pool("GlobalAveragePool"),
    keras.layers.GlobalMaxPooling2D: _h_global_pool("GlobalMaxPool"),
    keras.layers.Flatten: _h_flatten,
    keras.layers.Reshape: _h_reshape,
    keras.layers.ZeroPadding2D: _h_zero_padding,
    keras.layers.Rescaling: _h_rescaling,
    keras.layers.Identity: _h_identity,
}
for _cls in quantize_graph.TRAINING_ONLY_TYPES:
    _HANDLERS[_cls] = _h_identity


# --- tf2onnx fallback ---------------------------------------------------------


def _splice_tf_function(b, fn, inputs, shapes, prefix, dtypes=None):
    """Converts `fn` with tf2onnx and splices its nodes in; returns its outputs.

    `inputs` are ONNX names of NHWC (Keras-layout) tensors with Keras
    `shapes`; the outputs are in Keras layout too.
    """
    import tensorflow as tf
    import tf2onnx

    dtypes = dtypes or ["float32"] * len(inputs)
    specs = [tf.TensorSpec((None,) + tuple(shape[1:]), dtype, name=f"in{i}")
             for i, (shape, dtype) in enumerate(zip(shapes, dtypes))]
    proto, _ = tf2onnx.convert.from_function(
        tf.function(fn), input_signature=specs, opset=FALLBACK_OPSET)
    graph = proto.graph
    rename = {graph_input.name: name for graph_input, name in zip(graph.input, inputs)}
    prefix = f"{prefix}/tf2onnx/"
    for init in graph.initializer:
        new = onnx.TensorProto()
        new.CopyFrom(init)
        new.name = b.unique(prefix + init.name)
        rename[init.name] = new.name
        b.initializers.append(new)
    for onnx_node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in onnx_node.attribute):
            raise ValueError(f"{prefix} converts to ONNX control flow, which cannot be spliced in")
        new = onnx.NodeProto()
        new.CopyFrom(onnx_node)
        del new.input[:]
        del new.output[:]
        new.input.extend(rename[name] if name else "" for name in onnx_node.input)
        for name in onnx_node.output:
            rename[name] = b.unique(prefix + name) if name else ""
            new.output.append(rename[name])
        new.name = b.unique(prefix + (onnx_node.name or onnx_node.op_type))
        b.nodes.append(new)
    for opset in proto.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            b.domains[opset.domain] = max(b.domains.get(opset.domain, 0), opset.version)
    return [rename[graph_output.name] for graph_output in graph.output]


def _h_fallback(b, node, mode, reason):
    tensors = node.keras_node.input_tensors
    layer = node.layer

    def fn(*xs):
        args, kwargs = node.keras_node.arguments.fill_in(
            {id(t): x for t, x in zip(tensors, xs)})
        return layer(*args, **kwargs)

    inputs = [b.get(tensor_id, KERAS) for tensor_id in node.inputs]
    try:
        outputs = _splice_tf_function(
            b, fn, inputs, node.input_shapes, node.name,
            [keras.backend.standardize_dtype(t.dtype) for t in tensors])
    except Exception as e:
        raise ValueError(
            f"layer {node.name} ({node.type_name}) has no ONNX handler ({reason}) and "
            f"tf2onnx cannot convert it: {e}") from e
    for tensor_id, out, shape in zip(node.outputs, outputs, node.output_shapes):
        b.set(tensor_id, out, KERAS, len(shape))
    b.fallbacks.append(f"{node.name} ({node.type_name}: {reason})")


# --- export -----------------------------------------------------------------


def _value_info(name, shape, elem_type=TensorProto.FLOAT):
    dims = ["N"] + [d if d is not None else f"d{i}" for i, d in enumerate(shape[1:], start=1)]
    return helper.make_tensor_value_info(name, elem_type, dims)


def _check_activation_dtype(value, allowed, what):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def build_onnx(keras_model, mode, name=None, activation_dtype="int8"):
    """Converts a (frozen quantized, or float) Keras model to an ONNX model.

    Args:
        keras_model: a functional/sequential Keras model with one input and
            one output; in "fake_quant" and "deploy" mode, usually
            `QuantizedModel.keras_model` after distillation.
        mode: "float", "fake_quant" or "deploy".
        name: the ONNX graph name. Defaults to the model's name.
        activation_dtype: "int8" or "uint8", the deploy model's quantized
            activations (see the module docstring and
            `deploy_activation_dtype`); the logits are the same. Other
            modes take only the default, "int8".

    Returns:
        A checked `onnx.ModelProto` (opset 21, IR 10): input NHWC float32
        images named like the Keras input, output the model's output.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check_activation_dtype(activation_dtype, ACTIVATION_DTYPES, "activation_dtype")
    if mode != "deploy" and activation_dtype != "int8":
        raise ValueError(f"activation_dtype {activation_dtype!r} applies to the deploy model "
                         f"only, not to the {mode} model")
    graph = quantize_graph.Graph(keras_model)
    b = _Builder(activation_dtype)
    input_name = b.unique(graph.input_tensor._keras_history[0].name)
    output_name = b.unique("output")
    b.set(graph.input_id, input_name, KERAS, len(graph.input_tensor.shape))
    for node in graph.nodes:
        handler = next((h for cls, h in _HANDLERS.items() if type(node.layer) is cls), None)
        if handler is None:
            _h_fallback(b, node, mode, "no native handler")
            continue
        try:
            handler(b, node, mode)
        except _Unsupported as e:
            if isinstance(node.layer, QuantizedLayer):
                raise ValueError(f"quantized layer {node.name}: {e}") from e
            _h_fallback(b, node, mode, str(e))
    if mode != "float":
        quantized = [n for n in graph.nodes if isinstance(n.layer, QuantizedLayer)]
        if not quantized:
            raise ValueError(f"model {keras_model.name!r} has no quantized layer to export")
    for fallback in b.fallbacks:
        logger.info("ONNX %s model: %s exported through tf2onnx, in float", mode, fallback)
    b.nodes.append(helper.make_node("Identity", [b.get(graph.output_id, KERAS)], [output_name],
                                    name=output_name))
    onnx_graph = helper.make_graph(
        b.nodes, name or keras_model.name,
        [_value_info(input_name, graph.input_tensor.shape)],
        [_value_info(output_name, graph.output_tensor.shape)],
        b.initializers)
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in b.domains.items()],
        ir_version=IR_VERSION,
        producer_name="knowledge_distillation.quant",
        doc_string=f"{mode} model of {keras_model.name}"
                   + (f" ({activation_dtype} activations)" if mode == "deploy" else ""))
    onnx.checker.check_model(model)
    return model


def save_onnx(model, path):
    """Writes an ONNX model atomically; returns its size in bytes."""
    data = model.SerializeToString()
    atomic_write(path, data)
    return len(data)


# --- deploy activation signedness ---------------------------------------------


def read_cpu_flags(path=None):
    """The CPU's feature flags from a Linux `/proc/cpuinfo`; None if unreadable."""
    try:
        with open(path or CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def check_requested_activation_dtype(requested):
    """Raises ValueError unless `requested` is "auto", "int8" or "uint8"."""
    _check_activation_dtype(requested, ("auto",) + ACTIVATION_DTYPES, "deploy activation dtype")


def deploy_activation_dtype(requested="auto", cpu_flags=None, machine=None):
    """The deploy model's activation dtype, "int8" or "uint8", for this CPU.

    "auto" is "uint8" on an x86-64 CPU with VNNI (ONNX Runtime's fast U8S8
    kernel; its S8S8 kernel is several times slower than float there) and
    "int8" elsewhere: without VNNI, x86 U8S8 kernels saturate 16-bit sums
    and lose accuracy. Logs the choice and its reason (one line).

    Args:
        requested: "auto", "int8" or "uint8". An explicit value is honoured;
            "uint8" on an x86 CPU known to lack VNNI logs a warning (the
            model may be meant for another CPU).
        cpu_flags: the CPU's flags (an iterable of names such as
            "avx512_vnni"), or None to read them from /proc/cpuinfo (None
            there too, e.g. off Linux: unknown, and "auto" is "int8").
        machine: `platform.machine()` to assume; defaults to this one's.
    """
    check_requested_activation_dtype(requested)
    machine = platform.machine() if machine is None else machine
    x86 = machine.lower() in X86_64_MACHINES
    flags = read_cpu_flags() if cpu_flags is None else frozenset(cpu_flags)
    vnni = sorted(f for f in VNNI_FLAGS if f in (flags or ()))
    if not x86:
        cpu = f"{machine or 'unknown'} CPU, not x86-64"
    elif flags is None:
        cpu = "x86-64 CPU whose flags cannot be read"
    elif vnni:
        cpu = f"x86-64 CPU with {'/'.join(vnni)}"
    else:
        cpu = "x86-64 CPU without VNNI"
    if requested == "auto":
        if x86 and vnni:
            chosen, reason = "uint8", "ONNX Runtime's VNNI uint8 x int8 kernel, exact and fast"
        elif x86 and flags is not None:
            chosen, reason = "int8", "uint8 x int8 kernels saturate 16-bit sums without VNNI"
        else:
            chosen, reason = "int8", "signed int8 x int8 is exact on any kernel"
        logger.info("deploy model: %s activations (auto: %s; %s)", chosen, cpu, reason)
        return chosen
    if requested == "uint8" and x86 and flags is not None and not vnni:
        logger.warning(
            "deploy model: uint8 activations as requested, but this is an %s: ONNX Runtime's "
            "uint8 x int8 kernels can saturate their 16-bit sums here and lose accuracy (fine "
            "on a VNNI CPU); int8 activations are exact on any CPU", cpu)
    else:
        logger.info("deploy model: %s activations (requested; %s)", requested, cpu)
    return requested
