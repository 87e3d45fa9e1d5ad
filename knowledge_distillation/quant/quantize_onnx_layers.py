"""ONNX handlers of the Keras layers: each writes one layer's nodes into a `Builder`.

A handler `h(b, node, mode)` reads `node` (a `quantize_graph` node: layer,
input and output tensor ids and shapes) and sets the ONNX value of every
output. `HANDLERS` maps layer classes to handlers; a handler raises
`Unsupported` for a configuration it does not cover, and the exporter then
falls back to tf2onnx for that layer (see `quantize_onnx_builder.fallback`).
"""

import keras
import numpy as np

try:  # the classes of keras.ops calls on symbolic tensors (`x + 3.0`)
    from keras.src.ops import numpy as keras_numpy_ops
except ImportError:  # pragma: no cover - a Keras without that module
    keras_numpy_ops = None
try:
    from keras.src.applications.convnext import LayerScale
except ImportError:  # pragma: no cover
    LayerScale = None

from knowledge_distillation.quant import quantize_graph
from knowledge_distillation.quant.quantize_layers import QuantizedLayer, fold_batchnorm
from knowledge_distillation.quant.quantize_onnx_builder import KERAS, NCHW, Unsupported
from knowledge_distillation.quant.quantize_onnx_qlayer import (
    clip,
    conv_spec,
    finish_activation,
    pair,
    spatial_attrs,
    h_quantized,
    onnx_kernel,
)


# --- handlers: each sets the ONNX value of node.outputs ---------------------


def _h_conv(b, node, mode):
    layer = node.layer
    kind = "depthwise" if isinstance(layer, keras.layers.DepthwiseConv2D) else "conv2d"
    if layer.data_format != "channels_last" or len(node.input_shapes[0]) != 4:
        raise Unsupported("not a channels_last 2-D convolution")
    kernel, bias = fold_batchnorm(layer)
    x = b.get(node.inputs[0], NCHW)
    attrs = conv_spec(layer, kind, node.input_shapes[0], kernel.shape)
    w = b.const(f"{layer.name}/kernel", onnx_kernel(kind, kernel))
    y = b.op("Conv", [x, w, b.const(f"{layer.name}/bias", bias)], layer.name, **attrs)
    finish_activation(b, node, y, NCHW, 4, layer.activation, layer.name)


def _h_dense(b, node, mode):
    layer = node.layer
    x = b.get(node.inputs[0], KERAS)
    y = b.op("MatMul", [x, b.const(f"{layer.name}/kernel", layer.kernel.numpy())], layer.name)
    if layer.use_bias:
        y = b.op("Add", [y, b.const(f"{layer.name}/bias", layer.bias.numpy())], f"{layer.name}/bias_add")
    finish_activation(b, node, y, KERAS, len(node.output_shapes[0]), layer.activation, layer.name)


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
            clip(b, x, 0.0, float(layer.max_value), node.name)
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
    finish_activation(b, node, x, layout, len(node.output_shapes[0]), node.layer.activation, node.name)


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
        pool = pair(layer.pool_size)
        strides = pair(layer.strides)
        attrs = dict(kernel_shape=list(pool), strides=list(strides))
        attrs.update(spatial_attrs(layer.padding, node.input_shapes[0][1:3], pool, strides))
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
    QuantizedLayer: h_quantized,
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

