"""The ONNX graph under construction, and the tf2onnx splice for layers with no handler.

`Builder` accumulates nodes and initializers with unique names and tracks
each Keras tensor's ONNX value and layout (NCHW between convolutions, Keras'
NHWC elsewhere). `splice_tf_function` converts one layer with tf2onnx and
splices its nodes in; `fallback` uses it for a layer the handlers of
`quantize_onnx_layers` do not cover (it stays float, and the log names it).
"""

import keras
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # INT4 QuantizeLinear / DequantizeLinear / Cast
IR_VERSION = 10
FALLBACK_OPSET = 18  # the newest tf2onnx 1.17 writes; its ops keep their meaning at 21
NCHW, KERAS = "nchw", "keras"
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class Unsupported(Exception):
    """A layer configuration the native handlers do not cover."""


class Builder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self, activation_dtype="int8", deploy_format="integer"):
        self.activation_dtype = activation_dtype  # of the deploy model's quantized activations
        self.deploy_format = deploy_format  # "integer" or "qdq"
        self.unfused_bias = []  # QDQ layers whose bias does not fit int32
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



def splice_tf_function(b, fn, inputs, shapes, prefix, dtypes=None):
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
    # tf2onnx does not always list its nodes in topological order: name
    # every output first.
    for onnx_node in graph.node:
        for name in onnx_node.output:
            if name:
                rename[name] = b.unique(prefix + name)
    for onnx_node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in onnx_node.attribute):
            raise ValueError(f"{prefix} converts to ONNX control flow, which cannot be spliced in")
        new = onnx.NodeProto()
        new.CopyFrom(onnx_node)
        del new.input[:]
        del new.output[:]
        new.input.extend(rename[name] if name else "" for name in onnx_node.input)
        new.output.extend(rename[name] if name else "" for name in onnx_node.output)
        new.name = b.unique(prefix + (onnx_node.name or onnx_node.op_type))
        b.nodes.append(new)
    for opset in proto.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            b.domains[opset.domain] = max(b.domains.get(opset.domain, 0), opset.version)
    return [rename[graph_output.name] for graph_output in graph.output]


def fallback(b, node, mode, reason):
    tensors = node.keras_node.input_tensors
    layer = node.layer

    def fn(*xs):
        args, kwargs = node.fill_in(dict(zip(node.inputs, xs)))
        return layer(*args, **kwargs)

    inputs = [b.get(tensor_id, KERAS) for tensor_id in node.inputs]
    try:
        outputs = splice_tf_function(
            b, fn, inputs, node.input_shapes, node.name,
            [keras.backend.standardize_dtype(t.dtype) for t in tensors])
    except Exception as e:
        raise ValueError(
            f"layer {node.name} ({node.type_name}) has no ONNX handler ({reason}) and "
            f"tf2onnx cannot convert it: {e}") from e
    for tensor_id, out, shape in zip(node.outputs, outputs, node.output_shapes):
        b.set(tensor_id, out, KERAS, len(shape))
    b.fallbacks.append(f"{node.name} ({node.type_name}: {reason})")

