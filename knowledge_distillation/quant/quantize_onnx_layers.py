"""ONNX handlers of the Keras layers: each writes one layer's nodes into a `Builder`.

A handler `h(b, node, mode)` reads `node` (a `quantize_graph` node: layer,
input and output tensor ids and shapes) and sets the ONNX value of every
output. `HANDLERS` maps layer classes to handlers; a handler raises
`Unsupported` for a configuration it does not cover, and the exporter then
falls back to tf2onnx for that layer (see `quantize_onnx_builder.fallback`).
"""

import keras
import numpy as np
from onnx import TensorProto

try:  # the classes of keras.ops calls on symbolic tensors (`x + 3.0`)
    from keras.src.ops import numpy as keras_numpy_ops
except ImportError:  # pragma: no cover - a Keras without that module
    keras_numpy_ops = None
try:
    from keras.src.applications.convnext import LayerScale
except ImportError:  # pragma: no cover
    LayerScale = None

from knowledge_distillation.quant import quantize_graph
from knowledge_distillation.quant.quantize_layers import QuantizedLayer
from knowledge_distillation.quant.quantize_onnx_builder import (
    KERAS,
    NCHW,
    TO_NHWC,
    Unsupported,
    splice_tf_function,
)


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
    """A Keras kernel in ONNX layout: Conv `(out, in/group, *k)`, ConvTranspose
    `(in, out, kh, kw)`, MatMul `(in, out)`."""
    kernel = np.asarray(kernel)
    if kind == "dense":
        return kernel
    if kind == "conv1d":
        return np.transpose(kernel, (2, 1, 0))
    if kind == "depthwise":
        kernel = kernel.reshape(kernel.shape[:2] + (1, -1))
    return np.transpose(kernel, (3, 2, 0, 1))  # conv_transpose: (kh, kw, out, in) too


def _channel_shape(kind, channels):
    if kind == "dense":
        return (channels,)
    return (1, channels, 1) if kind == "conv1d" else (1, channels, 1, 1)


def _weight_axis(kind):
    """The output-channel axis of the ONNX kernel."""
    return 1 if kind in ("dense", "conv_transpose") else 0


def _conv1d_spec(layer, input_shape, kernel_shape):
    (k, in_per_group, _), (size, channels) = kernel_shape, input_shape[1:]
    s, d = _pair(layer.strides)[0], _pair(layer.dilation_rate)[0]
    attrs = dict(strides=[s], dilations=[d], kernel_shape=[k], group=int(channels // in_per_group))
    if layer.padding == "causal":
        attrs["pads"] = [d * (k - 1), 0]
    elif layer.padding == "valid":
        attrs["pads"] = [0, 0]
    elif size is None:
        attrs["auto_pad"] = "SAME_UPPER"
    else:
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        attrs["pads"] = [total // 2, total - total // 2]
    return attrs


def _conv_transpose_spec(layer, input_shape, output_shape, kernel_shape):
    """ONNX ConvTranspose attributes giving Keras' (TensorFlow's) output: the pads
    are the forward convolution's, extra output at the end."""
    strides = _pair(layer.strides)
    extra = _pair(layer.output_padding) if layer.output_padding is not None else (0, 0)
    if None in tuple(input_shape[1:3]) + tuple(output_shape[1:3]):
        raise Unsupported("Conv2DTranspose with unknown spatial sizes")
    begins, ends, output_padding = [], [], []
    for size, out, k, s, e in zip(input_shape[1:3], output_shape[1:3], kernel_shape[:2], strides,
                                  extra):
        total = (size - 1) * s + k + e - out
        pad = max(total, 0)
        begins.append(pad // 2)
        ends.append(pad - pad // 2)
        output_padding.append(e + max(-total, 0))
    return dict(strides=list(strides), kernel_shape=list(kernel_shape[:2]),
                pads=begins + ends, output_padding=output_padding)


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


# --- handlers: each sets the ONNX value of node.outputs ---------------------


_CONV_OPS = {"conv_transpose": "ConvTranspose"}


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
    layout = NCHW if kind in ("conv2d", "depthwise", "conv_transpose") else KERAS
    x = b.get(node.inputs[0], layout)
    base = layer.name
    if kind == "conv1d":  # (N, W, C) -> (N, C, W) around the op
        x = b.op("Transpose", [x], f"{base}/ncw", perm=[0, 2, 1])
    w_int = onnx_kernel(kind, layer.integer_kernel())
    channels = state.scale_w.size
    axis = _weight_axis(kind)
    s_d = b.const(f"{base}/scale_d", np.float32(state.scale_d))
    if mode == "deploy" and b.activation_dtype == "uint8":
        # QuantizeLinear then yields x_q + 128, and x_u - z_u == x_q - z_d.
        z_d = b.const(f"{base}/offset_d_uint8", np.uint8(int(state.offset_d) + 128))
    else:
        z_d = b.const(f"{base}/offset_d", np.int8(state.offset_d))
    shape_in, shape_out, k_shape = node.input_shapes[0], node.output_shapes[0], layer.float_kernel.shape
    if kind in ("conv2d", "depthwise"):
        attrs = _conv_spec(layer, kind, shape_in, k_shape)
    elif kind == "conv1d":
        attrs = _conv1d_spec(layer, shape_in, k_shape)
    elif kind == "conv_transpose":
        attrs = _conv_transpose_spec(layer, shape_in, shape_out, k_shape)
    else:
        attrs = {}
    op_type = _CONV_OPS.get(kind, "Conv")
    int4 = state.dst_type_w == "INT4"
    if mode == "deploy" and b.deploy_format == "qdq":
        y = _qdq_layer(b, node, x, s_d, z_d, w_int, attrs, op_type)
    else:
        x_q = b.op("QuantizeLinear", [x, s_d, z_d], f"{base}/input_quant")
        integer_op = mode == "deploy" and kind != "conv_transpose"  # no ConvTransposeInteger
        if mode == "fake_quant":
            # Dequantize to the integer levels (scale 1) and apply the scales
            # after the convolution: every partial sum is then an exact integer,
            # as in the deploy model's integer kernel and the TF simulation.
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
        elif int4:
            w_q = b.int4_const(f"{base}/weight_int4", w_int)
            z_0 = None if integer_op else b.int4_const(f"{base}/weight_zero", np.zeros((), int))
        else:
            w_q = b.const(f"{base}/weight_int8", w_int.astype(np.int8))
            z_0 = None if integer_op else b.const(f"{base}/weight_zero", np.int8(0))
        if integer_op:
            w = b.op("Cast", [w_q], f"{base}/weight_int8", to=TensorProto.INT8) if int4 else w_q
            if kind == "dense":
                acc = b.op("MatMulInteger", [x_q, w, z_d], f"{base}/matmul_integer")
            else:
                acc = b.op("ConvInteger", [x_q, w, z_d], f"{base}/conv_integer", **attrs)
            acc = b.op("Cast", [acc], f"{base}/acc_float", to=TensorProto.FLOAT)
        else:
            one = b.const(f"{base}/unit_scale", np.float32(1.0))
            x_i = b.op("DequantizeLinear", [x_q, one, z_d], f"{base}/input_dequant")
            w_i = b.op("DequantizeLinear", [w_q, one, z_0], f"{base}/weight_dequant")
            if kind == "dense":
                acc = b.op("MatMul", [x_i, w_i], f"{base}/matmul")
            else:
                acc = b.op(op_type, [x_i, w_i], f"{base}/{op_type.lower()}", **attrs)
        shape = _channel_shape(kind, channels)
        y = b.op("Mul", [acc, b.const(f"{base}/dequant_scale", state.multiplier.reshape(shape))],
                 f"{base}/dequant")
        y = b.op("Add", [y, b.const(f"{base}/bias", layer.float_bias.reshape(shape))],
                 f"{base}/bias_add")
    if kind == "conv1d":
        y = b.op("Transpose", [y], f"{base}/nwc", perm=[0, 2, 1])
    _finish_activation(b, node, y, layout, len(shape_out), layer.activation, base)


INT32_MAX = 2 ** 31 - 1


def qdq_bias(bias, multiplier):
    """The int32 bias of a QDQ layer (scale `scale_d * scale_w`), or None when one overflows.

    A channel whose weights are (nearly) all zero can have a weight scale so
    small that its bias does not fit in int32 at that scale.
    """
    q = np.round(np.asarray(bias, np.float64) / np.asarray(multiplier, np.float64))
    if not np.all(np.isfinite(q)) or np.abs(q).max(initial=0) > INT32_MAX:
        return None
    return q.astype(np.int32)


def _qdq_layer(b, node, x, s_d, z_d, w_int, attrs, op_type):
    """The QDQ form, up to the activation: DequantizeLinear on the quantized input,
    the integer weights and the int32 bias, then the float op. ONNX Runtime
    fuses `DQ -> Conv -> Q` into QLinearConv (and DQ -> Gemm into QGemm)
    where a QuantizeLinear follows; TensorRT, OpenVINO and QNN read the same
    graph."""
    layer = node.layer
    state = layer.state
    kind = layer.kind
    base = layer.name
    channels = state.scale_w.size
    in_shape, out_shape = node.input_shapes[0], node.output_shapes[0]
    # Dense on images or sequences runs as a 2-D Gemm (ORT fuses DQ -> Gemm into
    # QGemm even with a float output, not DQ -> MatMul); quantizing is
    # elementwise, so reshaping before QuantizeLinear changes no value.
    flatten = kind == "dense" and len(in_shape) > 2 and None not in out_shape[1:]
    if flatten:
        x = b.op("Reshape", [x, b.const(f"{base}/rows", np.array([-1, in_shape[-1]], np.int64))],
                 f"{base}/rows")
    x_q = b.op("QuantizeLinear", [x, s_d, z_d], f"{base}/input_quant")
    x_dq = b.op("DequantizeLinear", [x_q, s_d, z_d], f"{base}/input_dequant")
    if state.dst_type_w == "INT4":
        w = b.int4_const(f"{base}/weight_int4", w_int)
        z_w = b.int4_const(f"{base}/weight_zero", np.zeros(channels, int))
    else:
        w = b.const(f"{base}/weight_int8", w_int.astype(np.int8))
        z_w = b.const(f"{base}/weight_zero", np.zeros(channels, np.int8))
    w_dq = b.op("DequantizeLinear", [w, b.const(f"{base}/scale_w", state.scale_w), z_w],
                f"{base}/weight_dequant", axis=_weight_axis(kind))
    bias_int = qdq_bias(layer.float_bias, state.multiplier)
    if bias_int is None:
        b.unfused_bias.append(base)
        bias = b.const(f"{base}/bias", layer.float_bias)
    else:
        bias = b.op("DequantizeLinear",
                    [b.const(f"{base}/bias_int32", bias_int),
                     b.const(f"{base}/bias_scale", state.multiplier),
                     b.const(f"{base}/bias_zero", np.zeros(channels, np.int32))],
                    f"{base}/bias_dequant", axis=0)
    if kind != "dense":
        return b.op(op_type, [x_dq, w_dq, bias], f"{base}/{op_type.lower()}", **attrs)
    if len(in_shape) == 2 or flatten:
        y = b.op("Gemm", [x_dq, w_dq, bias], f"{base}/gemm")
        if flatten:
            back = np.array((-1,) + tuple(out_shape[1:]), np.int64)
            y = b.op("Reshape", [y, b.const(f"{base}/shape", back)], f"{base}/unflatten")
        return y
    return b.op("Add", [b.op("MatMul", [x_dq, w_dq], f"{base}/matmul"), bias], f"{base}/bias_add")


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
    (out,) = splice_tf_function(b, fn, [y], [node.output_shapes[0]], f"{base}/activation")
    b.fallbacks.append(f"{base} activation ({name!r})")
    b.set(node.outputs[0], out, KERAS, rank)


def _h_conv(b, node, mode):
    layer = node.layer
    kind = "depthwise" if isinstance(layer, keras.layers.DepthwiseConv2D) else "conv2d"
    if layer.data_format != "channels_last" or len(node.input_shapes[0]) != 4:
        raise Unsupported("not a channels_last 2-D convolution")
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
        raise Unsupported("BatchNormalization not on the last axis")
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
        raise Unsupported("ReLU threshold")
    layout = _elementwise_layout(b, node)
    x = b.get(node.inputs[0], layout)
    if slope == 0.0:
        y = b.op("Relu", [x], node.name) if layer.max_value is None else \
            _clip(b, x, 0.0, float(layer.max_value), node.name)
    elif layer.max_value is None:
        y = b.op("LeakyRelu", [x], node.name, alpha=slope)
    else:
        raise Unsupported("ReLU with both negative_slope and max_value")
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
        raise Unsupported("Softmax not on the last axis or with a mask")
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
            raise Unsupported("not a channels_last 2-D pooling")
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
            raise Unsupported("not a channels_last 2-D pooling")
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
        raise Unsupported("not channels_last")
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


def _h_normalization(b, node, mode):
    layer = node.layer
    rank = len(node.input_shapes[0])
    mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), np.float32)
    variance = np.asarray(keras.ops.convert_to_numpy(layer.variance), np.float32)
    if mean.ndim != rank:
        raise Unsupported("Normalization statistics not in the input's broadcast shape")
    std = np.maximum(np.sqrt(variance), np.float32(keras.backend.epsilon())).astype(np.float32)
    x = b.get(node.inputs[0], KERAS)
    name = node.name
    if layer.invert:
        y = b.op("Mul", [x, b.const(f"{name}/std", std)], f"{name}/mul")
        y = b.op("Add", [y, b.const(f"{name}/mean", mean)], name)
    else:
        y = b.op("Sub", [x, b.const(f"{name}/mean", mean)], f"{name}/sub")
        y = b.op("Div", [y, b.const(f"{name}/std", std)], name)
    b.set(node.outputs[0], y, KERAS, rank)


def _h_layer_norm(b, node, mode):
    layer = node.layer
    shape = node.input_shapes[0]
    rank = len(shape)
    axes = sorted(int(a) % rank for a in np.atleast_1d(layer.axis))
    if axes != list(range(axes[0], rank)) or getattr(layer, "rms_scaling", False):
        raise Unsupported("LayerNormalization over axes other than the last ones, or RMS scaling")
    norm_shape = tuple(shape[axes[0]:])
    scale = layer.gamma.numpy() if layer.scale else np.ones(norm_shape, np.float32)
    shift = layer.beta.numpy() if layer.center else np.zeros(norm_shape, np.float32)
    x = b.get(node.inputs[0], KERAS)
    y = b.op("LayerNormalization",
             [x, b.const(f"{node.name}/gamma", np.reshape(scale, norm_shape).astype(np.float32)),
              b.const(f"{node.name}/beta", np.reshape(shift, norm_shape).astype(np.float32))],
             node.name, axis=axes[0], epsilon=float(layer.epsilon))
    b.set(node.outputs[0], y, KERAS, rank)


def _h_channel_scale(b, node, mode):
    """`x * gamma` with one factor per channel (ConvNeXt's LayerScale)."""
    gamma = np.asarray(node.layer.gamma.numpy(), np.float32)
    rank = len(node.input_shapes[0])
    if gamma.shape != (node.input_shapes[0][-1],):
        raise Unsupported("scale is not one factor per channel")
    layout = _elementwise_layout(b, node)
    if layout == NCHW:
        gamma = gamma.reshape(1, -1, 1, 1)
    x = b.get(node.inputs[0], layout)
    b.set(node.outputs[0], b.op("Mul", [x, b.const(f"{node.name}/gamma", gamma)], node.name),
          layout, rank)


def _h_ops_binary(op_type):
    """A `keras.ops` binary call (`x + y`, `x * 3.0` in a functional model)."""
    def handler(b, node, mode):
        arguments = node.keras_node.arguments
        if arguments.kwargs or len(arguments.args) != 2:
            raise Unsupported("not a call on two operands")
        ids = dict(zip(node._raw_inputs, node.inputs))
        tensors = [a for a in arguments.args if isinstance(a, keras.KerasTensor)]
        if any(keras.backend.standardize_dtype(t.dtype) != "float32" for t in tensors):
            raise Unsupported("operands are not float32")
        constants = [np.asarray(a, np.float32) for a in arguments.args
                     if not isinstance(a, keras.KerasTensor)]
        ranks = {len(t.shape) for t in tensors}
        layout = NCHW if ranks == {4} and all(c.ndim == 0 for c in constants) else KERAS
        inputs = [b.get(ids[id(a)], layout) if isinstance(a, keras.KerasTensor)
                  else b.const(f"{node.name}/constant", np.asarray(a, np.float32))
                  for a in arguments.args]
        b.set(node.outputs[0], b.op(op_type, inputs, node.name), layout,
              len(node.output_shapes[0]))
    return handler


def _h_identity(b, node, mode):
    name, layout, rank = b.values[node.inputs[0]]
    b.set(node.outputs[0], name, layout, rank)


HANDLERS = {
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
HANDLERS[keras.layers.Normalization] = _h_normalization
HANDLERS[keras.layers.LayerNormalization] = _h_layer_norm
for _cls in quantize_graph.TRAINING_ONLY_TYPES:
    HANDLERS[_cls] = _h_identity
for _name, _op_type in (("Add", "Add"), ("Subtract", "Sub"), ("Multiply", "Mul"),
                        ("Divide", "Div"), ("TrueDivide", "Div")):
    if hasattr(keras_numpy_ops, _name):
        HANDLERS[getattr(keras_numpy_ops, _name)] = _h_ops_binary(_op_type)
if LayerScale is not None:
    HANDLERS[LayerScale] = _h_channel_scale

