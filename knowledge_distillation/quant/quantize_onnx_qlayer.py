"""ONNX export of a `QuantizedLayer`: the fake-quant, integer-op and QDQ forms.

`h_quantized(b, node, mode)` writes one frozen quantized layer into a
`Builder`; the helpers here (convolution attributes, kernel layouts,
activations) serve the float handlers of `quantize_onnx_layers` too.
"""

import keras
import numpy as np
from onnx import TensorProto

from knowledge_distillation.quant.quantize_onnx_builder import (
    KERAS,
    NCHW,
    TO_NHWC,
    Unsupported,
    splice_tf_function,
)


# --- helpers ----------------------------------------------------------------


def pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def spatial_attrs(padding, in_hw, kernel_hw, strides, dilations=(1, 1)):
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


def conv_spec(layer, kind, input_shape, kernel_shape):
    strides = pair(layer.strides)
    dilations = pair(layer.dilation_rate)
    kernel_hw = kernel_shape[:2]
    attrs = dict(strides=list(strides), dilations=list(dilations), kernel_shape=list(kernel_hw))
    attrs.update(spatial_attrs(layer.padding, input_shape[1:3], kernel_hw, strides, dilations))
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
    s, d = pair(layer.strides)[0], pair(layer.dilation_rate)[0]
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
    strides = pair(layer.strides)
    extra = pair(layer.output_padding) if layer.output_padding is not None else (0, 0)
    if None in tuple(input_shape[1:3]) + tuple(output_shape[1:3]):
        raise Unsupported("Conv2DTranspose with unknown spatial sizes")
    del extra  # TensorFlow's crop does not depend on it; the output size does
    begins, ends, output_padding = [], [], []
    for size, out, k, s in zip(input_shape[1:3], output_shape[1:3], kernel_shape[:2], strides):
        full = (size - 1) * s + k  # the transposed convolution before any crop
        pad = max(full - out, 0)  # TF crops pad // 2 at the start, the rest at the end
        begins.append(pad // 2)
        ends.append(pad - pad // 2)
        output_padding.append(out - (full - pad))
    return dict(strides=list(strides), kernel_shape=list(kernel_shape[:2]),
                pads=begins + ends, output_padding=output_padding)


_ACTIVATIONS = {
    "relu": lambda b, x, base: b.op("Relu", [x], base),
    "relu6": lambda b, x, base: clip(b, x, 0.0, 6.0, base),
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


def clip(b, x, lo, hi, base):
    inputs = [x, b.const(base + "/min", np.float32(lo)),
              b.const(base + "/max", np.float32(hi)) if hi is not None else ""]
    return b.op("Clip", inputs, base)



# --- the quantized layer ---------------------------------------------------


_CONV_OPS = {"conv_transpose": "ConvTranspose"}


def h_quantized(b, node, mode):
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
        attrs = conv_spec(layer, kind, shape_in, k_shape)
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
    finish_activation(b, node, y, layout, len(shape_out), layer.activation, base)


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


def finish_activation(b, node, y, layout, rank, fn, base):
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
